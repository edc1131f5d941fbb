"""Shadow runs: torchgraph's own runs of a module's forward on probe 0 and probe 1.

While a module call is recorded (NOTE: [Module scopes] in module_scopes.py), its forward runs once
per probe on *shadows*: symbolic tensors that hold a probe rather than a recorded value. Every
operation on a shadow lands in :meth:`ShadowRun.execute`, which computes it on the probes and returns
shadows again; run 0 also logs each operation, for the replay into the original forward
(``scope_replay.py``), and tracks which of the module's inputs the forward mutates in place.
"""

from __future__ import annotations

import torch

from .probing import ProbeContext, to_meta
from .symbolic import SymbolicTensor, Value
from .targets import _METADATA, VIEW_OPS, func_name, is_inplace
from .trees import tree_leaves, tree_map

__all__ = ["ShadowRun"]


class ShadowRun:
    """Runs inside a module's forward on probe ``k``: every op computes on probes, returns shadows."""

    def __init__(self, ctx: ProbeContext, log: list | None, roots: dict | None = None):
        self.ctx = ctx
        self.log = log
        self.roots = roots          # id(shadow) -> the input Value it is (a view of); run 0 only
        self.inputs: dict[int, SymbolicTensor] = {}  # id(shadow) -> the shadow of an input (run 0)
        self.mutated: dict[int, Value] = {}

    def execute(self, func, args, kwargs):
        name = func_name(func)
        if name == "__iter__":  # iterate like a tensor: over dim 0, as shadows
            return iter(self.execute(torch.Tensor.unbind, (args[0], 0), {}))
        out, u_args, u_kwargs = self.ctx.run(func, args, kwargs)
        if name in _METADATA:
            if self.log is not None:
                self.log.append(("meta", name, None))
            return out
        originals = {id(u): a for u, a in zip(_flat(u_args, u_kwargs), _flat(args, kwargs))
                     if isinstance(u, torch.Tensor)}

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) in originals:  # in-place ops and identity returns keep the caller's object
                return originals[id(t)]
            return SymbolicTensor(None, shadow=t)

        result = tree_map(wrap, out)
        if self.roots is not None:
            self._track_inputs(name, args, kwargs, result)
        if self.log is not None:
            self.log.append(("op", name, result))
        return result

    def const(self, func, name: str, args, kwargs):
        """A call without symbolic arguments inside the forward: computed on probes, as shadows."""
        out, _, _ = self.ctx.run(func, args, kwargs)
        real = self.ctx.real
        result = tree_map(lambda t: SymbolicTensor(None, shadow=t if real else to_meta(t))
                          if isinstance(t, torch.Tensor) else t, out)
        if self.log is not None:
            self.log.append(("const", name, result))
        return result

    def _track_inputs(self, name, args, kwargs, result):
        """Which inputs the forward mutates in place, directly or through a view (run 0 only)."""
        roots = self.roots
        target = kwargs.get("out") if "out" in kwargs else (args[0] if args else None)
        if is_inplace(name, kwargs) and isinstance(target, SymbolicTensor) and id(target) in roots:
            value = roots[id(target)]
            self.mutated[id(value)] = value
        if name in VIEW_OPS and args and isinstance(args[0], SymbolicTensor) and id(args[0]) in roots:
            value = roots[id(args[0])]
            for _, leaf in tree_leaves(result):
                if isinstance(leaf, SymbolicTensor):
                    roots[id(leaf)] = value


def _flat(args, kwargs):
    return [leaf for _, leaf in tree_leaves((args, kwargs))]

