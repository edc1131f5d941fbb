"""Multi-head attention on a packed projection -> ``fused.qkv_attention``.

The pattern is the standard way to write self-attention by hand (and ``applications.GPTBlock``)::

    q, k, v = qkv.chunk(3, dim=-1)                       # qkv: (B, T, 3E), one Linear
    q = q.view(B, T, H, D).transpose(1, 2)               # same for k and v
    a = F.scaled_dot_product_attention(q, k, v, is_causal=...)
    y = a.transpose(1, 2).reshape(B, T, E)               # (or .view / .flatten(2))

All of it becomes ``fused.qkv_attention(qkv, H, causal, scale=...)``. Shapes are checked on the
recorded probe shapes (``tg_spec``), not on the call arguments, so any spelling of the head split and
merge that gives these shapes matches. Attention masks, dropout and grouped-query attention are left
alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import fused
from .aliasing import in_place_hazards
from .common import permute_dims, set_spec, single_user

__all__ = ["fuse_qkv_attention", "use_inference_attention"]

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _probes(node) -> tuple | None:
    spec = node.meta.get("tg_spec") if isinstance(node, fx.Node) else None
    if spec is None or getattr(spec, "dtype", None) is None:
        return None
    return spec.probes


def _sdpa_arguments(node: fx.Node) -> dict | None:
    if node.op != "call_function" or node.target not in _SDPA or len(node.args) > len(_SDPA_PARAMS):
        return None
    bound = dict(_SDPA_DEFAULTS, **dict(zip(_SDPA_PARAMS, node.args)))
    if set(node.kwargs) - set(_SDPA_PARAMS):
        return None
    bound.update(node.kwargs)
    return bound


def _is_head_transpose(node: fx.Node) -> bool:
    """``x.transpose(1, 2)`` (or ``(2, 1)``), as a method or ``torch.transpose``."""
    if not isinstance(node, fx.Node) or node.kwargs:
        return False
    if node.op == "call_method" and node.target == "transpose":
        dims = node.args[1:]
    elif node.op == "call_function" and node.target is torch.transpose:
        dims = node.args[1:]
    else:
        return False
    return tuple(sorted(dims)) == (1, 2)


def _method_or_function(node, method: str, function) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_method" and node.target == method)
                                          or (node.op == "call_function" and node.target is function))


def _split_of_qkv(node: fx.Node) -> fx.Node | None:
    """``qkv.chunk(3, -1)`` or ``qkv.split(E, -1)`` (nanoGPT: ``split(n_embd, dim=2)``) of a
    ``(B, T, 3E)`` value: the qkv node, else None."""
    if _method_or_function(node, "chunk", torch.chunk):
        args = dict(zip(("input", "chunks", "dim"), node.args), **node.kwargs)
        if args.get("chunks") != 3:
            return None
    elif _method_or_function(node, "split", torch.split):
        args = dict(zip(("input", "split_size", "dim"), node.args), **node.kwargs)
        if "split_size_or_sections" in args:
            args["split_size"] = args.pop("split_size_or_sections")
    else:
        return None
    qkv = args.get("input")
    probes = _probes(qkv)
    if probes is None or any(len(p) != 3 for p in probes) or args.get("dim", 0) not in (-1, 2):
        return None
    if "split_size" in args:
        size = args["split_size"]
        sizes = [size] * 3 if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else None
        if sizes is None or any(sizes != [p[2] // 3] * 3 for p in probes):
            return None
    return qkv


def _head_split(node) -> tuple[fx.Node, int, list, list] | None:
    """One of q, k, v in ``(B, H, T, D)`` cut from a packed ``(B, T, 3E)`` projection:
    ``(qkv, position, its own nodes, nodes shared by q, k and v)``. Two spellings:

    * split/chunk -> ``view``/``reshape`` to ``(B, T, H, D)`` -> ``transpose(1, 2)`` (hand-written,
      nanoGPT, HF);
    * ``reshape(B, T, 3, H, D)`` -> ``permute(2, 0, 3, 1, 4)`` -> ``unbind(0)`` (timm).
    """
    if _is_head_transpose(node):
        split = node.args[0]
        if not isinstance(split, fx.Node) or single_user(split) is not node or split.op != "call_method" \
                or split.target not in ("view", "reshape", "unflatten"):
            return None
        item = split.args[0]
        if not isinstance(item, fx.Node) or item.op != "call_function" or item.target is not operator.getitem \
                or single_user(item) is not split or not isinstance(item.args[1], int):
            return None
        source = item.args[0]
        qkv = _split_of_qkv(source) if isinstance(source, fx.Node) else None
        if qkv is None:
            return None
        return qkv, item.args[1], [node, split, item], [source]
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem \
            and isinstance(node.args[1], int):
        unbind = node.args[0]
        if not _method_or_function(unbind, "unbind", torch.unbind) or \
                dict(zip(("input", "dim"), unbind.args), **unbind.kwargs).get("dim", 0) != 0:
            return None
        permute = unbind.args[0]
        if permute_dims(permute) != (2, 0, 3, 1, 4) or single_user(permute) is not unbind:
            return None
        reshape = permute.args[0]
        if not isinstance(reshape, fx.Node) or reshape.op != "call_method" or \
                reshape.target not in ("view", "reshape") or single_user(reshape) is not permute:
            return None
        qkv = reshape.args[0]
        probes, heads = _probes(qkv), _probes(reshape)
        if probes is None or heads is None:
            return None
        for (b, t, width), split in zip(probes, heads):
            if len(split) != 5 or split[:3] != (b, t, 3) or 3 * split[3] * split[4] != width:
                return None
        return qkv, node.args[1], [node], [unbind, permute, reshape]
    return None


def _match(node: fx.Node) -> dict | None:
    """The pattern ending in the head merge after SDPA ``node``, or None."""
    args = _sdpa_arguments(node)
    if args is None or args["attn_mask"] is not None or args["dropout_p"] != 0.0 or args["enable_gqa"]:
        return None
    if not isinstance(args["is_causal"], bool) or not (args["scale"] is None or isinstance(args["scale"], float)):
        return None
    chain, shared, qkv = [node], [], None
    for position, name in enumerate(("query", "key", "value")):
        head = args[name]
        if not isinstance(head, fx.Node) or single_user(head) is not node:
            return None
        found = _head_split(head)
        if found is None or found[1] != position or (qkv is not None and found[0] is not qkv):
            return None
        qkv, shared = found[0], found[3]
        chain += found[2]
    if len(shared[0].users) != 3:  # the split/unbind feeds exactly q, k and v
        return None
    # shapes: q, k, v are (B, H, T, D) with 3 * H * D the packed width, the same H at both probes
    q_probes, qkv_probes = _probes(args["query"]), _probes(qkv)
    if q_probes is None or qkv_probes is None or not q_probes == _probes(args["key"]) == _probes(args["value"]):
        return None
    heads = {p[1] for p in q_probes}
    for (b, t, width), q in zip(qkv_probes, q_probes):
        if len(q) != 4 or (q[0], q[2]) != (b, t) or 3 * q[1] * q[3] != width:
            return None
    # the merge: SDPA's (B, H, T, D) -> transpose(1, 2) [-> contiguous()] -> (B, T, E) by any reshape
    back = single_user(node)
    if back is None or not _is_head_transpose(back):
        return None
    merge, dense = single_user(back), None
    if merge is not None and merge.op == "call_method" and merge.target == "contiguous" and len(merge.args) == 1:
        dense, merge = merge, single_user(merge)
    if merge is None or merge.op != "call_method" or merge.target not in ("reshape", "view", "flatten"):
        return None
    merged = _probes(merge)
    if merged is None or len(heads) != 1 or \
            merged != tuple((b, t, width // 3) for b, t, width in qkv_probes):
        return None
    erase = [merge] + ([dense] if dense is not None else []) + [back] + chain + shared
    return {"qkv": qkv, "heads": heads.pop(), "causal": args["is_causal"], "scale": args["scale"],
            "merge": merge, "erase": erase}


def fuse_qkv_attention(root: nn.Module, graph: fx.Graph) -> int:
    """Self-attention written as chunk -> head split -> SDPA -> head merge ->
    ``fused.qkv_attention(qkv, heads, causal, scale)`` (one kernel, forward and backward). A ``qkv``
    that may change in place stays as written (NOTE: [Fusions move work] in aliasing.py)."""
    count = 0
    hazards = in_place_hazards(root, graph)
    for node in list(graph.nodes):
        match = _match(node) if node.op == "call_function" else None
        if match is None or match["qkv"] in hazards:
            continue
        merge = match["merge"]
        with graph.inserting_before(merge):
            kwargs = {} if match["scale"] is None else {"scale": match["scale"]}
            new = graph.call_function(fused.qkv_attention, (match["qkv"], match["heads"], match["causal"]),
                                      kwargs)
        new._rename("attention")
        set_spec(new, merge.meta.get("tg_spec"))
        merge.replace_all_uses_with(new)
        for old in match["erase"]:
            graph.erase_node(old)
        count += 1
    return count


def use_inference_attention(root: nn.Module, graph: fx.Graph) -> int:
    """Every ``F.scaled_dot_product_attention`` call :func:`fuse_qkv_attention` left (HF LLaMA's after its
    rotary embeddings, masked attention, cross-attention) -> ``fused.scaled_dot_product_attention`` with the
    same arguments, which runs ``ops.attention_inference`` where that applies and is faster, else SDPA
    itself. Inference only (the kernel has no backward). Returns how many calls were rewritten."""
    count = 0
    for node in graph.nodes:
        if node.op == "call_function" and _sdpa_arguments(node) is not None:
            node.target = fused.scaled_dot_product_attention
            count += 1
    return count
