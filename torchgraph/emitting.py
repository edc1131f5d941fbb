"""Emitting: the ``torch.fx.Graph`` of a model, from its records in program order.

:class:`GraphEmitter` gives each recorded value its node (``getitem`` nodes for the parts of a
structured output), stores each node's :class:`~torchgraph.value_spec.ValueSpec` in
``node.meta["tg_spec"]``, and turns the tensors a recorded call uses (parameters, constants) into
``get_attr`` nodes with names that do not clash with the model's layers, inputs or own attributes
(:data:`RESERVED_NAMES`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import GraphBuildError
from .naming import ILLEGAL_NAMES, first_free_name, fixed_path, tensor_name
from .symbolic import Record, Value
from .training import TrainingMixin
from .trees import tree_map
from .value_spec import ValueSpec

__all__ = ["RESERVED_NAMES", "GraphEmitter", "record_out_spec"]

# tg.Model's own attributes (model.py; tests/test_module_names.py checks that the list is complete).
_MODEL_ATTRIBUTES = frozenset({
    "meta", "inputs", "outputs", "layers", "input_names", "output_names", "get_layer", "get_output", "summary",
    "get_config", "from_config", "to_json", "_construct", "_drop_layer_mirrors", "_input_names",
    "_repr_mimebundle_", "_repr_svg_"})

# GraphModule, nn.Module and tg.Model attributes a layer must not shadow (nor be shadowed by: a layer
# named `summary` would be called as Model.summary by the generated forward).
RESERVED_NAMES = frozenset(n for n in dir(fx.GraphModule) if not n.startswith("__")) | _MODEL_ATTRIBUTES \
    | frozenset(n for n in dir(TrainingMixin) if not n.startswith("__"))


# Attributes every GraphModule instance has (`training`, `meta`...): a constant must not take them.
_INSTANCE_ATTRIBUTES = frozenset(dir(fx.GraphModule(nn.Module(), fx.Graph())))


class GraphEmitter:
    """Builds the fx.Graph (and the dict of submodules/constants) from ordered records."""

    def __init__(self, taken: set[str] | None = None):
        self.taken = set(taken or ())             # attribute names in use (layers, inputs, reserved)
        self.graph = fx.Graph()
        self.root: dict[str, Any] = {}
        self.env: dict[int, fx.Node] = {}        # id(Value) -> node producing it
        self.record_nodes: dict[int, fx.Node] = {}
        self.paths: dict[tuple, fx.Node] = {}
        self.constants: dict[int, str] = {}
        self.values: dict[int, Value] = {}

    def node_for(self, v: Value) -> fx.Node:
        node = self.env.get(id(v))
        if node is not None:
            return node
        node = self.record_nodes[id(v.record)]
        for i in range(len(v.path)):
            key = (id(v.record), v.path[: i + 1])
            nxt = self.paths.get(key)
            if nxt is None:
                nxt = self.graph.call_function(operator.getitem, (node, v.path[i]))
                if v.record.scope:  # picks an output where the op ran (see scopes.py)
                    nxt.meta["tg_scope"] = v.record.scope
                self.paths[key] = nxt
            node = nxt
        node.meta["tg_spec"] = ValueSpec.of(v)
        self.env[id(v)] = node
        self.values[id(v)] = v
        return node

    def constant(self, t: torch.Tensor) -> fx.Node:
        name = self.constants.get(id(t))
        if name is None:
            name = self._constant_name(t)
            self.taken.add(name)
            self.constants[id(t)] = name
            self.root[name] = t
        return self.graph.get_attr(name)

    def _constant_name(self, t: torch.Tensor) -> str:
        """The fixed path (tg.from_module's state_dict key, a replayed constant's stored name: NOTE:
        [Fixed paths]), else tg.name's name, else the variable's name (NOTE: [Tensor names]), else a
        counter."""
        path = fixed_path(t)
        if path is not None:
            if path in self.taken:
                raise GraphBuildError(
                    f"The tensor name '{path}' (shape {tuple(t.shape)}) is also the name of a layer, an input "
                    "or a module path of this model. Expected each name once; rename the tensor or the layer.")
            return path
        given, explicit = tensor_name(t)
        if explicit:
            if given in self.taken or given in RESERVED_NAMES or given in _INSTANCE_ATTRIBUTES:
                raise GraphBuildError(
                    f"The name '{given}' given with tg.name to a tensor of shape {tuple(t.shape)} is already "
                    "used in this model (by a layer, an input or another tensor) or reserved. Choose "
                    "another name with tg.name(tensor, ...).")
            return given
        base = given or ("parameter" if isinstance(t, nn.Parameter) else "constant")
        return first_free_name(base, lambda c: c in self.taken or c in RESERVED_NAMES or c in ILLEGAL_NAMES
                               or c in _INSTANCE_ATTRIBUTES)[0]

    def arg(self, o):
        if isinstance(o, Value):
            return self.node_for(o)
        if isinstance(o, torch.Tensor):
            return self.constant(o)
        return o


def record_out_spec(record: Record):
    """The specs of ``record.out``, for its node's ``meta["tg_spec"]`` (None when it has no ``out``)."""
    out = getattr(record, "out", None)
    return None if out is None else tree_map(lambda o: ValueSpec.of(o) if isinstance(o, Value) else o, out)
