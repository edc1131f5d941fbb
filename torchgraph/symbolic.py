"""Symbolic values: what a layer call on a placeholder returns.

A :class:`SymbolicTensor` stands for a tensor that will exist when the model runs. It knows its shape
(with dynamic dims), its dtype, and the recorded call that produces it. Calling a module or a torch
function on it records that call instead of computing anything.

Design constraints:

- Each value carries two *probes*: meta tensors (no storage) computed with two different sizes for
  every dynamic dim. A dim that is equal in both probes is static; one that differs is dynamic. This
  is how ``None`` dims survive arbitrary torch code without a symbolic shape engine.
- A :class:`SymbolicTensor` is a ``torch.Tensor`` wrapper subclass so that ``isinstance(x, Tensor)``
  checks in third-party modules pass, but every operation on it is intercepted by
  ``__torch_function__`` (see ``recording.py``); its own storage is never touched.
- Values are immutable and shared: the same value can feed several models (``model.get_output`` to
  build a feature extractor).
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch

from .errors import GraphBuildError
from .scopes import current_scope

__all__ = ["SymbolicTensor", "SymbolicInt", "DynamicDim", "Input"]

_SEQ = itertools.count()


class DynamicDim:
    """A dynamic dimension: the batch, a ``None`` in ``tg.Input(shape=...)``, or a named one.

    ``probes`` are the two sizes used to propagate shapes through the graph.
    """

    __slots__ = ("name", "probes")

    def __init__(self, name: str | None, probes: tuple[int, int]):
        self.name = name
        self.probes = probes

    def __repr__(self) -> str:
        return "None" if self.name is None else self.name


BATCH = DynamicDim(None, (2, 3))
_NAMED_DIMS: dict[str, DynamicDim] = {}
_DIM_COUNTER = itertools.count()
_DIMS_BY_PROBES: dict[tuple[int, int], DynamicDim] = {BATCH.probes: BATCH}


def _new_dynamic_dim(name: str | None) -> DynamicDim:
    # NOTE: [Probe sizes] Each dynamic dim gets its own pair of probe sizes, far apart so that strided
    # layers (stride 32 in a ResNet) do not map both probes to the same size, and distinct from
    # every other dim's so that mixing up two dynamic dims (H and W, say) fails at build time.
    if name is not None and name in _NAMED_DIMS:
        return _NAMED_DIMS[name]
    # Anonymous dims: sixteen pairs, reused in turn, so probe sizes stay small (real-data probes stay
    # cheap) however many models a process builds; only dims created 16 apart share a pair. Named
    # dims: a range of their own.
    if name is None:
        k = next(_DIM_COUNTER) % 16
        dim = DynamicDim(None, (48 + 16 * k, 112 + 32 * k))
    else:
        j = len(_NAMED_DIMS)
        dim = DynamicDim(name, (320 + 16 * j, 752 + 32 * j))
    _DIMS_BY_PROBES.setdefault(dim.probes, dim)
    if name is not None:
        _NAMED_DIMS[name] = dim
    return dim


def dim_for_probes(p0: int, p1: int) -> int | DynamicDim:
    """The static size, or the dynamic dim whose probes these are (an anonymous one if unknown)."""
    if p0 == p1:
        return p0
    return _DIMS_BY_PROBES.get((p0, p1)) or DynamicDim(None, (p0, p1))


def format_shape(dims) -> str:
    """``(None, 3, 32, 32)``: dynamic dims as None or their name, never as a probe size."""
    inner = ", ".join(repr(d) for d in dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


class Record:
    """One recorded call: a placeholder, a module call, a function call or a method call."""

    __slots__ = ("op", "target", "args", "kwargs", "seq", "location", "out", "scope", "__weakref__")

    def __init__(self, op: str, target: Any, args: tuple = (), kwargs: dict | None = None,
                 location: str | None = None):
        self.op = op            # "placeholder" | "call_module" | "call_function" | "call_method"
        self.target = target    # Input name | nn.Module | callable | method name
        self.args = args        # leaves: Value (symbolic), real tensors (constants), plain Python
        self.kwargs = kwargs or {}
        self.seq = next(_SEQ)   # creation order: the emitted code follows the user's program order
        self.location = location
        self.out = None          # tree of Values (and plain outputs), set once probed
        self.scope = current_scope()  # "encoder.block1": tg.scope names / tg.from_module module path


class Value:
    """What a symbolic object points at: output ``path`` of ``record``, with its two probes."""

    __slots__ = ("record", "path", "probes", "dims", "dtype")

    def __init__(self, record: Record, path: tuple, probes: tuple):
        self.record = record
        self.path = path
        self.probes = probes
        p0, p1 = probes
        if isinstance(p0, torch.Tensor):
            self.dims = tuple(dim_for_probes(a, b) for a, b in zip(p0.shape, p1.shape))
            self.dtype = p0.dtype
        else:  # a Python int (a dynamic size)
            self.dims = None
            self.dtype = None

    @property
    def shape(self) -> tuple:
        """Shape with ``None`` (or a dim name) for dynamic dims."""
        return tuple(d if isinstance(d, int) else (d.name if d.name else None) for d in self.dims)


class SymbolicTensor(torch.Tensor):
    """Symbolic tensor: a shape and a dtype, standing for a tensor the model will compute.

    Returned by :func:`Input` and by every module or torch function called on symbolic tensors.
    ``shape`` shows dynamic dims as ``None`` (or their name); using them in shape arithmetic
    (``x.size(0)``, ``x.shape[0] * 2``) is recorded, never baked in.

    Example:
        >>> import torch, torchgraph as tg
        >>> x = tg.Input(shape=(3, 32, 32))
        >>> x.shape
        (None, 3, 32, 32)
        >>> y = torch.nn.Conv2d(3, 8, 3)(x).flatten(1)
        >>> y.shape, y.dtype
        ((None, 7200), torch.float32)
    """

    # Populated by recording.py (kept there to keep this module free of dispatch logic).
    @staticmethod
    def __new__(cls, value: Value | None = None, shadow: torch.Tensor | None = None):
        probe = shadow if shadow is not None else value.probes[0]
        self = torch.Tensor._make_wrapper_subclass(
            cls, probe.shape, dtype=probe.dtype, device="meta", requires_grad=False
        )
        self._tg_value = value      # None for a shadow (a value inside a module's forward)
        self._tg_shadow = shadow    # the probe a shadow stands for
        return self

    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from .recording import dispatch

        return dispatch(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise GraphBuildError(
            f"torchgraph: '{func}' reached a symbolic tensor below the torch function layer (torch "
            "function handling was disabled around it). Call this code inside an nn.Module, or on "
            "real tensors."
        )

    def __iter__(self):
        from .recording import dispatch

        return dispatch(torch.Tensor.__iter__, (self,), {})

    @property
    def static_shape(self) -> tuple:
        """The shape as plain data: ints for static dims, ``None`` (or the dim's name) for dynamic ones.

        Unlike ``x.shape``, whose dynamic entries are recorded when used in shape arithmetic, this
        is for inspection (tests, printing, deciding layer sizes).
        """
        if self._tg_value is None:
            return tuple(self._tg_shadow.shape)
        return self._tg_value.shape

    def __reduce_ex__(self, protocol):
        raise TypeError("a SymbolicTensor cannot be pickled: it only exists while building a model")

    def __deepcopy__(self, memo):
        return self


class SymbolicShape(tuple):
    """``x.shape`` of a symbolic tensor: ints for static dims, :class:`SymbolicInt` for dynamic ones."""

    def __repr__(self) -> str:
        return "(" + ", ".join("None" if isinstance(d, SymbolicInt) else repr(d) for d in self) + (
            ",)" if len(self) == 1 else ")")

    def numel(self):
        out = 1
        for d in self:
            out = out * d
        return out


class SymbolicInt(torch.Tensor):
    """A dynamic size (``x.size(0)``) or arithmetic on one: recorded, never a fixed number.

    Passing it where torch expects an int (``x.view(x.size(0), -1)``, ``torch.zeros(n, 4)``) is
    recorded. ``int()``, ``bool()`` and comparisons raise: the value is only known when the model runs.
    (It is a 0-d tensor subclass only so that torch's argument parser accepts it in int positions.)
    """

    @staticmethod
    def __new__(cls, value: Value):
        self = torch.Tensor._make_wrapper_subclass(cls, (), dtype=torch.int64, device="meta")
        self._tg_value = value
        self._tg_shadow = None
        return self

    # Same dispatch as SymbolicTensor's (recording.py tells the two apart).
    __init__ = SymbolicTensor.__init__
    __torch_function__ = SymbolicTensor.__dict__["__torch_function__"]
    __torch_dispatch__ = SymbolicTensor.__torch_dispatch__

    def __repr__(self) -> str:
        return "SymbolicInt(dynamic)"

    __str__ = __repr__

    def __format__(self, spec) -> str:
        return format(repr(self), spec)

    def _binary(self, op, other, reverse=False):
        from .recording import record_int_op

        args = (other, self) if reverse else (self, other)
        return record_int_op(op, args)

    def __add__(self, o): return self._binary(operator.add, o)
    def __radd__(self, o): return self._binary(operator.add, o, True)
    def __sub__(self, o): return self._binary(operator.sub, o)
    def __rsub__(self, o): return self._binary(operator.sub, o, True)
    def __mul__(self, o): return self._binary(operator.mul, o)
    def __rmul__(self, o): return self._binary(operator.mul, o, True)
    def __floordiv__(self, o): return self._binary(operator.floordiv, o)
    def __rfloordiv__(self, o): return self._binary(operator.floordiv, o, True)
    def __mod__(self, o): return self._binary(operator.mod, o)
    def __neg__(self): return self._binary(operator.mul, -1)

    def _refuse(self, what: str):
        raise GraphBuildError(
            f"{what} of a dynamic size: its value is only known when the model runs (the batch "
            "dim and dims declared None are dynamic). Use it directly in shape arguments "
            "(x.view(x.size(0), -1)), or compute it inside an nn.Module's forward."
        )

    def __int__(self): self._refuse("int()")
    def __index__(self): self._refuse("Using as a Python int (int(), range(), slicing a real tensor)")
    def __bool__(self): self._refuse("bool()")
    def __float__(self): self._refuse("float()")
    def __eq__(self, o): self._refuse("Comparing (==)")
    def __ne__(self, o): self._refuse("Comparing (!=)")
    def __lt__(self, o): self._refuse("Comparing (<)")
    def __le__(self, o): self._refuse("Comparing (<=)")
    def __gt__(self, o): self._refuse("Comparing (>)")
    def __ge__(self, o): self._refuse("Comparing (>=)")
    def __hash__(self): return id(self)
    def __reduce_ex__(self, protocol):
        raise TypeError("a SymbolicInt cannot be pickled: it only exists while building a model")
    def __deepcopy__(self, memo): return self


def Input(shape, dtype: torch.dtype = torch.float32, name: str | None = None) -> SymbolicTensor:
    """A placeholder for one model input.

    Args:
        shape (tuple): the shape of one sample, without the batch dim (which is always dynamic).
            ``None`` marks another dynamic dim (a sequence length, an image side); a string names a
            dynamic dim, and inputs that use the same name must agree on it.
        dtype (torch.dtype): the input's dtype (``torch.long`` for token ids).
        name (str): the input's name: the argument name of the model's ``forward`` and the ONNX
            input name. Defaults to ``input_1``, ``input_2``, ... in the model.

    Returns:
        SymbolicTensor: with shape ``(None, *shape)``.

    Example:
        >>> import torch, torchgraph as tg
        >>> tokens = tg.Input(shape=(None,), dtype=torch.long, name="tokens")
        >>> tokens.shape, tokens.dtype
        ((None, None), torch.int64)
    """
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)):
        raise GraphBuildError(
            f"tg.Input: shape must be a tuple of ints (None for dynamic dims), without the batch "
            f"dim. Received shape={shape!r} of type {type(shape).__name__}."
        )
    if not isinstance(dtype, torch.dtype):
        raise GraphBuildError(f"tg.Input: dtype must be a torch.dtype; received dtype={dtype!r}.")
    if name is not None:
        from .naming import check_identifier

        check_identifier(name, "tg.Input: name (a forward() argument)")
    dims: list = [BATCH]
    for d in shape:
        if d is None or isinstance(d, str):
            dims.append(_new_dynamic_dim(d))
        elif isinstance(d, int) and not isinstance(d, bool) and d >= 0:
            dims.append(d)
        else:
            raise GraphBuildError(
                f"tg.Input: every dim must be a non-negative int, None (dynamic) or a name; "
                f"received shape={tuple(shape)!r}."
            )
    probes = tuple(
        torch.empty([d if isinstance(d, int) else d.probes[k] for d in dims], dtype=dtype, device="meta")
        for k in (0, 1)
    )
    record = Record("placeholder", name)
    return SymbolicTensor(Value(record, (), probes))
