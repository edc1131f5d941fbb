"""Symbolic handles of a built model: ``model.inputs``, ``model.outputs`` and ``model.get_output``.

A model built by ``tg.Model`` keeps the symbolic tensors it was built from, so that new models can be
built on its values (a feature extractor: ``tg.Model(model.inputs, model.get_output("conv2d_1"))``).
They are kept outside the module, in a weak table, so that pickling and deepcopy never see them; a
copied or loaded model gets them rebuilt from its graph (each node's
:class:`~torchgraph.value_spec.ValueSpec`), sharing its layers.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import GraphBuildError
from .naming import remember_name
from .symbolic import Record, SymbolicInt, SymbolicTensor, Value
from .trees import tree_leaves, tree_map
from .value_spec import ValueSpec

__all__ = ["constant_value", "handle_of", "remember_handles", "symbolic_handles"]

# model -> {"inputs": [...], "outputs": [...], "nodes": {node name: symbolic object}}
_SYMBOLIC: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def constant_value(t: torch.Tensor) -> SymbolicTensor:
    """A symbolic handle of a model's constant or parameter: operations on it are recorded.

    Rebuilding a model from a config (``replay``) uses it for ``get_attr`` nodes, so that the
    operations a ``tg.from_module`` graph performs on its parameters (``self.pos_ids[:, :n]``, a
    layer called on a buffer) are recorded again rather than computed once.
    """
    from .probing import to_meta

    record = Record("get_attr", t)
    meta = to_meta(t)
    value = Value(record, (), (meta, meta))
    record.out = value
    return SymbolicTensor(value)


def handle_of(o):
    """What a model hands out for a recorded value: a SymbolicTensor or SymbolicInt (else the probe)."""
    if isinstance(o, Value):
        if o.dims is not None:
            return SymbolicTensor(o)
        return SymbolicInt(o) if isinstance(o.probes[0], (int, float)) else o.probes[0]
    return o


def symbolic_handles(model: nn.Module) -> dict:
    """The symbolic handles of ``model``, rebuilt from its graph after a copy or a load."""
    info = _SYMBOLIC.get(model)
    if info is None:
        info = _SYMBOLIC[model] = _resymbolize(model)
    return info


def remember_handles(model: nn.Module, handles: dict) -> None:
    """Keep ``model``'s handles: ``{"inputs": [...], "outputs": [...], "nodes": {name: handle}}``."""
    _SYMBOLIC[model] = handles


def _resymbolize(model: nn.Module) -> dict:
    """Turn ``model``'s fx graph back into records and symbolic tensors (sharing its layers)."""
    env: dict[fx.Node, Any] = {}
    nodes: dict[str, Any] = {}
    inputs, outputs = [], []
    for node in model.graph.nodes:
        spec = node.meta.get("tg_spec")
        if node.op == "output":
            outs = node.args[0]
            outputs = [env[n] for _, n in tree_leaves(outs) if isinstance(n, fx.Node)]
            break
        if node.op == "placeholder":
            record = Record("placeholder", node.name)
        elif node.op == "get_attr":
            env[node] = _get_attr(model, node.target)
            continue
        else:
            def resolve(a):
                if isinstance(a, fx.Node):
                    obj = env[a]
                    return obj._tg_value if isinstance(obj, (SymbolicTensor, SymbolicInt)) else obj
                return a
            args = tree_map(resolve, node.args)
            kwargs = tree_map(resolve, dict(node.kwargs))
            target = node.target
            if node.op == "call_module":
                target = model.get_submodule(node.target)
                remember_name(target, node.target)
            record = Record(node.op, target, tuple(args), kwargs)
        effect = node.meta.get("tg_effect")
        if spec is None and effect is None:
            raise GraphBuildError(f"node '{node.name}' has no torchgraph shape information (was the graph "
                                  "edited by hand? run tg.Model on the edited model's inputs/outputs).")

        def make(path, s):
            if isinstance(s, ValueSpec):
                return handle_of(s.to_value(record, path))
            return s
        obj = _map_spec(make, spec)
        record.out = tree_map(lambda o: o._tg_value if isinstance(o, (SymbolicTensor, SymbolicInt)) else o, obj)
        if effect is not None:
            _register_effect(record, effect)
        env[node] = obj
        nodes[node.name] = obj
        if node.op == "placeholder":
            inputs.append(obj)
    return {"inputs": inputs, "outputs": outputs, "nodes": nodes}


def _register_effect(record: Record, effect: str) -> None:
    """Make a rebuilt record an effect again (NOTE: [Effects] in collecting.py); a mutation counts for
    all its inputs."""
    from .sizes import _tensor_sources

    record.effect = effect
    for _, leaf in tree_leaves((record.args, record.kwargs)):
        if isinstance(leaf, Value):
            holders = _tensor_sources(leaf) if effect == "guard" else ([leaf.base] if leaf.dims else [])
            for holder in holders:
                holder.add_effect(record)


def _map_spec(fn, spec, path=()):
    if isinstance(spec, ValueSpec):
        return fn(path, spec)
    if isinstance(spec, (list, tuple)):
        return type(spec)(_map_spec(fn, s, path + (i,)) for i, s in enumerate(spec))
    if isinstance(spec, dict):
        return {k: _map_spec(fn, s, path + (k,)) for k, s in spec.items()}
    return spec


def _get_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
