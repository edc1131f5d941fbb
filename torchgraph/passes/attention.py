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
from .common import set_spec, single_user

__all__ = ["fuse_qkv_attention"]

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
    if node.kwargs:
        return False
    if node.op == "call_method" and node.target == "transpose":
        dims = node.args[1:]
    elif node.op == "call_function" and node.target is torch.transpose:
        dims = node.args[1:]
    else:
        return False
    return tuple(sorted(dims)) == (1, 2)


def _chunk_source(node: fx.Node) -> tuple[fx.Node, int] | None:
    """For ``getitem(qkv.chunk(3, dim=-1), i)``: ``(chunk node, i)``."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    chunk, index = node.args
    if not isinstance(chunk, fx.Node) or not isinstance(index, int):
        return None
    is_chunk = (chunk.op == "call_method" and chunk.target == "chunk") or \
        (chunk.op == "call_function" and chunk.target is torch.chunk)
    if not is_chunk:
        return None
    args = dict(zip(("input", "chunks", "dim"), chunk.args), **chunk.kwargs)
    qkv = args.get("input")
    probes = _probes(qkv)
    if args.get("chunks") != 3 or probes is None or any(len(p) != 3 for p in probes):
        return None
    if args.get("dim", 0) not in (-1, 2):
        return None
    return chunk, index


def _match(node: fx.Node) -> dict | None:
    """The pattern ending in the head merge after SDPA ``node``, or None."""
    args = _sdpa_arguments(node)
    if args is None or args["attn_mask"] is not None or args["dropout_p"] != 0.0 or args["enable_gqa"]:
        return None
    if not isinstance(args["is_causal"], bool) or not (args["scale"] is None or isinstance(args["scale"], float)):
        return None
    chain = [node]
    heads_of = []
    chunk = None
    for position, name in enumerate(("query", "key", "value")):
        transpose = args[name]
        if not isinstance(transpose, fx.Node) or single_user(transpose) is not node \
                or not _is_head_transpose(transpose):
            return None
        split = transpose.args[0]
        if not isinstance(split, fx.Node) or single_user(split) is not transpose:
            return None
        getitem = split.args[0] if split.args else None
        source = _chunk_source(getitem) if isinstance(getitem, fx.Node) else None
        if source is None or source[1] != position or single_user(getitem) is not split:
            return None
        if chunk is not None and source[0] is not chunk:
            return None
        chunk = source[0]
        heads_of.append(_probes(split))
        chain += [transpose, split, getitem]
    if len(chunk.users) != 3:
        return None
    qkv = chunk.args[0] if chunk.args else chunk.kwargs["input"]
    # the split: (B, T, 3E) -> three (B, T, H, D) with H * D = E, the same H at both probes
    qkv_probes = _probes(qkv)
    if heads_of[0] is None or not heads_of[0] == heads_of[1] == heads_of[2]:
        return None
    heads = {p[2] for p in heads_of[0]}
    for (b, t, width), split in zip(qkv_probes, heads_of[0]):
        if len(split) != 4 or split[:2] != (b, t) or 3 * split[2] * split[3] != width:
            return None
    # the merge: SDPA's (B, H, T, D) -> transpose(1, 2) -> (B, T, E) by any reshape
    back = single_user(node)
    if back is None or not _is_head_transpose(back):
        return None
    merge = single_user(back)
    if merge is None or merge.op != "call_method" or merge.target not in ("reshape", "view", "flatten"):
        return None
    merged = _probes(merge)
    if merged is None or len(heads) != 1 or \
            merged != tuple((b, t, width // 3) for b, t, width in qkv_probes):
        return None
    return {"qkv": qkv, "heads": heads.pop(), "causal": args["is_causal"], "scale": args["scale"],
            "merge": merge, "erase": [merge, back] + chain + [chunk]}


def fuse_qkv_attention(root: nn.Module, graph: fx.Graph) -> int:
    """Self-attention written as chunk -> head split -> SDPA -> head merge ->
    ``fused.qkv_attention(qkv, heads, causal, scale)`` (one kernel, forward and backward)."""
    count = 0
    for node in list(graph.nodes):
        match = _match(node) if node.op == "call_function" else None
        if match is None:
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
