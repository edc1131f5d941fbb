"""RMSNorm written out the LLaMA way -> ``ops.rms_norm_inference``.

HF ``LlamaRMSNorm`` (and Mistral's, Qwen2's, and the copies in most LLaMA-style code)::

    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)

and Meta's reference code (``llama/model.py``, and Mistral's after it), the same computation spelled
``self._norm(x.float()).type_as(x) * self.weight`` with ``_norm(x) = x * torch.rsqrt(x.pow(2).mean(-1,
keepdim=True) + self.eps)``.

Recorded, that is ``to``, ``pow``, ``mean``, ``add``, ``rsqrt``, ``mul``, ``getattr(x, "dtype")``, ``to``
and ``mul``: each a pass over the activations (in a bfloat16 graph also converting): at 8 x 128 x 256, 52-56
us float32 and 84-89 us bfloat16 against 17-26 and 37-38 us for the fused op (``benchmarks/bench_kernels.py``,
its rms_norm_inference rows). Matched node by node, with the cast back to the input's
own dtype (``input_dtype`` read from it, or ``type_as(x)``, so the output dtype follows the input as in eager; a constant
dtype is left alone: with ``dtype=torch.bfloat16`` it would change the output's dtype). Inference only.

torch's own ``nn.RMSNorm`` (torchtitan's LLaMA, and code written for torch >= 2.4) and ``F.rms_norm`` /
``torch.rms_norm`` over the last dim become the same op with ``weight_in_float32=True``: on CPU torch
computes ``x * rsqrt(mean(x**2) + eps) * weight`` in float32 and rounds once (with ``eps=None``
float32's epsilon, for bfloat16 inputs too), where HF rounds before the weight. On CPU that call took
~0.5 ms at 8 x 128 x 256 in a LLaMA forward (torch 2.13: ``aten::_fused_rms_norm`` is composite there).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .aliasing import in_place_hazards
from .common import attr_node, parameter_of, set_spec, single_user

__all__ = ["fuse_rms_norm"]

_TORCH_RMS_NORM = {F.rms_norm, torch.rms_norm}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_FUNCTIONS = {"mul": {operator.mul, torch.mul}, "add": {operator.add, torch.add}, "rsqrt": {torch.rsqrt},
              "pow": {operator.pow, torch.pow}, "mean": {torch.mean}}


def _call(node, name: str) -> bool:
    """``node`` is ``torch.<name>``/an operator, or the tensor method ``<name>``."""
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target == name)
        or (node.op == "call_function" and node.target in _FUNCTIONS.get(name, ())))


def _cast(node, dtype=None) -> tuple[fx.Node, object] | None:
    """``x.to(d)`` / ``x.to(dtype=d)`` (``d`` equal to ``dtype`` when given), ``x.float()`` (d = float32) or
    ``x.type_as(y)`` (d = y): ``(x, d)``."""
    if _call(node, "float") and len(node.args) == 1 and not node.kwargs:
        target = torch.float32
    elif _call(node, "type_as") and len(node.args) == 2 and not node.kwargs:
        target = node.args[1]
    elif _call(node, "to") and len(node.args) + len(node.kwargs) == 2:
        target = node.args[1] if len(node.args) == 2 else node.kwargs.get("dtype")
    else:
        return None
    if target is None or (dtype is not None and target != dtype):
        return None
    return node.args[0], target


def _is_dtype_of(node, x: fx.Node) -> bool:
    """``getattr(x, "dtype")`` (``x.dtype``, recorded), or ``x`` itself (the target of ``type_as(x)``)."""
    return node is x or (isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr
                         and node.args == (x, "dtype"))


def _other(node: fx.Node, one) -> object:
    """The operand of binary ``node`` that is not ``one`` (either order), else None."""
    a, b = node.args if len(node.args) == 2 and not node.kwargs else (None, None)
    return b if a is one else a if b is one else None


def _match(node: fx.Node) -> dict | None:
    """The chain ending at ``weight * normed.to(x.dtype)`` ``node``, or None."""
    if not _call(node, "mul") or len(node.args) != 2 or node.kwargs:
        return None
    for weight, back in (node.args, node.args[::-1]):
        cast = _cast(back) if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
        if cast is not None and single_user(back) is node:
            break
    else:
        return None
    normed, dtype = cast
    if not _call(normed, "mul") or len(normed.args) != 2 or normed.kwargs or single_user(normed) is not back:
        return None
    for hidden, rsqrt in (normed.args, normed.args[::-1]):
        up = _cast(hidden, torch.float32)
        if up is not None and _call(rsqrt, "rsqrt") and single_user(rsqrt) is normed:
            break
    else:
        return None
    x = up[0]
    if not _is_dtype_of(dtype, x) or len(rsqrt.args) != 1 or rsqrt.kwargs:
        return None
    shifted = rsqrt.args[0]
    if not _call(shifted, "add") or single_user(shifted) is not rsqrt:
        return None
    variance = next((a for a in shifted.args if isinstance(a, fx.Node)), None)
    eps = _other(shifted, variance)
    if not isinstance(eps, float) or not _mean_of_squares(variance, hidden, shifted):
        return None
    squares = variance.args[0]
    if set(hidden.users) != {squares, normed}:
        return None
    spec = x.meta.get("tg_spec")
    shape = getattr(spec, "shape", None)
    if not shape or not isinstance(shape[-1], int) or shape[-1] <= 0:
        return None
    return {"x": x, "weight": weight, "eps": eps, "width": shape[-1],
            "erase": [node, back, normed, rsqrt, shifted, variance, squares, hidden]}  # the dtype read: dead code


def _mean_of_squares(variance, hidden: fx.Node, user: fx.Node) -> bool:
    """``hidden.pow(2).mean(-1, keepdim=True)``, read by ``user`` alone."""
    if not _call(variance, "mean") or single_user(variance) is not user:
        return False
    args = dict(zip(("input", "dim", "keepdim"), variance.args), **variance.kwargs)
    if args.get("dim") not in (-1, [-1], (-1,)) or args.get("keepdim") is not True or set(args) - {"input", "dim",
                                                                                                   "keepdim"}:
        return False
    squares = args["input"]
    return _call(squares, "pow") and single_user(squares) is variance and not squares.kwargs \
        and squares.args[0] is hidden and squares.args[1] in (2, 2.0)


def _torch_rms_norm(root: nn.Module, node: fx.Node) -> dict | None:
    """``nn.RMSNorm`` (that class itself: a subclass may change forward), ``F.rms_norm`` or ``torch.rms_norm``
    over the last dim of a float32/bfloat16 input, weight None or a parameter of that dtype: the match."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if type(module) is not nn.RMSNorm or len(node.args) != 1 or node.kwargs:
            return None
        x, shape, eps = node.args[0], module.normalized_shape, module.eps
        weight = None if module.weight is None else (module, module.weight)
    elif node.op == "call_function" and node.target in _TORCH_RMS_NORM:
        args = dict(zip(("input", "normalized_shape", "weight", "eps"), node.args), **node.kwargs)
        if set(args) - {"input", "normalized_shape", "weight", "eps"} or "normalized_shape" not in args:
            return None
        x, shape, eps, weight = args["input"], args["normalized_shape"], args.get("eps"), args.get("weight")
        if weight is not None:
            parameter = parameter_of(root, weight)
            if parameter is None:
                return None
            weight = (weight, parameter)
    else:
        return None
    spec = x.meta.get("tg_spec") if isinstance(x, fx.Node) else None
    width = getattr(spec, "shape", None) and spec.shape[-1]
    if isinstance(shape, (tuple, list)) and len(shape) == 1 and _is_last_dim_of(shape[0], x, spec):
        shape = (width,)  # `F.rms_norm(x, (x.shape[-1],))`
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 1 or shape[0] != width \
            or getattr(spec, "dtype", None) not in _KERNEL_DTYPES or not (eps is None or isinstance(eps, float)):
        return None
    if weight is not None and (tuple(weight[1].shape) != (width,) or weight[1].dtype != spec.dtype):
        return None
    # torch's CPU kernel adds float32's epsilon when eps is None, for bfloat16 inputs as well (its opmath type)
    return {"x": x, "weight": weight, "eps": torch.finfo(torch.float32).eps if eps is None else eps}


def _is_last_dim_of(size, x, spec) -> bool:
    """``size`` reads ``x``'s last dim (``x.shape[-1]``, ``x.size(-1)``), a static one."""
    if not isinstance(size, fx.Node) or not isinstance(getattr(spec, "shape", None), tuple) \
            or not isinstance(spec.shape[-1], int):
        return False
    last = (-1, len(spec.shape) - 1)
    if size.op == "call_method" and size.target == "size":
        return len(size.args) == 2 and size.args[0] is x and size.args[1] in last and not size.kwargs
    if size.op == "call_function" and size.target is operator.getitem and size.args[1] in last:
        shape = size.args[0]
        return isinstance(shape, fx.Node) and shape.op == "call_function" and shape.target is getattr \
            and shape.args == (x, "shape")
    return False


def _fuse_torch_rms_norm(graph: fx.Graph, node: fx.Node, match: dict) -> None:
    with graph.inserting_before(node):
        weight = match["weight"] and match["weight"][0]
        if isinstance(weight, nn.Module):  # nn.RMSNorm: its weight read where it is
            weight = attr_node(graph, node.target, "weight", weight.weight)
        new = graph.call_function(ops.rms_norm_inference, (match["x"], weight, match["eps"], True))
    new._rename("rms_norm")
    set_spec(new, node.meta.get("tg_spec"))
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def fuse_rms_norm(root: nn.Module, graph: fx.Graph) -> int:
    """LLaMA's written-out RMSNorm -> ``ops.rms_norm_inference(x, weight, eps)``, and torch's ``nn.RMSNorm`` /
    ``F.rms_norm`` over the last dim -> ``ops.rms_norm_inference(x, weight, eps, True)`` (inference: no
    backward). A weight of another shape than ``(C,)`` for inputs ``(..., C)``, or an input that may change in
    place, stays as written. Returns how many norms were fused."""
    count = 0
    hazards = in_place_hazards(root, graph)
    for node in list(graph.nodes):
        torch_norm = _torch_rms_norm(root, node) if node.op in ("call_module", "call_function") else None
        if torch_norm is not None:
            if torch_norm["x"] not in hazards:
                _fuse_torch_rms_norm(graph, node, torch_norm)
                count += 1
            continue
        match = _match(node) if node.op in ("call_function", "call_method") else None
        if match is None or match["x"] in hazards:
            continue
        weight = parameter_of(root, match["weight"])
        if weight is None or tuple(weight.shape) != (match["width"],):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(ops.rms_norm_inference, (match["x"], match["weight"], match["eps"]))
        new._rename("rms_norm")
        set_spec(new, node.meta.get("tg_spec"))
        node.replace_all_uses_with(new)
        for old in match["erase"]:
            graph.erase_node(old)
        count += 1
    return count

