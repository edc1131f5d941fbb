"""Residual adds: ``relu(a + b)`` -> ``ops.add_relu``; ``layer_norm(a + b)`` -> ``ops.add_layer_norm``."""

from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn as nn

from .. import ops
from .common import activation_of, attr_node, is_plain_add, module_of, same_shape, set_spec, single_user

__all__ = ["fuse_add_layer_norm", "fuse_add_relu"]


def fuse_add_relu(root: nn.Module, graph: fx.Graph) -> int:
    """``relu(a + b)`` with ``a``, ``b`` of one shape, the sum used by the relu alone ->
    ``ops.add_relu(a, b)`` (forward and backward kernels)."""
    count = 0
    for node in list(graph.nodes):
        if not is_plain_add(node) or not same_shape(*node.args):
            continue
        user = single_user(node)
        if user is None or activation_of(root, user, node) != "relu":
            continue
        with graph.inserting_before(node):
            new = graph.call_function(ops.add_relu, tuple(node.args))
        new._rename(f"{node.name}_relu")
        set_spec(new, user.meta.get("tg_spec"))
        user.replace_all_uses_with(new)
        graph.erase_node(user)
        graph.erase_node(node)
        count += 1
    return count


def _layer_norm_user(root: nn.Module, node: fx.Node) -> fx.Node | None:
    """The first user of ``node`` that is an ``nn.LayerNorm`` over the last dim only."""
    for user in node.users:
        ln = module_of(root, user)
        if (type(ln) is nn.LayerNorm and len(ln.normalized_shape) == 1 and user.args == (node,)
                and not user.kwargs):
            return user
    return None


def fuse_add_layer_norm(root: nn.Module, graph: fx.Graph) -> int:
    """``s = a + b; y = layer_norm(s)`` -> ``y, s = ops.add_layer_norm(a, b, w, bias, eps)``: the pre-LN
    transformer's residual stream. ``s`` keeps its other users (the next residual add)."""
    count = 0
    for node in list(graph.nodes):
        if not is_plain_add(node) or not same_shape(*node.args):
            continue
        ln_node = _layer_norm_user(root, node)
        if ln_node is None:
            continue
        ln = module_of(root, ln_node)
        with graph.inserting_before(node):
            w = attr_node(graph, ln_node.target, "weight", ln.weight)
            b = attr_node(graph, ln_node.target, "bias", ln.bias)
            pair = graph.call_function(ops.add_layer_norm, (*node.args, w, b, ln.eps))
            pair._rename(f"{node.name}_{ln_node.name}")
            set_spec(pair, (ln_node.meta.get("tg_spec"), node.meta.get("tg_spec")))
            out = set_spec(graph.call_function(operator.getitem, (pair, 0)), ln_node.meta.get("tg_spec"))
            residual = set_spec(graph.call_function(operator.getitem, (pair, 1)), node.meta.get("tg_spec"))
        ln_node.replace_all_uses_with(out)
        graph.erase_node(ln_node)
        node.replace_all_uses_with(residual)
        graph.erase_node(node)
        count += 1
    return count
