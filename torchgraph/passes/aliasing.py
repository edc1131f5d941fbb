"""Which values of a graph share memory with a value changed in place: what rewrites must leave alone.

A rewrite that replaces a tensor by a copy (``.contiguous()`` out of a channels_last stack), or an
in-place op by an out-of-place one, changes nothing only where no other value shares the memory
involved. ``y = conv(x); y[:, :4].relu_(); return y * 2`` changes ``y`` through a view; turning
the ``relu_`` out-of-place, or reading ``y`` through a copy, would silently drop the change.

Example:
    >>> import torch, torch.fx as fx, torch.nn as nn
    >>> from torchgraph.passes.aliasing import in_place_hazards
    >>> class Net(nn.Module):
    ...     def forward(self, x):
    ...         y = x * 2
    ...         y[:, :1].relu_()
    ...         return y + (x + 1)
    >>> gm = fx.symbolic_trace(Net())
    >>> sorted(n.name for n in in_place_hazards(gm, gm.graph))
    ['getitem', 'mul', 'relu_']
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..targets import VIEW_OPS, func_name, is_inplace
from .common import module_of

__all__ = ["has_effect", "in_place_hazards", "is_fresh", "mutated_values"]

# NOTE: [Aliases and in-place ops] A value is *fresh* when the op making it returns new memory
# that shares nothing with its inputs: an out-of-place arithmetic op, a convolution, a fused call.
# Anything else may return (a view of) an input: the view ops (targets.VIEW_OPS, which lists the
# sometimes-views such as reshape and contiguous), the ops that may return their input unchanged
# (`.to()` to the same dtype, `.float()` on a float tensor, dropout in eval mode), in-place ops
# (which return their input), and modules and functions whose code the graph does not show. The
# values that may share memory with a value changed in place are found by walking from it through
# every edge that is not fresh, in both directions; the passes leave those values as written.
# NOTE: [Fusions move work] A fused call runs where the first op it replaces ran, or the last: the
# other ops move. `s = a + b; s.mul_(2); y = layer_norm(s)` fused at the add normalizes `s` before the
# change; `y = conv(r); r.mul_(2); y + r` fused at the add convolves `r` after it; attention written
# out and fused at its last matmul reads a key changed after the scores. So a fusion leaves the ops
# as written where a moved op reads a value that may change in place (in_place_hazards).
_MAY_RETURN_INPUT = frozenset({
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool", "cpu", "cuda",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout",
    "feature_alpha_dropout", "atleast_1d", "atleast_2d", "atleast_3d", "broadcast_to", "broadcast_tensors",
    "align_as", "align_to", "rename", "refine_names", "requires_grad_", "getattr", "identity",
})
_INPLACE_OPERATORS = frozenset({"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
                                "ixor", "ilshift", "irshift", "imatmul", "setitem"})
# torch.nn layers whose forward always returns new memory
_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear, nn.Bilinear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                  nn.Embedding, nn.EmbeddingBag, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
                  nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                  nn.AdaptiveMaxPool2d, nn.Softmax, nn.LogSoftmax, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Softplus)
_INPLACE_CAPABLE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
                            nn.Hardtanh, nn.Mish, nn.CELU, nn.SELU, nn.RReLU, nn.Threshold)


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_method" else func_name(node.target)


def _in_place(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(module_of(root, node), "inplace", False))
    if node.op not in ("call_function", "call_method"):
        return False
    name = _name(node)
    return name in _INPLACE_OPERATORS or is_inplace(name, dict(node.kwargs))


def is_fresh(root: nn.Module, node: fx.Node) -> bool:
    """Whether ``node``'s value is new memory, shared with none of its inputs (NOTE: [Aliases and
    in-place ops]). Placeholders and attributes are not: the caller or the model holds them."""
    if node.op == "call_module":
        module = module_of(root, node)
        if isinstance(module, _INPLACE_CAPABLE_MODULES):
            return not getattr(module, "inplace", False)
        return isinstance(module, _FRESH_MODULES)
    if node.op not in ("call_function", "call_method") or node.meta.get("tg_effect") == "mutation":
        return False
    name = _name(node)
    return name not in VIEW_OPS and name not in _MAY_RETURN_INPUT and not _in_place(root, node)


def mutated_values(root: nn.Module, node: fx.Node) -> list[fx.Node]:
    """The graph values ``node`` may change in place: the target of an in-place op, every input of a
    call recorded as mutating (``tg_effect``, e.g. a module whose forward changed its input)."""
    if node.meta.get("tg_effect") == "mutation":
        return list(node.all_input_nodes)
    if _in_place(root, node):
        target = node.kwargs.get("out", node.args[0] if node.args else None)
        return [target] if isinstance(target, fx.Node) else []
    return []


def has_effect(root: nn.Module, node: fx.Node) -> bool:
    """Whether ``node`` must run even when nothing reads its result: it changes a value in place, or
    it was recorded with an effect (a mutation, a guard that raises)."""
    return node.meta.get("tg_effect") is not None or bool(mutated_values(root, node))


def in_place_hazards(root: nn.Module, graph: fx.Graph) -> set[fx.Node]:
    """Every node whose value may share memory with a value changed in place somewhere in ``graph``
    (the changed values and in-place ops included)."""
    hazards: set[fx.Node] = set()
    stack: list[fx.Node] = []
    for node in graph.nodes:
        if _in_place(root, node) or node.meta.get("tg_effect") == "mutation":
            stack += [node, *mutated_values(root, node)]
    while stack:
        node = stack.pop()
        if node in hazards:
            continue
        hazards.add(node)
        stack.extend(_aliased_inputs(root, node))  # node may be (a view of) these
        stack.extend(user for user in node.users if user.op != "output" and node in _aliased_inputs(root, user))
    return hazards


def _aliased_inputs(root: nn.Module, node: fx.Node) -> list[fx.Node]:
    """The inputs ``node``'s value may share memory with: none for a fresh value, the target of an
    in-place op or the base of a view, every input of a call the graph does not see into."""
    if node.op in ("placeholder", "get_attr", "output") or is_fresh(root, node):
        return []
    if node.op != "call_module" and node.meta.get("tg_effect") is None and node.args \
            and isinstance(node.args[0], fx.Node) and (_in_place(root, node) or _name(node) in VIEW_OPS):
        return [node.args[0]]
    return list(node.all_input_nodes)
