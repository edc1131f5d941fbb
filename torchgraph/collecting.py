"""Collecting a model's records: what its outputs need, walking back to its inputs, plus effects.

``tg.Model(inputs, outputs)`` starts from the values its outputs hold and follows each record's
arguments back until it reaches the given inputs. A placeholder that is not among them makes the
graph disconnected (a :class:`~torchgraph.errors.GraphBuildError` naming that input). The model also
keeps the *effects* its values bring in, in-place mutations and guards (NOTE: [Effects]), as eager
code would perform them.
"""

from __future__ import annotations

import torch

from .errors import GraphBuildError
from .symbolic import Record, SymbolicTensor, Value, format_shape
from .trees import tree_leaves

__all__ = ["check_symbolic", "collect_records"]


def check_symbolic(items: list, what: str) -> list[Value]:
    """The values of ``inputs`` (what each tensor was created as) or ``outputs`` (what it holds now)."""
    values = []
    for i, t in enumerate(items):
        if not isinstance(t, SymbolicTensor):
            raise GraphBuildError(
                f"tg.Model: all `{what}` must be symbolic tensors (from tg.Input, or layers called on "
                f"them). Received {what}[{i}] of type {type(t).__name__}"
                + (f" with shape {tuple(t.shape)}: a real tensor" if isinstance(t, torch.Tensor) else "")
                + "."
            )
        if t._tg_value is None:
            raise GraphBuildError(f"tg.Model: {what}[{i}] is an internal value of a module's forward.")
        values.append(t._tg_origin if what == "inputs" and t._tg_origin is not None else t._tg_value)
    return values


def _describe_input(value: Value) -> str:
    n = value.record.target
    shape = format_shape(value.dims)
    return f"Input '{n}' {shape}" if n else f"an unnamed Input of shape {shape}"


# NOTE: [Effects]
# A model is what its outputs need, plus the *effects* that eager code would also perform:
#   * mutations: an in-place op, or a module call that mutates an input in place (nn.ReLU(inplace=
#     True), a forward doing x.add_(1)). Registered on the value whose storage they change (`base`:
#     through views), they are kept whenever the model contains that storage -- as an input or as a
#     value it computes -- even if no output reads the result: eager code mutates the caller's input
#     tensor, and later reads of any view of it see the change. Emitting them in program order gives
#     exactly eager's results. A mutation that needs a tensor not computable from `inputs` makes the
#     graph disconnected, as any other need would.
#   * guards: checks recorded by `assert T <= 512` (NOTE: [Guards] in sizes.py), kept when every value
#     they read is computable from the model's inputs.

def collect_records(output_values: list[Value], input_values: list[Value]) -> tuple[list[Record], set]:
    """The records the outputs need, plus effects, in program order; and the ids of the inputs used."""
    inputs = {id(v) for v in input_values}
    used: set[int] = set()
    records: dict[int, Record] = {}
    seen_values: set[int] = set()
    computable: dict[int, bool] = {}
    stack = list(output_values)
    effect_bases = list(input_values)
    while stack or effect_bases:
        if not stack:
            stack.extend(_effects_of(effect_bases.pop(), records, input_values, computable))
            continue
        v = stack.pop()
        if id(v) in seen_values:
            continue
        seen_values.add(id(v))
        effect_bases.append(v)
        if id(v) in inputs:
            used.add(id(v))
            continue
        r = v.record
        if r.op == "placeholder":
            given = ", ".join(_describe_input(iv) for iv in input_values) or "none"
            raise GraphBuildError(
                f"Graph disconnected: the outputs depend on {_describe_input(v)}, which is not among the "
                f"model's inputs (given: {given}). Add it to `inputs`, or build the outputs from the given "
                "inputs only."
            )
        if id(r) in records:
            continue
        records[id(r)] = r
        for _, leaf in tree_leaves((r.args, r.kwargs)):
            if isinstance(leaf, Value):
                stack.append(leaf)
    return sorted(records.values(), key=lambda r: r.seq), used


def _effects_of(value: Value, records: dict, input_values: list[Value], computable: dict) -> list[Value]:
    """The argument values of effect records not yet in the model that ``value`` brings in."""
    out = []
    for holder in {id(value): value, id(value.base): value.base}.values():
        for effect in holder.effects or ():
            if id(effect) in records:
                continue
            if effect.effect == "guard" and not _computable(effect, {id(v) for v in input_values}, computable):
                continue
            records[id(effect)] = effect
            out.extend(leaf for _, leaf in tree_leaves((effect.args, effect.kwargs)) if isinstance(leaf, Value))
    return out


def _computable(record: Record, inputs: set, memo: dict) -> bool:
    """Whether every placeholder ``record`` depends on is among ``inputs`` (ids of values)."""
    stack, seen = [record], []
    while stack:
        r = stack.pop()
        known = memo.get(id(r))
        if known is False:
            return False
        if known or id(r) in seen:
            continue
        seen.append(id(r))
        if r.op == "placeholder":
            memo[id(r)] = False
            return False
        for _, leaf in tree_leaves((r.args, r.kwargs)):
            if isinstance(leaf, Value) and id(leaf) not in inputs:
                stack.append(leaf.record)
    for rid in seen:
        memo[rid] = True
    return True

