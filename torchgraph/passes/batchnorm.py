"""Fold an inference-mode BatchNorm into the convolution or linear layer before it, or (pre-activation
networks: DenseNet, ResNetV2) into a one-pass shift + ReLU and the convolutions after it."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..value_spec import ValueSpec
from .common import call_count, module_of, set_spec, single_user

__all__ = ["fold_batchnorm", "fold_preactivation_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _foldable(root: nn.Module, graph: fx.Graph, node: fx.Node) -> bool:
    bn = module_of(root, node)
    if not isinstance(bn, _NORMS) or bn.running_mean is None or bn.running_var is None:
        return False
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return False
    producer = node.args[0]
    layer = module_of(root, producer)
    if single_user(producer) is not node or layer is None:
        return False  # the un-normalised value is needed elsewhere
    if call_count(graph, producer.target) != 1 or call_count(graph, node.target) != 1:
        return False  # a shared layer would change at its other call sites too
    if isinstance(layer, _CONVS):
        return layer.out_channels == bn.num_features
    if isinstance(layer, nn.Linear):
        spec = producer.meta.get("tg_spec")
        # BatchNorm1d normalises dim 1: the linear's features only for 2-D outputs.
        return (layer.out_features == bn.num_features and spec is not None
                and getattr(spec, "shape", None) is not None and len(spec.shape) == 2)
    return False


def _scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(x) == x * scale + shift`` channel by channel, from the running statistics."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.Module) -> None:
    scale, shift = _scale_shift(bn)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    weight = torch.empty_like(layer.weight, memory_format=torch.contiguous_format)
    torch.mul(layer.weight, scale.reshape([-1] + [1] * (layer.weight.dim() - 1)), out=weight)
    layer.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter((bias * scale + shift).to(layer.weight.dtype),
                              requires_grad=layer.weight.requires_grad)


def fold_batchnorm(root: nn.Module, graph: fx.Graph) -> int:
    """``bn(conv(x))`` -> ``conv'(x)`` with ``conv'`` = the folded weights, using the running
    statistics (inference only). Only a conv/linear whose output feeds the BatchNorm alone, and
    layers called once, are folded."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not _foldable(root, graph, node):
            continue
        producer = node.args[0]
        _fold(module_of(root, producer), module_of(root, node))
        producer.meta["tg_spec"] = node.meta.get("tg_spec", producer.meta.get("tg_spec"))
        node.replace_all_uses_with(producer)
        graph.erase_node(node)
        count += 1
    return count


# NOTE: [Pre-activation BatchNorm] DenseNet's layers and pre-activation ResNets (ResNetV2, WideResNet) normalise
# before the convolution: conv(relu(bn(x))). The BatchNorm cannot fold into the convolution through the ReLU,
# and eval BatchNorm then ReLU are two passes over the map (with channels_last maps torch's batch norm is slow:
# 4-7x the time of one ops.bias_act pass on DenseNet-121's maps, 2 threads). But where every channel's scale
# s = gamma / sqrt(var + eps) is positive, relu(s * x + t) = s * relu(x + t / s): the ReLU becomes
# ops.bias_act(x, t / s, "relu", dim=1) and s folds into the input channels of the convolutions that read it
# (any padding mode: padding copies values, or adds zeros, either way commuting with a positive scale). The same
# up to float rounding, as a BatchNorm fold. Not where a scale is zero or negative (the identity needs s > 0),
# or where the ReLU's value is read by anything but ungrouped convolutions, each called once.
_PREACTIVATION_RELUS = (F.relu, torch.relu)


def _preactivation(root: nn.Module, graph: fx.Graph, node: fx.Node):
    """``(relu node, [conv nodes], scale, shift)`` where ``node`` is a BatchNorm2d whose scales fold past its ReLU,
    else None."""
    bn = module_of(root, node)
    spec = node.meta.get("tg_spec")
    if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or bn.running_var is None or len(node.args) != 1 \
            or node.kwargs or call_count(graph, node.target) != 1 or not isinstance(spec, ValueSpec) \
            or len(spec.shape) != 4:
        return None
    relu = single_user(node)
    if relu is None or relu.op != "call_function" or relu.target not in _PREACTIVATION_RELUS \
            or relu.args != (node,) or relu.kwargs not in ({}, {"inplace": False}):
        return None
    convs = list(relu.users)
    for conv in convs:
        layer = module_of(root, conv)
        if type(layer) is not nn.Conv2d or conv.args != (relu,) or conv.kwargs or layer.groups != 1 \
                or layer.in_channels != bn.num_features or call_count(graph, conv.target) != 1:
            return None
    scale, shift = _scale_shift(bn)
    if not convs or not bool((scale > 0).all()):
        return None
    return relu, convs, scale, shift


@torch.no_grad()
def fold_preactivation_batchnorm(root: nn.Module, graph: fx.Graph) -> int:
    """``conv(relu(bn(x)))`` -> ``conv'(bias_act(x, t / s, "relu", 1))`` with ``conv'``'s input channels scaled
    by ``s`` (NOTE: [Pre-activation BatchNorm]; inference only). Returns how many BatchNorms were folded."""
    count = 0
    for node in list(graph.nodes):
        found = _preactivation(root, graph, node) if node.op == "call_module" else None
        if found is None:
            continue
        relu, convs, scale, shift = found
        bn = module_of(root, node)
        for conv in convs:
            layer = module_of(root, conv)
            # a new Parameter: tg.optimize's copy shares the original's convolution weights until replaced
            layer.weight = nn.Parameter((layer.weight * scale.reshape(1, -1, 1, 1)).to(layer.weight.dtype),
                                        requires_grad=layer.weight.requires_grad)
        bn.register_buffer("relu_shift", (shift / scale).to(bn.running_mean.dtype))
        with graph.inserting_before(relu):
            offset = graph.get_attr(f"{node.target}.relu_shift")
            fused = graph.call_function(ops.bias_act, (node.args[0], offset, "relu", 1))
        set_spec(fused, relu.meta.get("tg_spec", node.meta.get("tg_spec")))
        relu.replace_all_uses_with(fused)
        graph.erase_node(relu)
        graph.erase_node(node)
        count += 1
    return count
