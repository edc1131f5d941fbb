"""``torch.finfo(x.dtype).min`` in a build: recorded, so that it follows the model's dtype.

HuggingFace (and much other code) builds attention masks from the smallest number of the compute dtype:
``(1.0 - mask) * torch.finfo(x.dtype).min``, ``scores.masked_fill(~mask, torch.finfo(q.dtype).min)``.
At the top level of a build ``x.dtype`` is a stand-in (NOTE: [Device and dtype stand-ins] in
``symbolic.py``), which ``torch.finfo`` refuses. Here ``torch.finfo`` / ``torch.iinfo`` of a stand-in
give a :class:`SymbolicTypeInfo`, whose ``.min`` (``.max``, ``.eps``...) is a symbolic number recorded as
``finfo_value(getattr(x, "dtype"), "min")``: when the model runs it is the plain Python float of the
dtype the model computes in, exactly what eager code gets.

Design constraints (see NOTE: [finfo of a stand-in]):

- Exact against eager in every dtype: never the build dtype's constant (float32's min overflows
  bfloat16 to -inf, and fully masked rows then give NaN where eager gives finite values), and a
  Python float when the model runs (a 0-d tensor promotes differently).
- ``torch.finfo`` is a type that ``__torch_function__`` never sees, so it is replaced while, and only
  while, a thread builds (from ``tg.Input`` or a ``tg.from_module`` recording to ``tg.Model``), and
  only for that thread's code outside torch; the replacement answers real dtypes with torch's own
  ``torch.finfo`` object.
- :func:`finfo_value` and :func:`iinfo_value` may be named by a config (an untrusted file): they take a
  real dtype and one attribute from a fixed list, and nothing else.

Example:
    >>> import torch, torch.nn as nn, torchgraph as tg
    >>> x = tg.Input(shape=(4,))
    >>> h = nn.Linear(4, 4)(x)
    >>> model = tg.Model(x, h.masked_fill(h > 0, torch.finfo(h.dtype).min))
    >>> "finfo_value(getattr_1, 'min')" in model.code
    True
    >>> model.to(torch.bfloat16)(torch.ones(1, 4, dtype=torch.bfloat16)).isinf().any().item()
    False
"""

from __future__ import annotations

import os
import sys
import threading
import types

import torch

from .builds import Build, building_now, current_build, end_build
from .errors import GraphBuildError
from .generator_states import forget_call_starts, unwatch_call_starts, watch_call_starts
from .returned_inputs import unwatch_builds, watch_builds

__all__ = ["FINFO_ATTRIBUTES", "IINFO_ATTRIBUTES", "SymbolicTypeInfo", "building", "dtype_source",
           "finfo_value", "hold_during_build", "iinfo_value", "release_build"]

FINFO_ATTRIBUTES = ("bits", "eps", "max", "min", "tiny", "smallest_normal", "resolution")
IINFO_ATTRIBUTES = ("bits", "max", "min")

_REAL = {"finfo": torch.finfo, "iinfo": torch.iinfo}


def _value(kind: str, dtype, attribute: str):
    """``torch.<kind>(dtype).<attribute>`` of a real dtype; a stand-in is recorded instead."""
    from .symbolic import SymbolicDtype, _StandIn

    allowed = FINFO_ATTRIBUTES if kind == "finfo" else IINFO_ATTRIBUTES
    if not isinstance(attribute, str) or attribute not in allowed:
        raise ValueError(f"torchgraph.{kind}_value: unknown attribute {attribute!r:.80}. Expected one of "
                         f"{', '.join(allowed)}; received {type(attribute).__name__} {attribute!r:.80}.")
    if isinstance(dtype, SymbolicDtype):
        return _record(kind, dtype, attribute)
    if isinstance(dtype, torch.fx.Proxy):  # torch.fx retracing a model (unpickling, symbolic_trace)
        return dtype.tracer.create_proxy("call_function", _FUNCTIONS[kind], (dtype, attribute), {})
    if isinstance(dtype, _StandIn):
        dtype = dtype.value  # a device stand-in: refused below
    floating = isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)
    integral = isinstance(dtype, torch.dtype) and not floating and dtype != torch.bool
    if not (floating if kind == "finfo" else integral):
        expected = "a floating point (or complex) dtype" if kind == "finfo" else "an integer dtype"
        raise TypeError(f"torchgraph.{kind}_value: torch.{kind} of {dtype!r:.80}. Expected {expected}; "
                        f"received {type(dtype).__name__} {dtype!r:.80}. Use torch."
                        f"{'iinfo' if kind == 'finfo' else 'finfo'} for that dtype.")
    return getattr(_REAL[kind](dtype), attribute)


def finfo_value(dtype: torch.dtype, attribute: str) -> float | int:
    """``getattr(torch.finfo(dtype), attribute)``: what a recorded ``torch.finfo(x.dtype).min`` computes.

    Args:
        dtype (torch.dtype): a floating point dtype (the model's ``x.dtype`` when it runs).
        attribute (str): one of ``bits``, ``eps``, ``max``, ``min``, ``tiny``, ``smallest_normal``,
            ``resolution``.

    Returns:
        float | int: a plain Python number, as ``torch.finfo`` gives it (``bits`` is an int).

    Example:
        >>> import torch
        >>> finfo_value(torch.bfloat16, "min") == torch.finfo(torch.bfloat16).min
        True
    """
    return _value("finfo", dtype, attribute)


def iinfo_value(dtype: torch.dtype, attribute: str) -> int:
    """``getattr(torch.iinfo(dtype), attribute)``: what a recorded ``torch.iinfo(x.dtype).max`` computes.

    Args:
        dtype (torch.dtype): an integer dtype.
        attribute (str): one of ``bits``, ``max``, ``min``.

    Returns:
        int: a plain Python int.

    Example:
        >>> import torch
        >>> iinfo_value(torch.int8, "max")
        127
    """
    return _value("iinfo", dtype, attribute)


_FUNCTIONS = {"finfo": finfo_value, "iinfo": iinfo_value}


def dtype_source(value):
    """The build dtype whose number a recorded number (a :class:`~torchgraph.symbolic.Value`) is computed
    from (``torch.finfo(x.dtype).min - 1``), or None."""
    from .symbolic import Value

    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen or v.dims is not None:
            continue
        seen.add(id(v))
        if v.record.target in (finfo_value, iinfo_value):
            return v.record.args[0].probes[0]
        stack.extend(a for a in (*v.record.args, *v.record.kwargs.values()) if isinstance(a, Value))
    return None


def _record(kind: str, standin, attribute: str):
    """The recorded ``<kind>_value(getattr(x, "dtype"), attribute)``: a symbolic number."""
    from .sizes import standin_value
    from .symbolic import Record, SymbolicInt, Value

    number = _value(kind, standin.value, attribute)  # the build dtype's, for the probes; checks the dtype
    record = Record("call_function", _FUNCTIONS[kind], (standin_value(standin), attribute))
    out = SymbolicInt(Value(record, (), (number, number)))
    record.out = out._tg_value
    return out


class SymbolicTypeInfo:
    """``torch.finfo(x.dtype)`` (or ``torch.iinfo``) of a dtype stand-in: its attributes are recorded.

    ``.min``, ``.max``, ``.eps``... are symbolic numbers (NOTE: [finfo of a stand-in]); they can be
    used in Python arithmetic (``info.max - 1000``) and passed to torch functions (``torch.where(m, 0.0,
    info.min)``, ``t.masked_fill(m, info.min)``, ``t * info.min``), which record them.
    """

    __slots__ = ("_kind", "_standin")

    def __init__(self, kind: str, standin):
        _value(kind, standin.value, "bits")  # torch.finfo(torch.long) fails here, as it does in eager
        self._kind = kind
        self._standin = standin

    def __getattr__(self, name: str):
        if name.startswith("_"):  # copy/pickle probing an object without its slots set
            raise AttributeError(name)
        allowed = FINFO_ATTRIBUTES if self._kind == "finfo" else IINFO_ATTRIBUTES
        if name in allowed:
            return _record(self._kind, self._standin, name)
        if name == "dtype":
            raise GraphBuildError(
                f"torch.{self._kind}(x.dtype).dtype: the dtype's name depends on the dtype the model runs in, "
                "so it cannot be a fixed string in a recorded model. Expected one of its numbers ("
                f"{', '.join(allowed)}); use x.dtype itself to compare or to pass on.")
        raise AttributeError(f"torch.{self._kind}(x.dtype) has no attribute {name!r}; torchgraph records "
                             f"{', '.join(allowed)}.")

    def __repr__(self) -> str:
        return f"{self._kind}(dtype={self._standin.value}, recorded)"


# NOTE: [finfo of a stand-in] torch.finfo and torch.iinfo are types implemented in C: calling one
# never reaches __torch_function__ or a TorchFunctionMode, and its argument parser accepts only a real
# torch.dtype (a final type, so a stand-in cannot be one). Their result is only a bag of numbers, so the
# call is intercepted where it is looked up: while some thread builds, the `torch` module's class is
# _TorchDuringBuilds, whose `finfo` property gives that thread's model code a class made here (its
# __new__ gives a SymbolicTypeInfo for a dtype stand-in and torch's own finfo object for anything else;
# isinstance(obj, torch.finfo) stays true through the metaclass), and everyone else torch's type: other
# threads, and torch's own code (torch._dynamo, imported lazily, often first during a tg.from_module
# recording, copies torch.finfo into its tables of constant types at import; a replacement caught there
# would break torch.compile of finfo for the rest of the process).
# When: Python looks `torch.finfo` up before it evaluates `x.dtype`, so the replacement must already be
# in place when the first finfo of a build runs. A build takes a hold at tg.Input(), when tg.from_module
# records (RecordingMode), and at each operation recorded at the top level (a value of a finished build
# used again), and gives it back when it ends (dims.new_build: tg.Model(), a failed tg.from_module, a
# replayed config), when no value of it is left (a failed or abandoned build: NOTE: [End of a build]
# in builds.py) or when its thread ends. The module's class is torch's own again as soon as no
# thread holds one, so a process that does not build never sees the replacement. Limits: code that
# bound finfo at import time (`from torch import finfo`) bypasses it (its finfo of a stand-in raises
# torch's TypeError, as before), and so does a torch.finfo(h.dtype) that is the first use of a finished
# build's value `h` after its tg.Model() (any recorded operation or tg.Input before it takes the hold
# again). A process-wide replacement would avoid the second but break torch.compile(fullgraph=True)
# of every model that calls torch.finfo (HuggingFace's) for good. torch.compile in the building thread
# during a build works: torch._dynamo reads `torch.finfo` from its own code, and its guards from a
# string it evaluates, which counts as the code that evaluates it (only such a string: a function
# defined in `python -c` code, also `<string>`, is model code).
# What: the attribute read is recorded as `finfo_value(getattr(x, "dtype"), "min")`, a SymbolicInt whose
# two probes are the build dtype's number (so probes compute with a Python float, as eager code does),
# and which a model computes from the dtype it then runs in. It is a Python float there, never a 0-d
# tensor: under type promotion they differ (int_mask * m is float32 with a Python float, bfloat16 with
# a 0-d bfloat16 tensor). Python arithmetic on it (`m - 1000`) is recorded like arithmetic on sizes; a
# plain number (float(m), torch.tensor(m) outside tg.from_module) is refused, since it would not follow
# model.to(dtype). torch.onnx export runs finfo_value on the real dtype: a constant, as in eager export.


class _InfoMeta(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, _REAL[cls._kind])

    def __subclasscheck__(cls, sub):
        return issubclass(sub, _REAL[cls._kind])

    def __getattr__(cls, name):
        return getattr(_REAL[cls.__dict__["_kind"]], name)


def _make_info_type(kind: str) -> type:
    def __new__(cls, *args, **kwargs):
        from .symbolic import SymbolicDtype

        dtype = args[0] if args else kwargs.get("type")
        if isinstance(dtype, SymbolicDtype) and len(args) + len(kwargs) == 1:
            return SymbolicTypeInfo(kind, dtype)
        return _REAL[kind](*args, **kwargs)

    info_type = _InfoMeta(kind, (), {"__new__": __new__, "_kind": kind, "__module__": "torch",
                                     "__doc__": _REAL[kind].__doc__})
    return info_type


_REPLACEMENTS = {"finfo": _make_info_type("finfo"), "iinfo": _make_info_type("iinfo")}


class _TorchDuringBuilds(types.ModuleType):
    """The class of the ``torch`` module while a build holds the replacement (NOTE: [finfo of a stand-in])."""

    finfo = property(lambda self: _lookup("finfo"))
    iinfo = property(lambda self: _lookup("iinfo"))


_TORCH_MODULE_CLASS = type(torch)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _lookup(kind: str):
    """``torch.finfo`` as the code looking it up sees it: the replacement only for a building thread's
    model code; torch's own code (torch._dynamo's tables of constant types) gets torch's type."""
    if building_now() is None:
        return _REAL[kind]
    frame = sys._getframe(2)
    code = frame.f_code
    if code.co_filename == "<string>" and code.co_name == "<module>" and frame.f_back is not None:
        frame = frame.f_back  # a string eval'd by its caller: torch._dynamo builds its guards that way
    return _REAL[kind] if frame.f_code.co_filename.startswith(_TORCH_DIR) else _REPLACEMENTS[kind]


class _Hold:
    """One build's hold on the replacement; dropped when the build ends, or when its thread ends."""

    def __init__(self):
        global _COUNT
        self.dropped = False
        with _LOCK:
            _COUNT += 1
            if _COUNT == 1:
                torch.__class__ = _TorchDuringBuilds
                watch_builds()  # NOTE: [Returned inputs] in returned_inputs.py
                watch_call_starts()  # NOTE: [Generator states at a call's start] in generator_states.py

    def drop(self) -> None:
        global _COUNT
        with _LOCK:
            if self.dropped:
                return
            self.dropped = True
            _COUNT -= 1
            if _COUNT == 0:
                torch.__class__ = _TORCH_MODULE_CLASS
                unwatch_builds()
                unwatch_call_starts()

    def __del__(self, _finalizing=sys.is_finalizing):  # the thread ended in the middle of a build
        if not _finalizing():  # at interpreter exit this module's globals may already be gone
            self.drop()


_LOCK = threading.RLock()  # reentrant: a _Hold's __del__ may run inside a locked section
_COUNT = 0


def building() -> bool:
    """Whether this thread holds the build hold (it is building a model)."""
    return building_now() is not None


def hold_during_build() -> Build:
    """This thread builds: replace ``torch.finfo``/``torch.iinfo`` until its build ends (NOTE: [finfo of a
    stand-in]; when that is: NOTE: [End of a build] in builds.py). Returns the build."""
    build = current_build()
    if build.hold is None:
        build.hold = _Hold()
    return build


def release_build() -> None:
    """This thread's build ended: put the real ``torch.finfo``/``torch.iinfo`` back if no other build holds them."""
    forget_call_starts()  # this thread's layer calls that opened no scope
    end_build()
