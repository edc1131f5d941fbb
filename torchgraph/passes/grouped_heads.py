"""Grouped-query attention without the repeated keys and values: ``repeat_kv`` -> SDPA's ``enable_gqa``.

LLaMA 2 70B / LLaMA 3, Mistral and Qwen2 give several query heads one key/value head, and their code
repeats k and v to the query's head count before SDPA: HF's ``repeat_kv`` on ``(B, Hk, S, D)``::

    hidden[:, :, None, :, :].expand(B, Hk, n_rep, S, D).reshape(B, Hk * n_rep, S, D)

Meta's and torchtitan's on ``(B, S, Hk, D)`` before the head transpose (``x[:, :, :, None, :]`` or
``torch.unsqueeze(x, dim=3)``, expand, reshape, then ``.transpose(1, 2)``). Each is a copy of k and of v
``n_rep`` times over, per layer and call. SDPA's ``enable_gqa=True`` computes the same thing from the
unrepeated tensors (query head ``h`` reads key/value head ``h // n_rep``, as ``repeat_interleave``), and
``ops.attention_inference`` does so without any copy (NOTE: [Grouped heads] in its kernel). Where the kernel
does not apply, SDPA's CPU flash kernel takes ``enable_gqa`` with the same output, bit for bit, and layout.
Shapes are checked on the recorded probes (``tg_spec``). Inference only, after ``use_inference_attention``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from .. import fused
from .aliasing import in_place_hazards
from .attention import _SDPA_PARAMS, _is_head_transpose, _probes
from .common import set_spec, single_user

__all__ = ["drop_repeated_kv"]


def _new_axis(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``x.unsqueeze(p)`` / ``torch.unsqueeze(x, dim=p)`` / ``x[:, ..., None, ...]`` (slices and one None):
    ``(x, p)``."""
    if node.op == "call_method" and node.target == "unsqueeze" or \
            node.op == "call_function" and node.target is torch.unsqueeze:
        args = dict(zip(("input", "dim"), node.args), **node.kwargs)
        return (args["input"], args["dim"]) if isinstance(args.get("dim"), int) and args["dim"] >= 0 else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = all(i is None or i == slice(None) for i in index)
        if full and sum(i is None for i in index) == 1:
            return node.args[0], index.index(None)
    return None


def _repeat_source(node) -> tuple[fx.Node, int, int] | None:
    """``(x, dim, n_rep)`` when ``node`` is ``x`` repeated ``n_rep`` times along ``dim``, each slice in place
    (``repeat_interleave``), written as new axis -> expand -> reshape/view."""
    if not isinstance(node, fx.Node) or not (node.op == "call_method" and node.target in ("reshape", "view")
                                             or node.op == "call_function" and node.target is torch.reshape):
        return None
    expanded = node.args[0]
    if not isinstance(expanded, fx.Node) or expanded.op != "call_method" or expanded.target != "expand" \
            or single_user(expanded) is not node:
        return None
    unsqueezed = expanded.args[0]
    axis = _new_axis(unsqueezed) if isinstance(unsqueezed, fx.Node) else None
    if axis is None or single_user(unsqueezed) is not expanded or not isinstance(axis[0], fx.Node):
        return None
    source, p = axis
    shapes = [_probes(n) for n in (source, unsqueezed, expanded, node)]
    if any(s is None for s in shapes) or p < 1 or any(len(e) <= p for e in shapes[2]):
        return None
    reps = {e[p] for e in shapes[2]}
    if len(reps) != 1:
        return None
    n_rep = reps.pop()
    for x, u, e, r in zip(*shapes):
        if len(u) != len(x) + 1 or u != x[:p] + (1,) + x[p:] or e != u[:p] + (n_rep,) + u[p + 1:] \
                or r != x[:p - 1] + (x[p - 1] * n_rep,) + x[p:]:
            return None
    return (source, p - 1, n_rep) if n_rep > 1 else None


def _unrepeated(node) -> tuple[object, int] | None:
    """For SDPA's key or value ``node``: ``(how to read it unrepeated, n_rep)``, where the first is the source
    node (HF: repeated on dim 1) or ``("transpose", source)`` (Meta, torchtitan: repeated on dim 2, then the
    head transpose), else None."""
    if _is_head_transpose(node):
        repeat = _repeat_source(node.args[0]) if single_user(node.args[0]) is node else None
        return (("transpose", repeat[0]), repeat[2]) if repeat is not None and repeat[1] == 2 else None
    repeat = _repeat_source(node)
    return (repeat[0], repeat[2]) if repeat is not None and repeat[1] == 1 else None


def drop_repeated_kv(root: nn.Module, graph: fx.Graph) -> int:
    """``fused.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v))`` -> ``(q, k, v, enable_gqa=True)``.
    A key or value read elsewhere, or that may change in place, stays repeated. Returns how many calls."""
    count = 0
    hazards = in_place_hazards(root, graph)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not fused.scaled_dot_product_attention:
            continue
        args = dict(zip(_SDPA_PARAMS, node.args), **node.kwargs)
        if args.get("enable_gqa") or "key" not in args or "value" not in args:
            continue
        key, value = _unrepeated(args["key"]), _unrepeated(args["value"])
        if key is None or value is None or key[1] != value[1] or single_user(args["key"]) is not node \
                or single_user(args["value"]) is not node:
            continue
        sources = [k[1] if isinstance(k, tuple) else k for k in (key[0], value[0])]
        if any(s in hazards for s in sources):
            continue
        with graph.inserting_before(node):
            new_args = {**args, "key": _read(graph, key[0]), "value": _read(graph, value[0]), "enable_gqa": True}
        node.args, node.kwargs = (new_args.pop("query"), new_args.pop("key"), new_args.pop("value")), new_args
        count += 1
    return count


def _read(graph: fx.Graph, how) -> fx.Node:
    if not isinstance(how, tuple):
        return how
    transposed = graph.call_method("transpose", (how[1], 1, 2))
    spec = how[1].meta.get("tg_spec")
    if spec is not None and getattr(spec, "shape", None) is not None:
        swap = (lambda s: (s[0], s[2], s[1], *s[3:]))
        set_spec(transposed, type(spec)(swap(spec.shape), spec.dtype, tuple(swap(p) for p in spec.probes)))
    return transposed
