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
        self.log = log  # [(kind, name, result, (args, kwargs), independent)], kind "op", "const" or "meta"
        self.roots = roots          # id(shadow) -> the input Value it is (a view of); run 0 only
        self.inputs: dict[int, SymbolicTensor] = {}  # id(shadow) -> the shadow of an input (run 0)
        self.mutated: dict[int, Value] = {}
        self.independent: set[int] = set()  # ids of the shadows computed without the call's inputs (logged)
        self.prefix = 0  # how many entries the log starts with that do not depend on the inputs

    def execute(self, func, args, kwargs):
        name = func_name(func)
        if name == "__iter__":  # iterate like a tensor: over dim 0, as shadows
            return iter(self.execute(torch.Tensor.unbind, (args[0], 0), {}))
        out, u_args, u_kwargs = self.ctx.run(func, args, kwargs)
        if name in _METADATA:
            if self.log is not None:
                self._log(("meta", name, None, None), self._independent(args, kwargs))
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
            independent = self._independent(args, kwargs)
            self._note(result, independent)
            self._log(("op", name, result, (args, kwargs)), independent)
        return result

    def const(self, func, name: str, args, kwargs):
        """A call without symbolic arguments inside the forward: computed on probes, as shadows."""
        out, _, _ = self.ctx.run(func, args, kwargs)
        real = self.ctx.real
        result = tree_map(lambda t: SymbolicTensor(None, shadow=t if real else to_meta(t))
                          if isinstance(t, torch.Tensor) else t, out)
        if self.log is not None:
            self._note(result, True)
            self._log(("const", name, result, (args, kwargs)), True)
        return result

    # NOTE: [Independent calls] The original forward runs for real every call it makes before the one
    # that opens its scope: calls that take no symbolic tensor, and then calls on their results
    # (`torch.arange(4).float() * 2`), which in a shadow run are operations on shadows. Each entry
    # says whether it depends on the call's inputs; the log's `prefix` counts the independent entries
    # it starts with, which the replay steps over (NOTE: [Opening call] in scope_replay.py). A real
    # tensor made that way may be used after the scope opened (`self.inv_freq[None, :, None].float()`
    # under tg.load, then `.expand(x.shape[0], -1, 1)`): a call on it without a symbolic tensor
    # replays an independent "op" of the log.

    def _independent(self, args, kwargs) -> bool:
        if not self.independent:  # the common case: nothing made from constants yet (execute's args hold a shadow)
            return False
        return all(id(leaf) in self.independent for _, leaf in tree_leaves((args, kwargs))
                   if isinstance(leaf, SymbolicTensor))

    def _note(self, result, independent: bool) -> None:
        if not independent and not self.independent:
            return
        for _, leaf in tree_leaves(result):
            if isinstance(leaf, SymbolicTensor):
                if independent:
                    self.independent.add(id(leaf))
                else:  # an in-place op with an input-dependent argument returns its target
                    self.independent.discard(id(leaf))

    def _log(self, entry: tuple, independent: bool) -> None:
        if independent and self.prefix == len(self.log):
            self.prefix += 1
        self.log.append((*entry, independent))

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

