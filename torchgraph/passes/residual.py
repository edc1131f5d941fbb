"""Residual adds: ``relu(a + b)`` -> ``ops.add_relu``; ``layer_norm(a + b)`` -> ``ops.add_layer_norm``;
``[relu](conv(x) + r)`` -> ``fused.conv2d_add_act``."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import fused, ops
from .aliasing import in_place_hazards
from .common import (activation_of, attr_node, is_plain_add, module_of, parameter_of, replace_with_call, same_shape,
                     set_spec, single_user)

__all__ = ["fuse_add_layer_norm", "fuse_add_relu", "fuse_conv_add"]


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
        replace_with_call(graph, node, user, (user, node), ops.add_relu, tuple(node.args), {}, f"{node.name}_relu")
        count += 1
    return count


def _fusable_conv(node: fx.Node, other: fx.Node) -> bool:
    """A channels_last ``fused.conv2d_act`` without activation whose only user is the add."""
    return (node.op == "call_function" and node.target is fused.conv2d_act and len(node.args) == 8
            and node.args[7] == "none" and node.kwargs == {"channels_last": True} and len(node.users) == 1
            and node is not other)


def fuse_conv_add(root: nn.Module, graph: fx.Graph) -> int:
    """``ops.add_relu(conv, r)`` and ``conv + r`` (same shapes), where ``conv`` is a channels_last
    ``fused.conv2d_act`` without activation used by the add alone -> ``fused.conv2d_add_act(x, r, ...,
    act)``: the residual is added in the convolution's epilogue (NOTE: [Residual in the convolution]
    in ``fused/conv.py``). For inference with channels_last convolutions: run after :func:`fuse_add_relu`.
    A convolution whose input may change in place stays as written (NOTE: [Fusions move work] in aliasing.py)."""
    count = 0
    hazards = in_place_hazards(root, graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is ops.add_relu and len(node.args) == 2 and not node.kwargs:
            act = "relu"
        elif is_plain_add(node) and same_shape(*node.args):
            act = "none"
        else:
            continue
        a, b = node.args
        conv, residual = (a, b) if _fusable_conv(a, b) else (b, a) if _fusable_conv(b, a) else (None, None)
        if conv is None or conv.args[0] in hazards:
            continue
        x, weight, bias, stride, padding, dilation, groups, _ = conv.args
        args = (x, residual, weight, bias, stride, padding, dilation, groups, act)
        replace_with_call(graph, node, node, (node, conv), fused.conv2d_add_act, args, {"channels_last": True},
                 f"{conv.name}_add")
        count += 1
    return count


def _last_dim(node: fx.Node) -> int | None:
    spec = node.meta.get("tg_spec")
    if spec is None or getattr(spec, "dtype", None) is None or not spec.probes[0]:
        return None
    return spec.probes[0][-1]


def _functional_layer_norm(root: nn.Module, user: fx.Node, node: fx.Node) -> tuple | None:
    """``F.layer_norm(node, shape, weight, bias, eps)`` over the last dim (nanoGPT's LayerNorm
    module calls it): ``(weight node, bias node, eps)``."""
    if user.op != "call_function" or user.target not in (F.layer_norm, torch.layer_norm):
        return None
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    if len(user.args) > len(names) or set(user.kwargs) - set(names):
        return None
    args = dict(zip(names, user.args), **user.kwargs)
    weight, bias, eps = args.get("weight"), args.get("bias"), args.get("eps", 1e-5)
    if args.get("input") is not node or not isinstance(eps, float):
        return None
    if any(p is not None and not (isinstance(p, fx.Node) and p.op == "get_attr") for p in (weight, bias)):
        return None
    shape, last = args.get("normalized_shape"), _last_dim(node)
    if isinstance(shape, fx.Node):  # `self.weight.shape`
        owner = shape.args[0] if shape.op == "call_function" and shape.target is getattr else None
        if owner is not weight or shape.args[1] != "shape" or weight is None:
            return None
        param = parameter_of(root, weight)
        shape = tuple(param.shape) if param is not None else None
    if not isinstance(shape, (tuple, list, torch.Size)) or list(shape) != [last]:
        return None
    return weight, bias, eps



def _layer_norm_user(root: nn.Module, node: fx.Node, graph: fx.Graph) -> tuple | None:
    """The first user of ``node`` that is a LayerNorm over the last dim only (an ``nn.LayerNorm``
    or ``F.layer_norm``): ``(user, weight node, bias node, eps)``, inserting get_attr nodes for a
    module's parameters."""
    for user in node.users:
        ln = module_of(root, user)
        if (type(ln) is nn.LayerNorm and len(ln.normalized_shape) == 1 and user.args == (node,)
                and not user.kwargs):
            with graph.inserting_before(node):
                w = attr_node(graph, user.target, "weight", ln.weight)
                b = attr_node(graph, user.target, "bias", ln.bias)
            return user, w, b, ln.eps
        found = _functional_layer_norm(root, user, node)
        if found is not None:
            return (user, *found)
    return None


def _after(a: fx.Node, b: fx.Node) -> bool:
    """Whether node ``a`` comes after node ``b`` in the graph."""
    for n in b.graph.nodes:
        if n is a:
            return False
        if n is b:
            return True
    return False


def fuse_add_layer_norm(root: nn.Module, graph: fx.Graph) -> int:
    """``s = a + b; y = layer_norm(s)`` -> ``y, s = ops.add_layer_norm(a, b, w, bias, eps)``: the pre-LN
    transformer's residual stream. ``s`` keeps its other users (the next residual add); a sum that may
    change in place stays as written (NOTE: [Fusions move work] in aliasing.py)."""
    count = 0
    hazards = in_place_hazards(root, graph)
    for node in list(graph.nodes):
        if not is_plain_add(node) or not same_shape(*node.args) or node in hazards:
            continue
        found = _layer_norm_user(root, node, graph)
        if found is None:
            continue
        ln_node, w, b, eps = found
        for param in (w, b):  # a get_attr written after the add (traced code reads it late)
            if param is not None and param.op == "get_attr" and _after(param, node):
                node.prepend(param)
        with graph.inserting_before(node):
            pair = graph.call_function(ops.add_layer_norm, (*node.args, w, b, eps))
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
