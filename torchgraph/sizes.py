"""Dynamic sizes at the top level: arithmetic on them, conditions on them (guards), and stand-ins.

``x.size(1)`` of a dynamic dim is a :class:`~torchgraph.symbolic.SymbolicInt`; arithmetic on it is
recorded here as ``call_function`` records on plain ``operator`` functions, so ``x.size(1) * 2`` is
emitted as ``mul = size * 2``. A comparison gives a symbolic condition, and ``bool()`` of a
condition is a *guard* (see NOTE: [Guards]).
"""

from __future__ import annotations

import operator

import torch

from .errors import GraphBuildError
from .symbolic import Record, SymbolicInt, SymbolicTensor, Value, _StandIn

__all__ = ["guard", "record_int_op", "standin_value"]


def _probe(a, k: int):
    if isinstance(a, SymbolicInt):
        return a._tg_value.probes[k]
    return a


def record_int_op(op, args):
    """Arithmetic or a comparison on dynamic sizes (``x.size(0) * 2``): recorded like any function."""
    if any(isinstance(a, SymbolicTensor) or (isinstance(a, torch.Tensor) and not isinstance(a, SymbolicInt))
           for a in args):
        return NotImplemented
    probes = tuple(op(*[_probe(a, k) for a in args]) for k in (0, 1))
    from .recording import link_args

    record = Record("call_function", op, link_args(tuple(args)))
    out = SymbolicInt(Value(record, (), probes))
    record.out = out._tg_value
    return out


def _tensor_sources(value: Value) -> list[Value]:
    """The tensor values a dynamic size or condition is computed from (``x`` for ``x.size(1) > 4``)."""
    out, stack, seen = [], [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.dims is not None:
            out.append(v)
            continue
        for a in (*v.record.args, *v.record.kwargs.values()):
            if isinstance(a, Value):
                stack.append(a)
    return out


# NOTE: [Guards]
# `assert T <= block_size` or `if T > 512:` at the top level calls bool() on a symbolic condition. As
# torch.export does with guards, bool() answers from the build and records a check that the answer
# still holds when the model runs:
#   * both probe sizes give the same answer: record `torch._assert(condition, message)` (or of
#     `not condition`), an effect record that every model reading those sizes contains (NOTE:
#     [Effects] in collecting.py), and return the answer, so the rest of the user's code follows it;
#   * the probes disagree: the condition is True for some sizes and False for others, and one
#     recorded program cannot follow both branches: a GraphBuildError names the line and the fixes.
# A guard costs one comparison per call; torch.export turns it into a runtime assertion (or drops
# it when the dim's bounds already imply it).

def guard(condition: SymbolicInt) -> bool:
    from .messages import frame_line, user_frame

    value = condition._tg_value
    answers = [bool(p) for p in value.probes]
    where, source = frame_line(user_frame())
    shown = f"`{source}`" if source else "a condition"
    if answers[0] != answers[1]:
        raise GraphBuildError(
            f"{shown} (at {where}) depends on a dynamic size and has a different answer for different "
            "sizes, so one recorded model cannot follow it. Expected a condition with one answer for "
            "every size of the dynamic dims; received one that is True for some sizes and False for "
            "others. Fix: bound the dim (tg.Dim('T', max=...)) so that the answer is fixed, compute it "
            "inside an nn.Module's forward (which runs eagerly on real sizes), or use torch.where."
        )
    if not answers[0] and source.startswith("assert "):
        # NOTE: an assertion on a dynamic size that fails at both probe sizes (nanoGPT's `assert t <=
        # block_size` with an unbounded T, probed at 34..127) is almost always a dim the model only
        # accepts in a range: say so, rather than let the user's AssertionError speak for the probes.
        raise GraphBuildError(
            f"{shown} (at {where}) fails at the sizes torchgraph probes with ({_probe_sizes(value)}), "
            "stand-ins for a dynamic dim. If the model accepts only a range of sizes, declare it: "
            "tg.Dim('T', max=...) in tg.Input (nanoGPT: max=block_size), or use a fixed size. Expected "
            "an assertion that holds for every accepted size."
        )
    if isinstance(value.probes[0], bool) and answers[0]:
        checked = condition
    elif answers[0]:
        checked = record_int_op(operator.truth, (condition,))
    else:
        checked = record_int_op(operator.not_, (condition,))
    message = (f"torchgraph: the model was built where {shown} ({where}) was {answers[0]}; "
               "these inputs give the other answer.")
    record = Record("call_function", torch._assert, (checked._tg_value, message))
    record.effect = "guard"
    for source_value in _tensor_sources(value):
        source_value.add_effect(record)
    return answers[0]


def _int_sources(value: Value) -> list[Value]:
    """The sizes read from tensors (``x.size(1)``) that a condition is computed from."""
    out, stack, seen = [], [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen or v.dims is not None:
            continue
        seen.add(id(v))
        args = [a for a in (*v.record.args, *v.record.kwargs.values()) if isinstance(a, Value)]
        if any(a.dims is not None for a in args):
            out.append(v)
            continue
        stack.extend(args)
    return out


def _probe_sizes(value: Value) -> str:
    """``"51 and 98"``: the probe sizes of the dynamic sizes a condition reads."""
    sizes = []
    for source in _int_sources(value):
        pair = f"{source.probes[0]} and {source.probes[1]}"
        if pair not in sizes:
            sizes.append(pair)
    return "; ".join(sizes) or "two sizes per dynamic dim"


def standin_value(standin: _StandIn) -> Value:
    """The recorded ``getattr(x, "device")`` (or ``"dtype"``) a stand-in stands for (made once)."""
    if standin._tg_value is None:
        record = Record("call_function", getattr, (standin._tg_tensor, standin._attr))
        standin._tg_value = Value(record, (), (standin.value, standin.value))
        record.out = standin._tg_value
    return standin._tg_value
