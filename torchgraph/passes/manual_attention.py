"""Attention written out by hand -> ``F.scaled_dot_product_attention``.

timm's ``Attention`` with ``fused_attn=False`` (and much hand-written code) spells attention as::

    q = q * self.scale                      # or: (q @ k.transpose(-2, -1)) * scale, or / sqrt(D)
    attn = q @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)             # gone in inference (passes.canonicalize)
    x = attn @ v

which is ``F.scaled_dot_product_attention(q, k, v, scale=scale)`` up to rounding; SDPA never writes
the ``(B, H, T, T)`` scores to memory, and :func:`fuse_qkv_attention` can then fuse the whole block.
Only that chain matches: a mask, dropout, another reader of the scores or probabilities, or a
scale that is not a Python number leaves the code as written.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .common import set_spec, single_user

__all__ = ["write_attention_as_sdpa"]

_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul}
_SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax}
_MUL_FUNCTIONS = {operator.mul, torch.mul}
_DIV_FUNCTIONS = {operator.truediv, torch.div}


def _is_call(node, functions: set, method: str) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_function" and node.target in functions)
                                          or (node.op == "call_method" and node.target == method))


def _rank(node) -> int | None:
    spec = node.meta.get("tg_spec") if isinstance(node, fx.Node) else None
    probes = getattr(spec, "probes", None) if getattr(spec, "dtype", None) is not None else None
    return len(probes[0]) if probes else None


def _matmul_operands(node) -> tuple | None:
    if not _is_call(node, _MATMUL_FUNCTIONS, "matmul") or len(node.args) != 2 or node.kwargs:
        return None
    return node.args


def _softmax_input(node) -> fx.Node | None:
    """``x.softmax(dim=-1)`` / ``F.softmax(x, dim=-1)`` / ``torch.softmax(x, -1)`` on a 4-D value."""
    if not _is_call(node, _SOFTMAX_FUNCTIONS, "softmax"):
        return None
    args = dict(zip(("input", "dim"), node.args), **node.kwargs)
    args.pop("_stacklevel", None)
    if set(args) - {"input", "dim", "dtype"} or args.get("dtype") is not None:
        return None
    x = args.get("input")
    return x if _rank(x) == 4 and args.get("dim") in (-1, 3) else None


def _scaled(node) -> tuple[fx.Node, float] | None:
    """``x * s``, ``s * x`` or ``x / d`` with a Python number: ``(x, scale)``."""
    if len(getattr(node, "args", ())) != 2 or node.kwargs:
        return None
    a, b = node.args
    if _is_call(node, _MUL_FUNCTIONS, "mul"):
        x, s = (a, b) if isinstance(b, (int, float)) else (b, a)
        return (x, float(s)) if isinstance(x, fx.Node) and isinstance(s, (int, float)) else None
    if _is_call(node, _DIV_FUNCTIONS, "div") and isinstance(a, fx.Node) and isinstance(b, (int, float)) and b:
        return a, 1.0 / b
    return None


def _transposed_key(node) -> fx.Node | None:
    """``k.transpose(-2, -1)`` (either order, negative or positive dims) of a 4-D ``k``: ``k``."""
    if not isinstance(node, fx.Node) or node.kwargs:
        return None
    if not (node.op == "call_method" and node.target == "transpose") and \
            not (node.op == "call_function" and node.target is torch.transpose):
        return None
    k = node.args[0]
    dims = {d % 4 for d in node.args[1:] if isinstance(d, int)}
    return k if _rank(k) == 4 and len(node.args) == 3 and dims == {2, 3} else None


def _match(node: fx.Node) -> dict | None:
    """``softmax(scale * q @ k^T) @ v`` ending at ``node``: its q, k, v, scale and nodes."""
    operands = _matmul_operands(node)
    if operands is None:
        return None
    probabilities, v = operands
    scores = _softmax_input(probabilities)
    if scores is None or single_user(probabilities) is not node or single_user(scores) is not probabilities:
        return None
    chain, scale = [probabilities, scores], 1.0
    scaled = _scaled(scores)
    if scaled is not None:  # (q @ k^T) * scale
        scores, scale = scaled
        if single_user(scores) is not chain[-1]:
            return None
        chain.append(scores)
    operands = _matmul_operands(scores)
    if operands is None:
        return None
    q, key_t = operands
    k = _transposed_key(key_t)
    if k is None or single_user(key_t) is not scores:
        return None
    chain.append(key_t)
    scaled = _scaled(q) if scale == 1.0 else None
    if scaled is not None and single_user(q) is scores:  # (q * scale) @ k^T
        chain.append(q)
        q, scale = scaled
    if not all(_rank(t) == 4 for t in (q, k, v)):
        return None
    for qs, ks, vs in zip(*(t.meta["tg_spec"].probes for t in (q, k, v))):  # no broadcasting, as SDPA wants
        if not (qs[:2] == ks[:2] == vs[:2] and ks[2] == vs[2] and qs[3] == ks[3]):
            return None
    return {"q": q, "k": k, "v": v, "scale": scale, "erase": chain}


def write_attention_as_sdpa(root: nn.Module, graph: fx.Graph) -> int:
    """``softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v`` (4-D, no mask, no dropout, the
    scores and probabilities read by the chain alone) -> ``F.scaled_dot_product_attention(q, k, v,
    scale=scale)``. Returns how many were rewritten."""
    count = 0
    for node in list(graph.nodes):
        match = _match(node) if node.op in ("call_function", "call_method") else None
        if match is None:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(F.scaled_dot_product_attention, (match["q"], match["k"], match["v"]),
                                      {"scale": match["scale"]})
        new._rename("sdpa")
        set_spec(new, node.meta.get("tg_spec"))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for old in match["erase"]:
            graph.erase_node(old)
        count += 1
    return count
