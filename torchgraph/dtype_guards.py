"""Branches on ``x.dtype`` / ``x.device`` in a build: recorded checks that the branch still holds.

At the top level of a build (and in the code ``tg.from_module`` records), ``x.dtype`` and ``x.device`` are
stand-ins (NOTE: [Device and dtype stand-ins] in ``symbolic.py``). Passed to torch they are recorded; but
a comparison (``if x.dtype == torch.float16:``, ``x.dtype in (torch.float16, torch.bfloat16)``,
``x.device.type == "cpu"``) must give Python a real ``bool`` now, so the recorded model follows the
build's branch. Here such an answer also records a check, :func:`check_branch`, that the model runs
with a dtype or device that gives the same answer; after ``model.to(torch.float16)`` a model built in
float32 then raises a clear error instead of silently taking float32's branch (NOTE: [Dtype guards]).

Design constraints:

- Exact answers only: the check repeats the comparison the code made (``x.dtype == torch.float16`` was
  False), so ``model.to(torch.bfloat16)`` of a model that only asks "float16?" keeps working.
- Only comparisons made by model code are checked; torch's and torchgraph's own code comparing a
  stand-in (``torch.autocast(device_type=x.device.type)``, a layer created with ``dtype=x.dtype``)
  decides nothing the model computes.
- :func:`check_branch` may be named by a config (an untrusted file): it takes a real dtype or device,
  one attribute from a fixed list, plain operands, and a message, and does nothing else.

Example:
    >>> import torch, torch.nn as nn, torchgraph as tg
    >>> x = tg.Input(shape=(4,))
    >>> h = nn.Linear(4, 4)(x)
    >>> model = tg.Model(x, h.clamp(-1, 1) if h.dtype == torch.float16 else h)
    >>> "check_branch" in model.code
    True
    >>> model(torch.ones(2, 4)).shape
    torch.Size([2, 4])
    >>> try:
    ...     model.half()(torch.ones(2, 4, dtype=torch.float16))
    ... except RuntimeError as error:
    ...     print("now runs with the dtype torch.float16" in str(error))
    True
"""

from __future__ import annotations

import linecache
import os
import re
import sys

import torch
import torch.fx

from .messages import frame_line
from .sizes import standin_value
from .symbolic import Record, Value, _StandIn

__all__ = ["ATTRIBUTES", "GuardedStr", "check_branch", "guard_attribute", "guard_comparison", "guard_hash"]

# Attributes of a dtype / device whose value is checked when model code reads it (NOTE: [Dtype guards]).
ATTRIBUTES = {
    torch.dtype: ("is_floating_point", "is_complex", "is_signed", "itemsize"),
    torch.device: ("type", "index"),
}
_OPERAND_TYPES = (torch.dtype, torch.device, str, int, float, bool, type(None))
_EXACT_OPERAND_TYPES = frozenset(_OPERAND_TYPES)

_PKG_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


# NOTE: [Dtype guards]
# Where a stand-in's answer becomes Python control flow: `==` / `!=` (`if`, `and`, and `in` on a list or
# tuple, which calls `==`), `hash()` (a dict or set lookup: `{torch.float16: 1e-4}[x.dtype]`), and the
# attributes forwarded to the real value (`x.dtype.is_floating_point`, `x.device.type`). Each of them
# answers for the build value, as before, and records
#     check_branch(getattr(x, "dtype"), attribute, operand, answer, message)
# an effect record (NOTE: [Effects] in collecting.py) that every model reading `x` contains, like the
# `torch._assert` of a size guard (NOTE: [Guards] in sizes.py). When the model runs it repeats the
# comparison on the dtype it runs with and raises if the answer changed. What is checked:
#   * `x.dtype == other` / `!=`: that comparison, exactly (`other` a real dtype, or another stand-in,
#     then read when the model runs too). `x.dtype == x.dtype` (one tensor) needs no check;
#   * `hash(x.dtype)`: the dtype itself (a lookup result is baked in for that dtype);
#   * `x.dtype.is_floating_point`, `.is_signed`, `.itemsize`, `x.device.index`: the value read;
#     `x.device.type` is a `str` whose `==` / `hash` are checked the same way, so the common
#     `x.device.type != "mps"` stays true after `model.to("cuda")`.
# Not checked: comparisons made by torch's or torchgraph's own code (the innermost frame outside the
# stand-ins is theirs): a layer created with `dtype=x.dtype`, `torch.autocast(device_type=...)`.
# A check costs a getattr, a comparison and a Python call per model call; identical checks on one
# tensor are recorded once (HuggingFace compares each layer's hidden states: T5's 2-layer encoder of
# scripts/sweep_transformers.py has 7 checks, ViT 1, LLaMA and BERT none). A real dtype compared with a stand-in that is a parameter's dtype follows that
# parameter (NOTE: [Dtypes of parameters]). Known limits: `x.dtype is torch.float16` cannot be
# intercepted (always False, as with torch.fx proxies); top-level code (no `self` module) comparing with
# `layer.weight.dtype` is checked against the weight's build dtype, so after `model.to(torch.float16)`
# it raises although eager would agree (loud, never silent); a branch on a real parameter's dtype alone
# (`if self.weight.dtype in [...]`, T5LayerNorm) involves no stand-in and cannot be checked at all.
# torch.onnx export and torch.compile run check_branch on the real dtype at export / trace time (a
# constant check: the exported graph has no node for it, as for torch._assert of size guards).


def _model_frame():
    """The frame of the code that made the comparison, or None when torch's or torchgraph's own code did."""
    f = sys._getframe(2)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_PKG_DIR):
        f = f.f_back
    if f is None or os.path.abspath(f.f_code.co_filename).startswith(_TORCH_DIR):
        return None
    return f


def _describe(frame, what: str) -> str:
    where, source = frame_line(frame)
    return f"`{source}` ({where})" if source else f"{what} at {where}"


def _real(o):
    return o.value if isinstance(o, _StandIn) else o


def _record(standin, attribute, operand, answer: bool, frame, follow_parameters: bool = True) -> None:
    """Record ``check_branch`` for a stand-in read by model code (once per tensor and question)."""
    if isinstance(operand, _StandIn) and attribute is None and operand._tg_tensor is standin._tg_tensor:
        return  # x.dtype == x.dtype
    if not isinstance(_real(operand), _OPERAND_TYPES):
        return  # compared with something that is never a dtype or device (False, and stays False)
    kind = "dtype" if standin._attr == "dtype" else "device"
    shown = standin.value if attribute is None else getattr(standin.value, attribute)
    what = f"the {kind}{'' if attribute is None else '.' + attribute}"
    message = (f"torchgraph: {_describe(frame, 'a comparison of ' + what)} branched on {what} when the model was "
               f"built: it was {shown!r}, {'equal' if answer else 'not equal'} to {_real(operand)!r}")
    if isinstance(operand, _StandIn):
        operand_arg = standin_value(operand)
    elif isinstance(operand, torch.dtype) and attribute is None and follow_parameters:
        operand_arg = _parameter_dtype(frame, operand)  # NOTE: [Dtypes of parameters]
    else:
        operand_arg = operand
    record = Record("call_function", check_branch,
                    (standin_value(standin), attribute, operand_arg, answer, message))
    _add(record, [standin] + ([operand] if isinstance(operand, _StandIn) else []))


# NOTE: [Dtypes of parameters] transformers' ViT and DeiT begin with `expected_dtype =
# self.embeddings.patch_embeddings.projection.weight.dtype; if pixel_values.dtype != expected_dtype:`.
# A parameter's dtype is a real torch.dtype, indistinguishable from the literal `torch.float32`, yet after
# `model.to(torch.bfloat16)` (or tg.optimize(..., dtype=torch.bfloat16)) eager compares with bfloat16,
# not float32. So a real dtype that model code compares with, that is not written as a literal on that
# line (`torch.float32`, `torch.float`), and that is the dtype of a parameter or buffer of the module
# whose code compares (`self`), is recorded as that parameter's `getattr(weight, "dtype")`: the check
# then follows the parameters as eager code does. A literal dtype, or a variable with no such
# parameter (`dt = torch.float32` at the top level), stays a constant.

def _parameter_dtype(frame, dtype: torch.dtype):
    """``getattr(p, "dtype")`` (a recorded value) of a parameter or buffer of ``self`` with ``dtype``, or ``dtype``."""
    module = frame.f_locals.get("self")
    if not isinstance(module, torch.nn.Module) or _written_in(frame, dtype):
        return dtype
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.dtype == dtype and type(tensor) in (torch.Tensor, torch.nn.Parameter):
            record = Record("call_function", getattr, (tensor, "dtype"))
            record.out = Value(record, (), (dtype, dtype))
            return record.out
    return dtype


def _written_in(frame, dtype: torch.dtype) -> bool:
    """Whether the frame's source line names ``dtype`` literally (``torch.float32`` or ``torch.float``)."""
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    names = [name for name in dir(torch) if getattr(torch, name, None) is dtype]  # float32 and float
    return any(re.search(rf"\btorch\.{name}\b", line) for name in names)


def _add(record, standins) -> None:
    """Make ``record`` an effect of the tensors the stand-ins were read from, unless they have it already."""
    record.effect = "guard"
    key = _key(record)
    tensors = [s._tg_tensor for s in standins]
    if any(_key(effect) == key for effect in tensors[0].effects or () if effect.target is check_branch):
        return
    for tensor in tensors:
        tensor.add_effect(record)


def _key(record) -> tuple:
    """What a check asks, without its message: identical checks on one tensor are recorded once."""
    read, attribute, operand, answer, _ = record.args
    if isinstance(operand, Value):  # another stand-in's getattr(y, "dtype")
        operand = ("stand-in", operand.record.args[1], id(operand.record.args[0]))
    else:
        operand = (type(operand).__name__, repr(operand))
    return (read.record.args[1], id(read.record.args[0]), attribute, operand, answer)


def guard_comparison(standin, other) -> bool:
    """``standin == other``, answered for the build value; model code's answer is checked when the model runs."""
    answer = standin.value == _real(other)
    frame = _model_frame()
    if frame is not None:
        _record(standin, None, other, bool(answer), frame)
    return answer


def guard_hash(standin) -> int:
    """``hash(standin)``: model code looking a dtype up in a dict or set is checked to run with that dtype."""
    frame = _model_frame()
    if frame is not None:
        _record(standin, None, standin.value, True, frame, follow_parameters=False)
    return hash(standin.value)


def guard_attribute(standin, name: str):
    """``standin.<name>`` of the build value; an attribute in :data:`ATTRIBUTES` read by model code is checked."""
    value = getattr(standin.value, name)
    if name not in ATTRIBUTES[type(standin.value)]:
        return value
    if name == "type":
        return GuardedStr(value, standin)
    frame = _model_frame()
    if frame is not None:
        _record(standin, name, value, True, frame)
    return value


class GuardedStr(str):
    """``x.device.type`` at the top level: a plain ``str`` whose ``==`` and ``hash`` in model code are checked."""

    def __new__(cls, value: str, standin):
        self = super().__new__(cls, value)
        self._tg_standin = standin
        return self

    def __eq__(self, other):
        answer = str.__eq__(str(self), other)
        frame = _model_frame()
        if frame is not None and answer is not NotImplemented:
            _record(self._tg_standin, "type", str(other), answer, frame)
        return answer

    def __ne__(self, other):
        answer = self.__eq__(other)
        return answer if answer is NotImplemented else not answer

    def __hash__(self):
        frame = _model_frame()
        if frame is not None:
            _record(self._tg_standin, "type", str(self), True, frame)
        return str.__hash__(self)

    def __reduce_ex__(self, protocol):
        return (str, (str(self),))


@torch.fx.node.has_side_effect
def check_branch(actual, attribute: str | None, operand, answer: bool, message: str) -> None:
    """Raise when the dtype or device a model runs with no longer gives the answer its build branched on.

    Recorded by ``if x.dtype == torch.float16:`` (and ``in``, ``!=``, ``x.device.type == "cpu"``...) at
    the top level of a build: NOTE: [Dtype guards].

    Args:
        actual (torch.dtype | torch.device): ``x.dtype`` / ``x.device`` of the running model.
        attribute (str | None): the attribute of ``actual`` that was read (``"type"``), or None.
        operand: what it was compared with (a dtype, a device, a str, a number or None).
        answer (bool): whether ``actual[.attribute] == operand`` was true at build time.
        message (str): the start of the error: the source line and the build value.

    Example:
        >>> import torch
        >>> check_branch(torch.float32, None, torch.float16, False, "built in float32")
        >>> check_branch(torch.device("cpu"), "type", "cpu", True, "built on the CPU")
    """
    kind = type(actual)
    if kind in ATTRIBUTES and type(operand) in _EXACT_OPERAND_TYPES and type(answer) is bool and (
            attribute is None or attribute in ATTRIBUTES[kind]) and type(message) is str:  # the model runs
        read = actual if attribute is None else getattr(actual, attribute)
        if (read == operand) == answer:
            return None
        _raise(kind, read, attribute, operand, answer, message)
    if isinstance(actual, torch.fx.Proxy) or isinstance(operand, torch.fx.Proxy):  # torch.fx retracing
        tracer = (actual if isinstance(actual, torch.fx.Proxy) else operand).tracer
        return tracer.create_proxy("call_function", check_branch, (actual, attribute, operand, answer, message), {})
    kind = type(_real(actual))
    if kind not in ATTRIBUTES or not (attribute is None or attribute in ATTRIBUTES[kind]) or not isinstance(
            answer, bool) or not isinstance(message, str) or not isinstance(_real(operand), _OPERAND_TYPES) or (
            isinstance(operand, _StandIn) and not isinstance(actual, _StandIn)) or not isinstance(actual, _StandIn):
        raise TypeError(
            "torchgraph.check_branch: invalid arguments. Expected a torch.dtype or torch.device read from the "
            f"model, an attribute in {ATTRIBUTES.get(kind, ())} or None, a plain operand, a bool and a message; "
            f"received {type(actual).__name__}, {attribute!r:.40}, {type(operand).__name__}, {answer!r:.20}, "
            f"{type(message).__name__}. Check that the file was written by tg.save.")
    _replayed(actual, attribute, operand, answer, message)  # a config replayed (tg.load, from_config)
    return None


def _raise(kind, read, attribute, operand, answer: bool, message: str):
    what = f"the {'dtype' if kind is torch.dtype else 'device'}{'' if attribute is None else '.' + attribute}"
    raise RuntimeError(
        f"{message}; the model now runs with {what} {read!r}, {'not ' if answer else ''}equal to {operand!r}, so "
        "that line would take the other branch. The recorded model follows the build's branch, so it would "
        f"silently compute something other than eager PyTorch. Expected {what} to be {'' if answer else 'not '}"
        f"equal to {operand!r} as at build time; received {read!r}. Fix: build the model in the dtype and on the "
        "device it will run with (tg.Input(..., dtype=torch.float16), tg.from_module(module.half(), ...)), "
        "compute the branch inside an nn.Module's forward (it runs eagerly), or pass the dtype to torch "
        "functions (x.to(...)) instead of comparing it.")


def _replayed(standin, attribute, operand, answer, message) -> None:
    """A check read back from a config: recorded again as it was (its message already names the line)."""
    operand_arg = standin_value(operand) if isinstance(operand, _StandIn) else operand
    record = Record("call_function", check_branch, (standin_value(standin), attribute, operand_arg, answer, message))
    _add(record, [standin] + ([operand] if isinstance(operand, _StandIn) else []))
