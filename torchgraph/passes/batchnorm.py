"""Fold an inference-mode BatchNorm into the convolution or linear layer before it."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from .common import call_count, module_of, single_user

__all__ = ["fold_batchnorm"]

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


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.Module) -> None:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
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
