"""Linear / Conv2d + bias + activation -> one call of :mod:`torchgraph.fused`."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .. import fused
from .common import activation_of, attr_node, module_of, set_spec, single_user

__all__ = ["fuse_conv_act", "fuse_linear_act"]

# nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear: an nn.Linear in all but name.
_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _absorb_activation(root, node: fx.Node) -> tuple[str, fx.Node]:
    """The activation right after ``node`` (if it is its only user) and the node it ends at."""
    user = single_user(node)
    act = activation_of(root, user, node) if user is not None else None
    return (act, user) if act is not None else ("none", node)


def _replace(graph: fx.Graph, first: fx.Node, last: fx.Node, target, args: tuple, suffix: str) -> fx.Node:
    with graph.inserting_before(first):
        new = graph.call_function(target, args)
    new._rename(f"{first.name}_{suffix}" if suffix != "none" else f"{first.name}_fused")
    set_spec(new, last.meta.get("tg_spec"))
    last.replace_all_uses_with(new)
    if last is not first:
        graph.erase_node(last)
    graph.erase_node(first)
    return new


def fuse_linear_act(root: nn.Module, graph: fx.Graph) -> int:
    """``act(linear(x))`` (and a bare ``linear(x)``) -> ``fused.linear_act(x, w, b, act)``."""
    count = 0
    for node in list(graph.nodes):
        layer = module_of(root, node)
        if type(layer) not in _LINEARS or len(node.args) != 1 or node.kwargs:
            continue
        act, last = _absorb_activation(root, node)
        with graph.inserting_before(node):
            w = attr_node(graph, node.target, "weight", layer.weight)
            b = attr_node(graph, node.target, "bias", layer.bias)
        _replace(graph, node, last, fused.linear_act, (node.args[0], w, b, act), act)
        count += 1
    return count


def fuse_conv_act(root: nn.Module, graph: fx.Graph, channels_last: bool) -> int:
    """``act(conv2d(x))`` (and a bare ``conv2d(x)``) -> ``fused.conv2d_act(x, w, b, ..., act)``.

    With ``channels_last`` (inference) convolutions (grouped and depthwise too) answer in channels_last on the oneDNN
    path (``conv2d_act(..., channels_last=True)``); :func:`keep_layout_local` must then run.
    Convolutions with string padding or a non-zero padding mode stay as they are.
    """
    count = 0
    for node in list(graph.nodes):
        conv = module_of(root, node)
        if (type(conv) is not nn.Conv2d or len(node.args) != 1 or node.kwargs
                or isinstance(conv.padding, str) or conv.padding_mode != "zeros"):
            continue
        act, last = _absorb_activation(root, node)
        with graph.inserting_before(node):
            w = attr_node(graph, node.target, "weight", conv.weight)
            b = attr_node(graph, node.target, "bias", conv.bias)
        args = (node.args[0], w, b, list(conv.stride), list(conv.padding), list(conv.dilation),
                conv.groups, act)
        new = _replace(graph, node, last, fused.conv2d_act, args, act)
        if channels_last:  # grouped and depthwise too: 1.7-3x faster than on NCHW (NOTE in fused/weights.py)
            new.kwargs = {"channels_last": True}
        count += 1
    return count
