"""An inverted residual block's 1x1 expansion and the depthwise convolution reading it ->
``fused.conv2d_expand_depthwise`` (NOTE: [Inverted residuals in one pass] in torchgraph/fused/conv_expand.py)."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .. import fused
from ..ops.depthwise_conv2d_inference import DEPTHWISE_ACTIVATIONS
from ..ops.gemm_act_inference import GEMM_ACTIVATIONS
from .aliasing import in_place_hazards
from .common import parameter_of, replace_with_call

__all__ = ["fuse_expand_depthwise"]


def _channels_last_conv(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is fused.conv2d_act
            and len(node.args) == 8 and node.kwargs == {"channels_last": True})


def _expansion(root: nn.Module, node: fx.Node):
    """``node``'s 1x1 stride-1 unpadded ungrouped convolution's ``(x, weight, bias, act, out_channels)``, or None."""
    x, weight, bias, stride, padding, dilation, groups, act = node.args
    param = parameter_of(root, weight) if isinstance(weight, fx.Node) else None
    if param is None or param.dim() != 4 or tuple(param.shape[2:]) != (1, 1) or act not in GEMM_ACTIVATIONS:
        return None
    if list(stride) != [1, 1] or list(padding) != [0, 0] or list(dilation) != [1, 1] or groups != 1:
        return None
    return x, weight, bias, act, param.shape[0]


def fuse_expand_depthwise(root: nn.Module, graph: fx.Graph) -> int:
    """``conv2d_act(conv2d_act(x, w1, b1, 1x1, act1), w2, b2, stride, padding, groups=M, act2)``, both channels_last,
    the expansion read by the depthwise convolution alone, with 3x3, 5x5 or 7x7 undilated filters ->
    ``fused.conv2d_expand_depthwise(x, w1, b1, act1, w2, b2, stride, padding, act2)``. For inference with
    channels_last convolutions: run after :func:`keep_layout_local` (the fused call reads and answers the layouts
    the two did). A convolution whose input may change in place stays as written (NOTE: [Fusions move work] in
    aliasing.py)."""
    count = 0
    hazards = in_place_hazards(root, graph)
    for node in list(graph.nodes):
        if not _channels_last_conv(node):
            continue
        h, weight, bias, stride, padding, dilation, groups, act = node.args
        if not _channels_last_conv(h) or len(h.users) != 1 or act not in DEPTHWISE_ACTIVATIONS:
            continue
        expansion = _expansion(root, h)
        param = parameter_of(root, weight) if isinstance(weight, fx.Node) else None
        if expansion is None or param is None or list(dilation) != [1, 1]:
            continue
        x, expand_weight, expand_bias, expand_act, mid = expansion
        size = param.shape[-1]
        if groups != mid or tuple(param.shape) != (mid, 1, size, size) or size not in (3, 5, 7) or x in hazards:
            continue
        replace_with_call(graph, node, node, (node, h), fused.conv2d_expand_depthwise,
                          (x, expand_weight, expand_bias, expand_act, weight, bias, stride, padding, act), {},
                          f"{node.name}_expanded")
        count += 1
    return count
