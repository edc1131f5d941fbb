"""Fold a layer scale (a learned per-channel factor after a linear layer) into that layer's weight.

timm's ``LayerScale`` (ViT, DeiT-III, DINOv2: ``x * self.gamma``), ConvNeXt's ``gamma`` (timm:
``x.permute(0, 3, 1, 2)`` then ``x.mul(self.gamma.reshape(1, -1, 1, 1))``; HF:
``self.layer_scale_parameter * x`` before the permute) multiply the output of a block's last linear layer
channel by channel: ``(x @ W.T + b) * g == x @ (g[:, None] * W).T + g * b``. So in inference the linear
takes ``g[:, None] * W`` and ``g * b`` (equal up to float rounding, as a BatchNorm fold) and the
multiplication, a pass over the activations, goes. Inference only, like ``fold_batchnorm``: the optimized
copy's linear holds the folded weight.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from .common import call_count, module_of, parameter_of, permute_dims, single_user

__all__ = ["fold_layer_scale"]

_MUL_FUNCTIONS = {operator.mul, torch.mul}


def _is_mul(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _MUL_FUNCTIONS)
            or (node.op == "call_method" and node.target == "mul")) and len(node.args) == 2 and not node.kwargs


def _is_permute_to_nchw(node) -> bool:
    """``x.permute(0, 3, 1, 2)`` (ConvNeXt's way back from channels-last; the method, as ConvNeXt writes it)."""
    return isinstance(node, fx.Node) and node.op == "call_method" and permute_dims(node) == (0, 3, 1, 2)


def _channel_view(node) -> fx.Node | None:
    """``g.reshape(1, -1, 1, 1)`` / ``g.view(1, C, 1, 1)``: the ``get_attr`` node of ``g``, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or node.target not in ("reshape", "view") \
            or node.kwargs or not isinstance(node.args[0], fx.Node) or node.args[0].op != "get_attr":
        return None
    shape = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) == 2 else ()
    shape = tuple(shape)
    return node.args[0] if len(shape) == 4 and shape[0] == 1 and shape[2:] == (1, 1) else None


def _match(root: nn.Module, graph: fx.Graph, mul: fx.Node) -> tuple | None:
    """``(scaled node, linear node, scale parameter)`` when ``mul`` scales the channels of a linear's output
    alone (the scaled node is the linear's, or the permute of it)."""
    for scaled, scale in (mul.args, mul.args[::-1]):
        if not isinstance(scaled, fx.Node) or single_user(scaled) is not mul:
            continue
        if _is_permute_to_nchw(scaled):
            linear_node, gamma = scaled.args[0], _channel_view(scale)
            if gamma is None or single_user(scale) is not mul or not isinstance(linear_node, fx.Node) \
                    or single_user(linear_node) is not scaled:
                continue
        else:
            linear_node, gamma = scaled, scale
        linear = module_of(root, linear_node)
        parameter = parameter_of(root, gamma)
        if type(linear) is not nn.Linear or parameter is None or call_count(graph, linear_node.target) != 1:
            continue
        if tuple(parameter.shape) != (linear.out_features,) or parameter.dtype != linear.weight.dtype:
            continue
        return scaled, linear_node, parameter
    return None


@torch.no_grad()
def _fold(linear: nn.Linear, scale: torch.Tensor) -> None:
    weight = linear.weight * scale[:, None]
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias * scale, requires_grad=linear.bias.requires_grad)


def fold_layer_scale(root: nn.Module, graph: fx.Graph) -> int:
    """``linear(x) * g`` (``g`` a ``(out_features,)`` parameter, on the last dim, or as ``g.reshape(1, -1, 1,
    1)`` after ``.permute(0, 3, 1, 2)``) -> the linear with ``g`` folded in. Only a linear called once whose
    output the multiplication (or the permute before it) reads alone. Returns how many were folded."""
    count = 0
    for mul in list(graph.nodes):
        match = _match(root, graph, mul) if _is_mul(mul) else None
        if match is None:
            continue
        scaled, linear_node, scale = match
        _fold(module_of(root, linear_node), scale)
        scaled.meta["tg_spec"] = mul.meta.get("tg_spec", scaled.meta.get("tg_spec"))
        mul.replace_all_uses_with(scaled)
        graph.erase_node(mul)
        count += 1
    return count
