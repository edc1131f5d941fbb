"""``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` -> primitive ops.

torch's encoder layer is one opaque module (in eval it takes the native "fast path", one C++ call per
layer). Written out as its primitive ops, the other passes fuse it like a hand-written block: the
packed input projection feeds :func:`torchgraph.fused.qkv_attention` directly (no head split/merge
copies), linear layers run oneDNN with their activation, and each residual add + LayerNorm becomes
one :func:`torchgraph.ops.add_layer_norm`. Measured (``benchmarks/bench_peers.py``) faster than the
fast path on the BERT-style stack; the rewrite applies only where it computes exactly what the
module computes:

* self-attention on one tensor, ``batch_first=True``, no attention mask (``src_mask``, causal),
  dropout inactive (inference), packed ``in_proj_weight`` (same embedding size for q, k, v);
* a boolean ``src_key_padding_mask`` (True at padding, as BERT-style classifiers pass it) when the layers
  are ones torch runs on its native fast path (even head count, input projection bias, one LayerNorm eps):
  the attention skips padded keys (:func:`torchgraph.fused.qkv_attention_with_padding`) and a post-norm
  encoder's output gets the nested-tensor path's zeros at padded positions
  (:func:`torchgraph.fused.padded_output_as_nested`; NOTE: [Eager's padded positions] in
  ``fused/key_padding.py``), its layers running on the real tokens alone (NOTE: [Tokens on rows]);
* ``nn.MultiheadAttention(x, x, x)`` only when its attention weights are not used (``[0]`` alone).
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import fused
from ..model import ValueSpec
from .common import module_of, set_spec

__all__ = ["expand_transformer_layers"]


def _spec_like(spec: ValueSpec, last: int) -> ValueSpec:
    """``spec`` with its last dim replaced by ``last``."""
    return ValueSpec(spec.shape[:-1] + (last,), spec.dtype, tuple(p[:-1] + (last,) for p in spec.probes))


def _attention_ok(mha: nn.MultiheadAttention, spec) -> bool:
    return (isinstance(mha, nn.MultiheadAttention) and mha.batch_first and mha._qkv_same_embed_dim
            and mha.in_proj_weight is not None and mha.bias_k is None and not mha.add_zero_attn
            and isinstance(spec, ValueSpec) and spec.dtype is not None and len(spec.probes[0]) == 3)


def _self_attention(graph: fx.Graph, prefix: str, mha: nn.MultiheadAttention, x: fx.Node,
                    spec: ValueSpec, padding: fx.Node | None = None, rows: fx.Node | None = None,
                    all_padded_nan: bool | None = None) -> fx.Node:
    """``out_proj(attention(in_proj(x)))`` as nodes (keys where ``padding`` is True skipped, with
    ``all_padded_nan`` as ``fused.qkv_attention_with_padding`` takes it; ``x`` the tokens at ``rows`` when
    given: NOTE: [Tokens on rows]); returns the out_proj call (an ``nn.Linear``)."""
    w = graph.get_attr(f"{prefix}.in_proj_weight")
    b = graph.get_attr(f"{prefix}.in_proj_bias") if mha.in_proj_bias is not None else None
    qkv = set_spec(graph.call_function(fused.linear_act, (x, w, b, "none")), _spec_like(spec, 3 * mha.embed_dim))
    if padding is None:
        attn = graph.call_function(fused.qkv_attention, (qkv, mha.num_heads, False))
    elif rows is None:
        nan = () if all_padded_nan is None else (all_padded_nan,)
        attn = graph.call_function(fused.qkv_attention_with_padding, (qkv, mha.num_heads, padding, *nan))
    else:
        attn = graph.call_function(fused.qkv_attention_on_rows, (qkv, mha.num_heads, padding, rows))
    set_spec(attn, spec)
    return set_spec(graph.call_module(f"{prefix}.out_proj", (attn,)), spec)


def _add(graph: fx.Graph, a: fx.Node, b: fx.Node, spec: ValueSpec) -> fx.Node:
    return set_spec(graph.call_function(operator.add, (a, b)), spec)


def _activation(graph: fx.Graph, layer: nn.TransformerEncoderLayer, x: fx.Node, spec) -> fx.Node | None:
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return set_spec(graph.call_function(F.relu, (x,)), spec)
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return set_spec(graph.call_function(F.gelu, (x,)), spec)
    return None


def _encoder_layer(graph: fx.Graph, prefix: str, layer: nn.TransformerEncoderLayer, x: fx.Node,
                   spec: ValueSpec, padding: fx.Node | None, rows: fx.Node | None = None) -> fx.Node:
    """The encoder layer's forward (eval, no attention mask, key padding ``padding`` or None; ``x`` the
    tokens at ``rows`` when given) as nodes; returns its output."""
    hidden = _spec_like(spec, layer.linear1.out_features)

    def feed_forward(h):
        inner = set_spec(graph.call_module(f"{prefix}.linear1", (h,)), hidden)
        return set_spec(graph.call_module(f"{prefix}.linear2", (_activation(graph, layer, inner, hidden),)), spec)

    def norm(name, h):
        return set_spec(graph.call_module(f"{prefix}.{name}", (h,)), spec)

    def attention(h):
        return _self_attention(graph, f"{prefix}.self_attn", layer.self_attn, h, spec, padding, rows)

    if layer.norm_first:
        x = _add(graph, x, attention(norm("norm1", x)), spec)
        return _add(graph, x, feed_forward(norm("norm2", x)), spec)
    x = norm("norm1", _add(graph, x, attention(x), spec))
    return norm("norm2", _add(graph, x, feed_forward(x), spec))


def _expandable_layer(layer) -> bool:
    return (type(layer) is nn.TransformerEncoderLayer and not layer.training
            and _activation_name(layer) is not None)


def _activation_name(layer) -> str | None:
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    return None


def _native_fast_path(layer: nn.TransformerEncoderLayer) -> bool:
    """Whether eager runs ``layer`` on torch's native fast path in inference (its static conditions in
    ``nn.TransformerEncoderLayer.forward``), whose attention a padding mask must match."""
    attn = layer.self_attn
    return (attn.in_proj_bias is not None and attn.num_heads % 2 == 0 and layer.norm1.eps == layer.norm2.eps
            and not any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()))


def _bound_arguments(node: fx.Node, module: nn.Module) -> dict | None:
    """The arguments ``node`` passes to ``module``'s forward, by name (only those given), or None."""
    try:
        return dict(inspect.signature(module.forward).bind(*node.args, **node.kwargs).arguments)
    except TypeError:
        return None


def _boolean_padding(padding, spec: ValueSpec) -> bool:
    """Whether ``padding`` is a value holding a boolean ``(B, T)`` mask for a ``(B, T, E)`` value of ``spec``."""
    padding_spec = padding.meta.get("tg_spec") if isinstance(padding, fx.Node) else None
    return (isinstance(padding_spec, ValueSpec) and padding_spec.dtype == torch.bool
            and all(len(p) == 2 and p == q[:2] for p, q in zip(padding_spec.probes, spec.probes)))


def _padding_mask(node: fx.Node, module: nn.Module, x, spec):
    """``(True, mask node or None)`` when ``node`` calls ``module`` (an encoder or encoder layer) on one tensor
    with at most a boolean ``(B, T)`` key padding mask; ``(False, None)`` for any other call."""
    args = _bound_arguments(node, module)
    if args is None or args.pop("src", None) is not x or args.pop("is_causal", None) not in (None, False) or \
            args.pop("mask", None) is not None or args.pop("src_mask", None) is not None:
        return False, None
    padding = args.pop("src_key_padding_mask", None)
    if args or padding is None:
        return not args, None
    return (True, padding) if _boolean_padding(padding, spec) else (False, None)


def _rows_spec(spec: ValueSpec, features: tuple, dtype=torch.int64) -> ValueSpec:
    """The spec of an encoder's tokens as rows ``(N, *features)`` (NOTE: [Tokens on rows]): every position
    at the probes."""
    return ValueSpec((None, *features), dtype, tuple((p[0] * p[1], *features) for p in spec.probes))


def expand_transformer_layers(root: nn.Module, graph: fx.Graph) -> int:
    """Encoder stacks, encoder layers and self-attention modules (inference, no attention masks; key padding
    masks where the layers take the native fast path) -> their primitive ops. Returns how many module calls
    were expanded."""
    count = 0
    for node in list(graph.nodes):
        module = module_of(root, node)
        if module is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x, spec = node.args[0], node.args[0].meta.get("tg_spec")
        if not (type(module) in (nn.TransformerEncoder, nn.TransformerEncoderLayer) and not module.training
                and isinstance(spec, ValueSpec)):
            continue
        plain, padding = _padding_mask(node, module, x, spec)
        layers = list(module.layers) if type(module) is nn.TransformerEncoder else [module]
        if not plain or not all(_expandable_layer(m) and _attention_ok(m.self_attn, spec) for m in layers):
            continue
        nested = type(module) is nn.TransformerEncoder and module.use_nested_tensor
        if padding is not None and not (all(_native_fast_path(m) for m in layers)
                                        and (not nested or getattr(module, "mask_check", True))):
            continue
        prefix = node.target if type(module) is nn.TransformerEncoderLayer else None
        with graph.inserting_before(node):
            rows = layer_spec = None
            if padding is not None and nested:  # NOTE: [Tokens on rows] in fused/key_padding.py
                rows = set_spec(graph.call_function(fused.token_rows, (padding,)), _rows_spec(spec, ()))
                layer_spec = _rows_spec(spec, (spec.probes[0][-1],), spec.dtype)
                x = set_spec(graph.call_function(fused.gather_rows, (x, rows)), layer_spec)
            for i, layer in enumerate(layers):
                x = _encoder_layer(graph, prefix or f"{node.target}.layers.{i}", layer, x, layer_spec or spec,
                                   padding, rows)
            if rows is not None:
                x = set_spec(graph.call_function(fused.scatter_rows, (x, rows, padding)), spec)
                x = set_spec(graph.call_function(fused.padded_output_as_nested, (x, padding)), spec)
            if prefix is None and module.norm is not None:
                x = set_spec(graph.call_module(f"{node.target}.norm", (x,)), spec)
        node.replace_all_uses_with(x)
        graph.erase_node(node)
        count += 1
    count += _expand_self_attention(root, graph)
    return count


def _expand_self_attention(root: nn.Module, graph: fx.Graph) -> int:
    """``mha(x, x, x)[0]`` (weights unused, no attention mask, at most a boolean key padding mask, inference)
    -> in_proj + attention + out_proj."""
    count = 0
    for node in list(graph.nodes):
        mha = module_of(root, node)
        if not isinstance(mha, nn.MultiheadAttention) or mha.training or not node.args:
            continue
        args, x = _bound_arguments(node, mha), node.args[0]
        if args is None or not isinstance(x, fx.Node) or args.pop("query") is not x or \
                args.pop("key", None) is not x or args.pop("value", None) is not x:
            continue
        need_weights = args.pop("need_weights", True)
        args.pop("average_attn_weights", None)  # the weights are not used
        if args.pop("attn_mask", None) is not None or args.pop("is_causal", False) is not False or \
                not isinstance(need_weights, bool):
            continue
        padding = args.pop("key_padding_mask", None)
        users = list(node.users)
        if args or not users or any(u.op != "call_function" or u.target is not operator.getitem or u.args[1] != 0
                                    for u in users):
            continue
        spec = x.meta.get("tg_spec")
        if not _attention_ok(mha, spec) or (padding is not None and not _boolean_padding(padding, spec)):
            continue
        # NOTE: [Eager's padded positions]: the weights' softmax gives an all-padding sample NaN, and so does the
        # native fast path (even head counts) when it is on; SDPA, on the Python path, zeros
        all_padded_nan = True if need_weights else (None if mha.num_heads % 2 == 0 else False)
        with graph.inserting_before(node):
            out = _self_attention(graph, node.target, mha, x, spec, padding, all_padded_nan=all_padded_nan)
        for user in users:
            user.replace_all_uses_with(out)
            graph.erase_node(user)
        graph.erase_node(node)
        count += 1
    return count
