"""Checks that a recording of ``tg.from_module`` is faithful to the module's eager forward.

Two things a recording cannot hold are detected here, so that the submodule responsible stays one
opaque layer instead of becoming a silently different graph:

- state changed eagerly: a looked-through forward that updates its own buffer outside any
  operation on the inputs (``self.steps += 1``);
- train/eval differences: the forward is recorded in both modes, and what each scope recorded is
  compared (``F.dropout(x, training=self.training)``, ``if self.training:``, random constants).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn as nn

from .mode_dropout import mode_parts, same_call
from .symbolic import SymbolicInt, SymbolicTensor, Value
from .trees import tree_leaves

__all__ = ["snapshot_state", "changed_state", "records_in_order", "signature", "differing_scopes"]


def snapshot_state(modules):
    """Own parameters/buffers of ``modules``: ``(owner, name, tensor, version, copy of a buffer)``."""
    out = []
    for module in modules:
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                out.append((module, name, t, t._version, t.detach().clone() if name in module._buffers else None))
    return out


def changed_state(snapshot) -> list[tuple[nn.Module, str]]:
    """Restore what a recording changed eagerly (outside recorded operations); return its owners."""
    changed = []
    with torch.no_grad():
        for module, name, t, version, saved in snapshot:
            if t._version == version:
                continue
            if saved is not None and not torch.equal(t, saved):
                t.copy_(saved)
            elif saved is not None:
                continue
            changed.append((module, name))
    return changed


def records_in_order(outputs) -> list:
    """The records the outputs depend on, in recording order."""
    stack = [leaf._tg_value for _, leaf in tree_leaves(outputs)
             if isinstance(leaf, (SymbolicTensor, SymbolicInt)) and leaf._tg_value is not None]
    records: dict[int, Any] = {}
    while stack:
        r = stack.pop().record
        if id(r) in records:
            continue
        records[id(r)] = r
        stack.extend(leaf for _, leaf in tree_leaves((r.args, r.kwargs)) if isinstance(leaf, Value))
    return sorted(records.values(), key=lambda r: r.seq)


def signature(records: list, paths: dict[int, str], tensor_keys: dict[int, str],
              modes: dict[str, bool] | None = None) -> dict[str, list]:
    """Per scope, what each record does, in a form comparable between two recordings.

    ``modes`` (module path -> its mode in that recording) sets a functional dropout's ``training``
    and ``p`` and SDPA's ``dropout_p`` apart, to tell a call that follows the mode (NOTE:
    [Mode-following dropout as a layer]).
    """
    where: dict[int, tuple[str, int]] = {}
    per_scope: dict[str, list] = {}

    def key(o):
        if isinstance(o, Value):
            r = o.record
            return ("value", where.get(id(r), ("input", r.target)), o.path)
        if isinstance(o, torch.Tensor):
            known = tensor_keys.get(id(o))
            if known is not None:
                return ("tensor", known)
            data = o.detach()
            digest = (hashlib.sha1(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()  # reshape: 0-d too
                      if data.device.type == "cpu" and data.numel() <= 1 << 20 and not data.is_complex()
                      and data.dtype != torch.bfloat16 else None)
            return ("constant", tuple(data.shape), data.dtype, digest)
        if isinstance(o, (list, tuple)):
            return (type(o).__name__, tuple(key(x) for x in o))
        if isinstance(o, dict):
            return ("dict", tuple((k, key(v)) for k, v in o.items()))
        if isinstance(o, slice):
            return ("slice", key(o.start), key(o.stop), key(o.step))
        if isinstance(o, (int, float, bool, str, type(None), torch.dtype, torch.device)):
            return o
        return (type(o).__name__, repr(o)[:200])

    for r in records:
        if r.op == "placeholder":
            continue
        target = paths.get(id(r.target), id(r.target)) if r.op == "call_module" else (
            r.target if isinstance(r.target, str) else id(r.target))
        entries = per_scope.setdefault(r.scope, [])
        parts = mode_parts(r, modes[r.scope]) if modes is not None and r.scope in modes else None
        if parts is not None:
            args, kwargs, mode = parts
            entries.append((r.op, target, key(args), key(kwargs), mode))
        else:
            entries.append((r.op, target, key(r.args), key(r.kwargs)))
        where[id(r)] = (r.scope, len(entries) - 1)
    return per_scope


def differing_scopes(first: dict, second: dict) -> list[str]:
    """The innermost scopes whose records differ between two signatures (a dropout that follows the
    mode does not differ), sorted; ``""`` (the root) only when no other scope differs."""
    differing = [s for s in set(first) | set(second) if not _same(first.get(s), second.get(s))]
    # NOTE: [Innermost first] A parent often differs only because a child's operations did: its
    # records name the child's values by their place in the child's records, which moves when the
    # child records a different number of operations in each mode (`h * 0.5 if self.training else h`).
    # So only the innermost differing scopes are returned (the root too: "" is above every scope);
    # once they are opaque layers, the next recording tells whether their parents differ themselves.
    return sorted(s for s in differing if not any(o != s and _inside(o, s) for o in differing))


def _inside(scope: str, parent: str) -> bool:
    return parent == "" or scope.startswith(parent + ".")


def _same(first: list | None, second: list | None) -> bool:
    if first is None or second is None or len(first) != len(second):
        return first == second
    return all(same_call(a, b) for a, b in zip(first, second))
