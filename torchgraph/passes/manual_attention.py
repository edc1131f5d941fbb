"""Attention written out by hand -> ``F.scaled_dot_product_attention``.

timm's ``Attention`` with ``fused_attn=False`` (and much hand-written code) spells attention as::

    q = q * self.scale                      # or: (q @ k.transpose(-2, -1)) * scale, or / sqrt(D)
    attn = q @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)             # gone in inference (passes.canonicalize)
    x = attn @ v

which is ``F.scaled_dot_product_attention(q, k, v, scale=scale)`` up to rounding; SDPA never writes
the ``(B, H, T, T)`` scores to memory, and :func:`fuse_qkv_attention` can then fuse the whole block.
nanoGPT's non-flash path adds a causal mask from a buffer before the softmax::

    att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))   # bias = tril(ones(N, N))

which is ``is_causal=True`` (NOTE: [Causal mask from a buffer]). Meta's reference LLaMA and HF's eager
attention add a float mask to the scores and run the softmax in float32::

    scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
    scores = F.softmax(scores.float(), dim=-1).type_as(xq)      # HF: softmax(..., dtype=torch.float32)
                                                                #     .to(query.dtype)

which becomes :func:`torchgraph.fused.attention_with_additive_mask` (SDPA with ``attn_mask``, except
for a mask with a row of ``-inf`` at every key: NOTE: [Additive masks]). Only those chains match: a
boolean added to the scores, dropout, another reader of the scores or probabilities, a cast to
another dtype than the query's, or a scale that is not a Python number leaves the code as written.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import fused
from .aliasing import in_place_hazards
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
    if set(args) - {"input", "dim", "dtype"} or args.get("dtype") not in (None, torch.float32):
        return None  # dtype=torch.float32 (HF's eager attention): an upcast, as `.float()` before it
    x = args.get("input")
    return x if _rank(x) == 4 and args.get("dim") in (-1, 3) else None


def _upcast(node) -> fx.Node | None:
    """``x.float()`` / ``x.to(torch.float32)`` (Meta's ``F.softmax(scores.float(), dim=-1)``): ``x``."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or node.kwargs:
        return None
    if (node.target == "float" and len(node.args) == 1) or \
            (node.target == "to" and len(node.args) == 2 and node.args[1] is torch.float32):
        return node.args[0]
    return None


def _cast_back(node) -> tuple[fx.Node, object] | None:
    """``p.type_as(t)`` / ``p.to(t.dtype)`` (the probabilities back to the query's dtype): ``(p, t or its
    dtype read)``; the caller checks that ``t`` is the query."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or node.kwargs or len(node.args) != 2:
        return None
    if node.target == "type_as":
        return node.args[0], node.args[1]
    target = node.args[1]
    if node.target == "to" and isinstance(target, fx.Node) and target.op == "call_function" \
            and target.target is getattr and target.args[1:] == ("dtype",):
        return node.args[0], target.args[0]
    return None


def _additive_mask(node) -> tuple[fx.Node, fx.Node] | None:
    """``scores + mask`` (either order) with a floating ``mask`` that broadcasts to the 4-D scores:
    ``(scores, mask)``. A boolean mask is no additive mask (``+`` would add ones)."""
    if not _is_call(node, {operator.add, torch.add}, "add") or len(node.args) != 2 or node.kwargs:
        return None
    for scores, mask in (node.args, node.args[::-1]):
        if not (isinstance(scores, fx.Node) and isinstance(mask, fx.Node)) or _rank(scores) != 4:
            continue
        spec = mask.meta.get("tg_spec")
        if getattr(spec, "dtype", None) is None or not spec.dtype.is_floating_point:
            continue
        try:
            if all(torch.broadcast_shapes(m, s) == tuple(s) for m, s in
                   zip(spec.probes, scores.meta["tg_spec"].probes)):
                return scores, mask
        except (RuntimeError, KeyError, AttributeError):
            continue
    return None


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


# NOTE: [Causal mask from a buffer] nanoGPT registers ``bias = torch.tril(torch.ones(N, N)).view(1,
# 1, N, N)`` and fills the scores with -inf where ``bias[:, :, :T, :T] == 0``. With as many keys as
# queries (T each), that is exactly SDPA's ``is_causal=True`` (a lower-triangular mask aligned at the
# top left), and every row keeps its diagonal, so no row is fully masked. The match reads the
# buffer's values when tg.optimize runs (the optimized copy owns its buffers) and requires a tril of
# ones, a slice from 0 of the same length on both dims, and probe shapes that show T queries and T
# keys. Eager fails when T exceeds N (the sliced mask no longer fits the scores); SDPA would not, so
# a dynamic T keeps that failure as a ``torch._assert`` of ``T <= N`` (T is the slice's end, a
# value of the graph already: reading q's size would give q a second user and stop the qkv fusion).
_EQ_FUNCTIONS = {operator.eq, torch.eq}


def _slice_to(index) -> object:
    """The end of ``slice(None or 0, end)`` (a node or an int), else None."""
    if not isinstance(index, slice) or index.start not in (None, 0) or index.step not in (None, 1):
        return None
    return index.stop


def _causal_buffer_rows(root: nn.Module, mask) -> tuple[int, object] | None:
    """``buffer[:, :, :T, :T] == 0`` (or ``buffer[:T, :T] == 0``) of a ``tril(ones(N, N))`` buffer:
    ``(N, T)``, T a node or an int."""
    if not _is_call(mask, _EQ_FUNCTIONS, "eq") or len(mask.args) != 2 or mask.kwargs or mask.args[1] != 0:
        return None
    sliced = mask.args[0]
    if not (isinstance(sliced, fx.Node) and sliced.op == "call_function" and sliced.target is operator.getitem):
        return None
    buffer_node, index = sliced.args
    if not (isinstance(buffer_node, fx.Node) and buffer_node.op == "get_attr" and isinstance(index, tuple)):
        return None
    owner, _, name = buffer_node.target.rpartition(".")
    try:
        buffer = getattr(root.get_submodule(owner), name)
    except AttributeError:
        return None
    if not isinstance(buffer, torch.Tensor) or buffer.dim() != len(index) or buffer.dim() < 2:
        return None
    rows_end, cols_end = _slice_to(index[-2]), _slice_to(index[-1])
    same_end = rows_end is cols_end if isinstance(rows_end, fx.Node) else \
        (isinstance(rows_end, int) and rows_end == cols_end)
    if any(i != slice(None) for i in index[:-2]) or not same_end:
        return None
    n = buffer.shape[-1]
    if buffer.shape[-2] != n or any(d != 1 for d in buffer.shape[:-2]):
        return None
    square = buffer.reshape(n, n)
    if not torch.equal(square != 0, torch.ones(n, n, dtype=torch.bool, device=square.device).tril()):
        return None
    return n, rows_end


def _causal_masked(root: nn.Module, node) -> tuple[fx.Node, tuple] | None:
    """``scores.masked_fill(causal mask, -inf)``: ``(scores, (N, T))``."""
    if not _is_call(node, {torch.masked_fill}, "masked_fill") or node.kwargs or len(node.args) != 3:
        return None
    scores, mask, value = node.args
    if not (isinstance(value, float) and value == float("-inf")) or not isinstance(scores, fx.Node):
        return None
    causal = _causal_buffer_rows(root, mask)
    if causal is None or single_user(mask) is not node:
        return None
    probes = [getattr(t.meta.get("tg_spec"), "probes", None) for t in (scores, mask)]
    if probes[0] is None or probes[1] is None:
        return None
    for score_shape, mask_shape in zip(*probes):  # T queries, T keys, the mask T x T
        if len(score_shape) != 4 or score_shape[2] != score_shape[3] or tuple(mask_shape[-2:]) != score_shape[2:]:
            return None
    return scores, causal


def _match(root: nn.Module, node: fx.Node) -> dict | None:
    """``softmax(scale * q @ k^T [+ causal mask]) @ v`` ending at ``node``: its q, k, v, scale and nodes."""
    operands = _matmul_operands(node)
    if operands is None:
        return None
    probabilities, v = operands
    chain, back = [], _cast_back(probabilities)
    if back is not None:  # `.type_as(q)` / `.to(q.dtype)` after a float32 softmax
        if single_user(probabilities) is not node:
            return None
        chain.append(probabilities)
        probabilities, back = back
    scores = _softmax_input(probabilities)
    if scores is None or single_user(probabilities) is not (chain[-1] if chain else node) \
            or single_user(scores) is not probabilities:
        return None
    chain += [probabilities, scores]
    scale, causal, mask = 1.0, None, None
    upcast = _upcast(scores)
    if upcast is not None:  # Meta's `F.softmax(scores.float(), dim=-1)`
        scores = upcast
        if single_user(scores) is not chain[-1]:
            return None
        chain.append(scores)
    masked = _causal_masked(root, scores)
    added = _additive_mask(scores) if masked is None else None
    if masked is not None:  # the mask's own nodes go with dead-code elimination
        scores, causal = masked
        if single_user(scores) is not chain[-1]:
            return None
        chain.append(scores)
    elif added is not None:  # NOTE: [Additive masks]
        scores, mask = added
        if single_user(scores) is not chain[-1]:
            return None
        chain.append(scores)
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
    query = q  # what a cast back may name (the query as multiplied, before a scale is taken off it)
    k = _transposed_key(key_t)
    if k is None or single_user(key_t) is not scores:
        return None
    chain.append(key_t)
    scaled = _scaled(q) if scale == 1.0 else None
    if scaled is not None and single_user(q) is scores:  # (q * scale) @ k^T
        chain.append(q)
        q, scale = scaled
    if back is not None and back is not q and back is not query:
        return None  # a cast to another tensor's dtype than the query's
    if not all(_rank(t) == 4 for t in (q, k, v)):
        return None
    for qs, ks, vs in zip(*(t.meta["tg_spec"].probes for t in (q, k, v))):  # no broadcasting, as SDPA wants
        if not (qs[:2] == ks[:2] == vs[:2] and ks[2] == vs[2] and qs[3] == ks[3]):
            return None
    return {"q": q, "k": k, "v": v, "scale": scale, "causal": causal, "mask": mask, "erase": chain}


def write_attention_as_sdpa(root: nn.Module, graph: fx.Graph) -> int:
    """``softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v`` (4-D, no mask or nanoGPT's causal
    buffer mask, no dropout, the scores and probabilities read by the chain alone) ->
    ``F.scaled_dot_product_attention(q, k, v, scale=scale[, is_causal=True])``; with an additive float
    mask (``+ mask``) -> ``fused.attention_with_additive_mask(q, k, v, mask, scale)``. Returns how many were
    rewritten. A query or key that may change in place keeps the chain as written (the scores would
    move to the last matmul: NOTE: [Fusions move work] in aliasing.py)."""
    count = 0
    hazards = in_place_hazards(root, graph)
    for node in list(graph.nodes):
        match = _match(root, node) if node.op in ("call_function", "call_method") else None
        if match is None or match["q"] in hazards or match["k"] in hazards:
            continue
        options = {"scale": match["scale"]}
        with graph.inserting_before(node):
            if match["causal"] is not None:  # NOTE: [Causal mask from a buffer]
                rows, length = match["causal"]
                if isinstance(length, fx.Node):  # a static length fitted at build time already
                    fits = graph.call_function(operator.le, (length, rows))
                    graph.call_function(torch._assert, (fits, f"attention: the causal mask buffer has {rows} "
                                                              "rows; the sequence is longer"))
                options["is_causal"] = True
            if match["mask"] is not None:  # NOTE: [Additive masks]
                new = graph.call_function(fused.attention_with_additive_mask,
                                          (match["q"], match["k"], match["v"], match["mask"], match["scale"]))
            else:
                new = graph.call_function(F.scaled_dot_product_attention,
                                          (match["q"], match["k"], match["v"]), options)
        new._rename("sdpa")
        set_spec(new, node.meta.get("tg_spec"))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for old in match["erase"]:
            graph.erase_node(old)
        count += 1
    return count
