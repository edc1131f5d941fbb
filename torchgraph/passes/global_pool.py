"""Global average pools of channels_last maps -> ``fused.global_avg_pool2d`` (NOTE: [Global pools of channels_last
maps] in torchgraph/fused/pool.py)."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .. import fused
from ..fused.pool import global_avg_pool2d
from .common import parameter_of, replace_with_call
from .layout import _channels_last_values, _global_pool

__all__ = ["use_global_avg_pool"]


def _keepdim(node: fx.Node) -> bool | None:
    """Whether a global pool keeps its pooled dimensions; None for a ``mean`` with other arguments (a dtype)."""
    if node.op != "call_method":  # F.adaptive_avg_pool2d(x, 1), nn.AdaptiveAvgPool2d(1)
        return True
    if len(node.args) > 3 or set(node.kwargs) - {"dim", "keepdim"}:
        return None
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return keepdim if isinstance(keepdim, bool) else None


def _pointwise_conv(root: nn.Module, node: fx.Node) -> bool:
    """A channels_last 1x1 convolution (a GEMM, its output channels split between the threads)."""
    if node.op != "call_function" or not node.kwargs.get("channels_last", False):
        return False
    if node.target is fused.conv2d_act:
        weight = parameter_of(root, node.args[1])
    elif node.target is fused.conv2d_add_act:
        weight = parameter_of(root, node.args[2])
    else:
        return False
    return weight is not None and weight.dim() == 4 and tuple(weight.shape[-2:]) == (1, 1)


def use_global_avg_pool(root: nn.Module, graph: fx.Graph) -> int:
    """``F.adaptive_avg_pool2d(x, 1)``, ``nn.AdaptiveAvgPool2d(1)(x)`` and ``x.mean((2, 3))`` (or ``(-2, -1)``, with
    or without ``keepdim``) of the channels_last map of a 1x1 convolution (a CNN's head: ResNet's, MobileNet's,
    EfficientNet's; not a squeeze-excitation's pool of a depthwise convolution, where nothing was measured) ->
    ``fused.global_avg_pool2d(x, keepdim)``. For float32 inference: run after :func:`keep_layout_local`. Returns
    how many were replaced."""
    count = 0
    for value in _channels_last_values(root, graph, True):
        if not _pointwise_conv(root, value):
            continue
        for node in list(value.users):
            keepdim = _keepdim(node) if _global_pool(root, node) and node.args[0] is value else None
            if keepdim is None:
                continue
            replace_with_call(graph, node, node, (node,), global_avg_pool2d, (value, keepdim), {},
                              f"{node.name}_global")
            count += 1
    return count
