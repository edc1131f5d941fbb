"""Layers written out the HuggingFace way -> the forms the fusion passes know.

GPT-2 (and DistilGPT-2, GPT-Neo's MLP... every model built on ``transformers.pytorch_utils.Conv1D``)
writes its linears as ``Conv1D``: a weight stored ``(in, out)`` and a forward of
``torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)``, and its activation as
``NewGELUActivation``: ``0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 *
torch.pow(x, 3.0))))``. Recorded, these are an ``addmm`` and eight elementwise ops, which no
fusion pass matches. Three rewrites bring them to the spelling the passes know:

* :func:`write_gelu_as_function`: the tanh approximation written out (GPT-2's ``gelu_new``) and the
  exact GELU written with ``erf`` (``x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))``, original
  BERT code) -> ``F.gelu(x[, approximate="tanh"])`` (equal up to float rounding);
* :func:`linear_from_addmm` (inference): ``addmm(owner.bias, x, owner.weight)`` of a module holding
  just those two parameters -> an ``nn.Linear`` at the same path whose weight is the transposed
  copy (NOTE: [Conv1D as nn.Linear]);
* :func:`sink_activation_through_view`: ``act(y.view(shape))`` -> ``act(y).view(shape)``, so the
  activation sits right after its linear, where :func:`fuse_linear_act` absorbs it.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .common import activation_of, set_spec, single_user

__all__ = ["linear_from_addmm", "sink_activation_through_view", "write_gelu_as_function"]

_BINARY = {"mul": {operator.mul, torch.mul}, "add": {operator.add, torch.add},
           "div": {operator.truediv, torch.div}, "pow": {operator.pow, torch.pow}}
_UNARY = {"tanh": {torch.tanh}, "erf": {torch.erf, torch.special.erf}}


def _is(node, name: str) -> bool:
    functions = _BINARY.get(name) or _UNARY[name]
    return isinstance(node, fx.Node) and not node.kwargs and (
        (node.op == "call_function" and node.target in functions) or (node.op == "call_method" and node.target == name))


def _with_constant(node, name: str, value: float, commutes: bool = True) -> fx.Node | None:
    """``op(x, value)`` (or ``op(value, x)`` for a commuting op), ``value`` to 1e-9 relative: ``x``."""
    if not _is(node, name) or len(node.args) != 2:
        return None
    for x, c in ((node.args[0], node.args[1]), (node.args[1], node.args[0]) if commutes else (None, None)):
        if isinstance(x, fx.Node) and isinstance(c, (int, float)) and not isinstance(c, bool) \
                and math.isclose(c, value, rel_tol=1e-9):
            return x
    return None


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return single_user(node) is user


def _pair(node, name: str) -> tuple | None:
    """The two node operands of ``op(a, b)``."""
    if not _is(node, name) or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    return tuple(node.args)


def _half_x_times(node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(0.5 * x) * other`` in either order: ``(x, other, the 0.5 * x node)``."""
    pair = _pair(node, "mul")
    if pair is None:
        return None
    for half, other in (pair, pair[::-1]):
        x = _with_constant(half, "mul", 0.5)
        if x is not None and _only_user(half, node):
            return x, other, half
    return None


def _gelu_outline(node: fx.Node, unary: str) -> tuple | None:
    """``(0.5 * x) * (1 + unary(...))`` ending at ``node``, its inner nodes read by the chain alone:
    ``(x, the 0.5 * x node, the 1 + ... node, the unary node)``."""
    found = _half_x_times(node)
    if found is None:
        return None
    x, one_plus, half = found
    f = _with_constant(one_plus, "add", 1.0)
    if not _is(f, unary) or len(f.args) != 1 or not _only_user(one_plus, node) or not _only_user(f, one_plus):
        return None
    return x, half, one_plus, f


def _tanh_gelu(node: fx.Node) -> tuple[fx.Node, list] | None:
    """``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`` ending at ``node``: ``(x, chain)``."""
    outline = _gelu_outline(node, "tanh")
    if outline is None:
        return None
    x, half, one_plus, t = outline
    inner = _with_constant(t.args[0], "mul", math.sqrt(2.0 / math.pi))
    pair = _pair(inner, "add") if inner is not None and _only_user(t.args[0], t) else None
    if pair is None or not _only_user(inner, t.args[0]):
        return None
    cubic_term = pair[1] if pair[0] is x else pair[0] if pair[1] is x else None
    cube = _with_constant(cubic_term, "mul", 0.044715) if cubic_term is not None else None
    if cube is None or not _only_user(cubic_term, inner) or not _only_user(cube, cubic_term):
        return None
    if not (_with_constant(cube, "pow", 3.0, commutes=False) is x):
        return None
    return x, [node, one_plus, half, t, t.args[0], inner, cubic_term, cube]


def _erf_gelu(node: fx.Node) -> tuple[fx.Node, list] | None:
    """``0.5 * x * (1 + erf(x / sqrt(2)))`` (or ``x * 0.5 * ...``, ``erf(x * (1 / sqrt(2)))``): ``(x, chain)``."""
    outline = _gelu_outline(node, "erf")
    if outline is None:
        return None
    x, half, one_plus, e = outline
    scaled = e.args[0]
    inner = _with_constant(scaled, "div", math.sqrt(2.0), commutes=False) or \
        _with_constant(scaled, "mul", 1.0 / math.sqrt(2.0))
    if inner is not x or not _only_user(scaled, e):
        return None
    return x, [node, one_plus, half, e, scaled]


def write_gelu_as_function(root: nn.Module, graph: fx.Graph) -> int:
    """GELU written out with ``tanh`` (GPT-2's ``gelu_new``) or ``erf`` -> ``F.gelu``.

    Example:
        >>> import math, torch, torchgraph as tg
        >>> x = tg.Input(shape=(8,))
        >>> y = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
        >>> model = tg.Model(x, y)
        >>> write_gelu_as_function(model, model.graph)
        1
        >>> [n.op for n in model.graph.nodes]
        ['placeholder', 'call_function', 'output']
    """
    count, erased = 0, set()
    for node in reversed(list(graph.nodes)):
        if node in erased or node.op == "output":
            continue
        for matcher, approximate in ((_tanh_gelu, "tanh"), (_erf_gelu, "none")):
            match = matcher(node)
            if match is None:
                continue
            x, chain = match
            with graph.inserting_before(node):
                new = graph.call_function(F.gelu, (x,), {"approximate": approximate} if approximate != "none" else {})
            set_spec(new, node.meta.get("tg_spec"))
            node.replace_all_uses_with(new)
            for old in chain:
                graph.erase_node(old)
            erased.update(chain)
            count += 1
            break
    return count


# NOTE: [Conv1D as nn.Linear] HuggingFace's Conv1D stores its weight (in, out), the transpose of
# nn.Linear's, and calls addmm. In inference, tg.optimize works on its own copy of the model, so the
# module is replaced there by an nn.Linear at the same path holding the transposed weight (a
# contiguous copy made once) and the same bias: fuse_linear_act then fuses it like any linear
# (oneDNN's prepacked weight, the activation in its epilogue). The optimized model's state_dict keeps
# the key and shows the transposed shape, so loading a Conv1D checkpoint into it fails loudly
# (a shape mismatch) rather than silently loading untransposed weights. Only a module holding exactly
# a 2-D weight and a 1-D bias, read by this addmm alone, with addmm's default beta and alpha, is
# replaced; training mode (inference=False) keeps the addmm, so gradients reach the original weight.
def _readers_by_owner(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Module path -> the nodes that call that module or read one of its attributes."""
    readers: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op in ("get_attr", "call_module"):
            owner = n.target.rpartition(".")[0] if n.op == "get_attr" else n.target
            readers.setdefault(owner, []).append(n)
    return readers


def _addmm_owner(root: nn.Module, node: fx.Node, readers: dict) -> tuple[str, nn.Module] | None:
    if not (node.op == "call_function" and node.target is torch.addmm and len(node.args) == 3 and not node.kwargs):
        return None
    bias, x, weight = node.args
    if not all(isinstance(a, fx.Node) for a in (bias, x, weight)) or bias.op != "get_attr" or weight.op != "get_attr":
        return None
    path, _, bias_name = bias.target.rpartition(".")
    if weight.target != (f"{path}.weight" if path else "weight") or bias_name != "bias":
        return None
    owner = root.get_submodule(path)
    params = dict(owner.named_parameters(recurse=False))
    if set(params) != {"weight", "bias"} or list(owner.buffers(recurse=False)) or list(owner.children()):
        return None
    w, b = params["weight"], params["bias"]
    if w.dim() != 2 or b.dim() != 1 or b.shape[0] != w.shape[1]:
        return None
    spec = x.meta.get("tg_spec")
    if getattr(spec, "dtype", None) is None or len(spec.probes[0]) != 2:
        return None
    # the owner has no submodules, so its readers are its own attributes' get_attrs and its calls
    if sorted(readers.get(path, []), key=id) != sorted([bias, weight], key=id) or len(bias.users) != 1 \
            or len(weight.users) != 1:
        return None
    return path, owner


def linear_from_addmm(root: nn.Module, graph: fx.Graph) -> int:
    """``torch.addmm(m.bias, x, m.weight)`` of a Conv1D-like module ``m`` -> ``nn.Linear`` (inference only).

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> class Conv1D(nn.Module):  # transformers.pytorch_utils.Conv1D
        ...     def __init__(self, nf, nx):
        ...         super().__init__()
        ...         self.nf = nf
        ...         self.weight = nn.Parameter(torch.randn(nx, nf))
        ...         self.bias = nn.Parameter(torch.zeros(nf))
        ...     def forward(self, x):
        ...         size_out = x.size()[:-1] + (self.nf,)
        ...         x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        ...         return x.view(size_out)
        >>> net = tg.from_module(nn.Sequential(Conv1D(6, 4)), (4,))
        >>> linear_from_addmm(net, net.graph), type(net.get_submodule("0")).__name__
        (1, 'Linear')
    """
    count = 0
    readers = _readers_by_owner(graph)  # a rewrite below changes only its own owner's readers
    for node in list(graph.nodes):
        found = _addmm_owner(root, node, readers)
        if found is None:
            continue
        path, owner = found
        bias_node, x, weight_node = node.args
        linear = nn.Linear(owner.weight.shape[0], owner.weight.shape[1], device="meta")
        linear.weight = nn.Parameter(owner.weight.detach().t().contiguous(), owner.weight.requires_grad)
        linear.bias = owner.bias
        linear.train(owner.training)
        root.set_submodule(path, linear)
        with graph.inserting_before(node):
            new = graph.call_module(path, (x,))
        set_spec(new, node.meta.get("tg_spec"))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(bias_node)
        graph.erase_node(weight_node)
        count += 1
    return count


_VIEWS = {"view", "reshape"}


def sink_activation_through_view(root: nn.Module, graph: fx.Graph) -> int:
    """``act(y.view(shape))`` -> ``act(y).view(shape)`` where ``y`` and the view have that one user
    (an elementwise activation commutes with a view), so the activation can fuse into ``y``'s linear."""
    count = 0
    for node in list(graph.nodes):
        if not (node.op == "call_method" and node.target in _VIEWS and node.args and isinstance(node.args[0], fx.Node)):
            continue
        y, act_node = node.args[0], single_user(node)
        if act_node is None or single_user(y) is not node or activation_of(root, act_node, node) is None:
            continue
        if act_node.op == "call_module":
            continue
        with graph.inserting_before(node):
            moved = graph.create_node(act_node.op, act_node.target, (y,) + tuple(act_node.args[1:]),
                                      dict(act_node.kwargs))
            view = graph.call_method(node.target, (moved,) + tuple(node.args[1:]), dict(node.kwargs))
        set_spec(moved, y.meta.get("tg_spec"))
        set_spec(view, act_node.meta.get("tg_spec"))
        act_node.replace_all_uses_with(view)
        graph.erase_node(act_node)
        graph.erase_node(node)
        count += 1
    return count
