"""Canonical forms: activation modules become the functions they call, so one pattern fits both.

``nn.ReLU()(x)`` and ``F.relu(x)`` compute the same thing; torchvision writes the first (one shared
``nn.ReLU(inplace=True)`` per block), hand-written code the second. Rewriting modules into functions
before matching lets every fusion pass look for one spelling. In inference, ``nn.Dropout``, drop
paths (``tg.layers.DropPath``, timm's ``DropPath``...: the identity in eval mode) and ``nn.Identity``
disappear, and ``tg.layers.ScaledDotProductAttention`` becomes the ``F.scaled_dot_product_attention``
call it makes in eval mode (no dropout), which the attention passes match.

In-place activations (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x.relu_()``) and
in-place arithmetic (``out += identity``, ``x.add_(y)``, ``x.mul_(2)``) become out-of-place only where
that changes nothing observable: their target is fresh memory made inside the model (not a model
input, whose caller would see it change, nor a view of another value: NOTE: [Aliases and in-place
ops] in aliasing.py) used by the in-place op alone (nobody else could see the change). Otherwise
they stay as written.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..drop_paths import is_drop_path
from ..layers import ScaledDotProductAttention
from ..value_spec import ValueSpec
from .aliasing import is_fresh
from .common import attr_node, module_of, same_shape, set_spec

__all__ = ["canonicalize"]

# module type -> (function, keyword arguments read from the module)
_ACTIVATION_MODULES = {
    nn.ReLU: (F.relu, ()),
    nn.ReLU6: (F.relu6, ()),
    nn.GELU: (F.gelu, ("approximate",)),
    nn.SiLU: (F.silu, ()),
    nn.Hardswish: (F.hardswish, ()),
    nn.Hardsigmoid: (F.hardsigmoid, ()),
    nn.Sigmoid: (torch.sigmoid, ()),
    nn.Tanh: (torch.tanh, ()),
}
_INPLACE_FUNCTIONS = {F.relu: F.relu, F.relu6: F.relu6, F.silu: F.silu, F.hardswish: F.hardswish,
                      F.hardsigmoid: F.hardsigmoid}
_INPLACE_METHODS = {"relu_": torch.relu, "sigmoid_": torch.sigmoid, "tanh_": torch.tanh}
_INPLACE_TORCH = {torch.relu_: torch.relu, torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


# in-place arithmetic -> the out-of-place function: `out += identity` (torchvision's residual add)
_INPLACE_ARITHMETIC = {"add_": torch.add, "sub_": torch.sub, "mul_": torch.mul, "div_": torch.div}
_INPLACE_OPERATORS = {operator.iadd: torch.add, operator.isub: torch.sub, operator.imul: torch.mul,
                      operator.itruediv: torch.div}


def _private(root: nn.Module, value) -> bool:
    """Whether changing ``value`` in place is unobservable once its only user is done with it: fresh
    memory (no input's, no view of another value) used by that op alone."""
    return isinstance(value, fx.Node) and is_fresh(root, value) and len(value.users) == 1


def _same_result_out_of_place(target: fx.Node, other) -> bool:
    """Whether ``target op other`` out of place has ``target``'s shape and dtype, as the in-place op
    keeps them: a Python number on a floating tensor, a tensor of the same spec, or a tensor of the same dtype
    that broadcasts to ``target``'s shape at both probes (timm's ``LayerScale(inplace=True)``:
    ``x.mul_(gamma)``)."""
    spec = target.meta.get("tg_spec")
    if spec is None or not hasattr(spec, "dtype"):
        return False
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return spec.dtype.is_floating_point
    if not isinstance(other, fx.Node):
        return False
    if same_shape(target, other):
        return True
    other_spec = other.meta.get("tg_spec")
    if getattr(other_spec, "dtype", None) is None or other_spec.dtype != spec.dtype:
        return False
    try:
        return all(tuple(torch.broadcast_shapes(tuple(t), tuple(o))) == tuple(t)
                   for t, o in zip(spec.probes, other_spec.probes))
    except (RuntimeError, TypeError, ValueError):
        return False


def _replace(graph: fx.Graph, node: fx.Node, target, args: tuple, kwargs: dict) -> None:
    with graph.inserting_before(node):
        new = graph.call_function(target, args, kwargs)
    set_spec(new, node.meta.get("tg_spec"))
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    new._rename(node.name)


def canonicalize(root: nn.Module, graph: fx.Graph, inference: bool) -> int:
    """Activation modules -> functions; private in-place activations -> out-of-place; in
    ``inference``, dropout and identity modules removed. Returns how many nodes changed."""
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_module":
            module = module_of(root, node)
            if inference and type(module) is ScaledDotProductAttention:  # no dropout in inference
                _replace(graph, node, F.scaled_dot_product_attention, node.args, dict(node.kwargs))
                count += 1
                continue
            if len(node.args) != 1 or node.kwargs:
                continue
            x = node.args[0]
            if inference and _instance_norm_as_group_norm(graph, node, module):
                count += 1
                continue
            # (is_drop_path runs the module: asked only in inference, where a drop path vanishes)
            dropped = inference and (type(module) in _DROPOUTS or is_drop_path(module))
            if isinstance(module, nn.Identity) or dropped:
                node.replace_all_uses_with(x)
                graph.erase_node(node)
                count += 1
                continue
            entry = _ACTIVATION_MODULES.get(type(module))
            if entry is None or (getattr(module, "inplace", False) and not _private(root, x)):
                continue
            function, attrs = entry
            _replace(graph, node, function, (x,), {a: getattr(module, a) for a in attrs})
            count += 1
        elif node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
            if node.kwargs.get("inplace") is True and len(node.args) == 1 and _private(root, node.args[0]):
                kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
                _replace(graph, node, node.target, node.args, kwargs)
                count += 1
        elif node.op == "call_function" and node.target in _INPLACE_TORCH:
            if len(node.args) == 1 and not node.kwargs and _private(root, node.args[0]):
                _replace(graph, node, _INPLACE_TORCH[node.target], node.args, {})
                count += 1
        elif node.op == "call_method" and node.target in _INPLACE_METHODS:
            if len(node.args) == 1 and not node.kwargs and _private(root, node.args[0]):
                _replace(graph, node, _INPLACE_METHODS[node.target], node.args, {})
                count += 1
        elif _in_place_arithmetic(node):
            target, other = node.args
            if _private(root, target) and _same_result_out_of_place(target, other):
                function = _INPLACE_ARITHMETIC.get(node.target) or _INPLACE_OPERATORS[node.target]
                _replace(graph, node, function, (target, other), dict(node.kwargs))
                count += 1
    return count


# NOTE: [InstanceNorm as GroupNorm] An instance norm normalises each (sample, channel) plane by its own mean and
# biased variance, then scales and shifts by channel: exactly GroupNorm with one channel a group. torch runs
# F.instance_norm as a training-mode batch norm over a (1, N*C, H, W) view, which is several times slower than
# its group norm kernel on the same tensor (2 threads, float32, NCHW: 4 x 32 x 64 x 64 391 vs 66 us, 1 x 256 x
# 64 x 64 758 vs 121 us; both within 4.8e-7 of float64), so in inference an nn.InstanceNorm2d that normalises
# by its input's statistics (track_running_stats=False, the default: CycleGAN's and pix2pix's generators, fast
# neural style) becomes F.group_norm(x, C, weight, bias, eps). One with running statistics is an affine map in
# eval and stays as written.
def _instance_norm_as_group_norm(graph: fx.Graph, node: fx.Node, module: nn.Module) -> bool:
    """``nn.InstanceNorm2d(x)`` (input statistics, 4-D x) -> ``F.group_norm(x, C, ...)``; whether it was."""
    spec = node.args[0].meta.get("tg_spec") if isinstance(node.args[0], fx.Node) else None
    if type(module) is not nn.InstanceNorm2d or module.track_running_stats or not isinstance(spec, ValueSpec) \
            or len(spec.shape) != 4 or not isinstance(spec.shape[1], int):
        return False
    with graph.inserting_before(node):
        weight, bias = (attr_node(graph, node.target, name, getattr(module, name)) for name in ("weight", "bias"))
    _replace(graph, node, F.group_norm, (node.args[0], spec.shape[1], weight, bias, module.eps), {})
    return True


def _in_place_arithmetic(node: fx.Node) -> bool:
    if node.op == "call_method":
        found = node.target in _INPLACE_ARITHMETIC
    else:
        found = node.op == "call_function" and node.target in _INPLACE_OPERATORS and not node.kwargs
    return found and len(node.args) == 2 and set(node.kwargs) <= {"alpha"}
