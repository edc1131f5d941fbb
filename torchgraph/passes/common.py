"""Pattern-matching helpers shared by the passes."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["activation_of", "call_count", "is_module", "module_of", "parameter_of", "permute_dims", "same_shape",
           "set_spec", "single_user", "attr_node", "is_plain_add"]


def module_of(root: nn.Module, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return root.get_submodule(node.target)


def parameter_of(root: nn.Module, node) -> nn.Parameter | None:
    """The parameter a ``get_attr`` node reads, else None (a buffer, a constant, another op)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        return root.get_parameter(node.target)
    except AttributeError:
        return None


def permute_dims(node) -> tuple | None:
    """The dims of ``x.permute(*dims)``, ``x.permute(dims)`` or ``torch.permute(x, dims)`` (positional
    arguments), else None."""
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) < 2 or not (
            (node.op == "call_method" and node.target == "permute")
            or (node.op == "call_function" and node.target is torch.permute)):
        return None
    dims = node.args[1:] if len(node.args) > 2 else node.args[1]
    return tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)


def is_module(root: nn.Module, node, cls) -> bool:
    return isinstance(node, fx.Node) and isinstance(module_of(root, node), cls)


def call_count(graph: fx.Graph, target: str) -> int:
    """How many ``call_module`` nodes call the submodule ``target`` (a shared layer: more than one)."""
    return sum(1 for n in graph.nodes if n.op == "call_module" and n.target == target)


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


_RELU_FUNCTIONS = {F.relu, torch.relu}
# Fused on oneDNN only (fused.ONEDNN_ACTIVATIONS), as written after passes.canonicalize.
_OTHER_FUNCTIONS = {F.relu6: "relu6", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
                    torch.sigmoid: "sigmoid", torch.tanh: "tanh"}


def activation_of(root: nn.Module, node: fx.Node, x: fx.Node) -> str | None:
    """If ``node`` applies a fusable activation to ``x`` (and nothing else), its name in
    ``torchgraph.fused.ONEDNN_ACTIVATIONS``; else None. In-place variants are not fused."""
    if node.op == "call_module":
        m = module_of(root, node)
        if node.args != (x,) or node.kwargs:
            return None
        if type(m) is nn.ReLU and not m.inplace:
            return "relu"
        if type(m) is nn.GELU:
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
        if type(m) is nn.SiLU and not m.inplace:
            return "silu"
        return None
    if not node.args or node.args[0] is not x or len(node.args) > 1:
        return None
    kwargs = dict(node.kwargs)
    if node.op == "call_method":
        if node.target == "relu" and not kwargs:
            return "relu"
        return None
    if node.op != "call_function":
        return None
    if node.target in _RELU_FUNCTIONS and not kwargs.get("inplace", False):
        return "relu" if set(kwargs) <= {"inplace"} else None
    if node.target is F.gelu and set(kwargs) <= {"approximate"}:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(kwargs.get("approximate", "none"))
    if node.target is F.silu and not kwargs.get("inplace", False) and set(kwargs) <= {"inplace"}:
        return "silu"
    if node.target in _OTHER_FUNCTIONS and not kwargs:
        return _OTHER_FUNCTIONS[node.target]
    return None


def is_plain_add(node: fx.Node) -> bool:
    """``a + b`` (or ``torch.add(a, b)``) of two graph values, without ``alpha``/``out``."""
    # tg records `a + b` on two symbolic tensors as the method call `a.add(b)`.
    is_add = ((node.op == "call_function" and node.target in (operator.add, torch.add))
              or (node.op == "call_method" and node.target == "add"))
    return (is_add and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args))


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    """Whether two values have the same shape at both probes (so no broadcasting happens)."""
    sa, sb = a.meta.get("tg_spec"), b.meta.get("tg_spec")
    if sa is None or sb is None or getattr(sa, "dtype", None) is None or getattr(sb, "dtype", None) is None:
        return False
    return sa.probes == sb.probes and sa.dtype == sb.dtype


def set_spec(node: fx.Node, spec) -> fx.Node:
    if spec is not None:
        node.meta["tg_spec"] = spec
    return node


def replace_with_call(graph: fx.Graph, at: fx.Node, last: fx.Node, erase: tuple, target, args: tuple,
                      kwargs: dict, name: str) -> fx.Node:
    """A call of ``target`` inserted before ``at``, named ``name``, takes over ``last``'s users and spec; the nodes
    of ``erase`` (users first) go. Returns the call."""
    with graph.inserting_before(at):
        new = graph.call_function(target, args, kwargs)
    new._rename(name)
    set_spec(new, last.meta.get("tg_spec"))
    last.replace_all_uses_with(new)
    for old in erase:
        graph.erase_node(old)
    return new


def attr_node(graph: fx.Graph, owner: str, attr: str, value) -> fx.Node | None:
    """A ``get_attr`` node for ``owner.attr`` (None when the attribute is None)."""
    if value is None:
        return None
    return graph.get_attr(f"{owner}.{attr}" if owner else attr)
