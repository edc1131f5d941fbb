"""``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` -> primitive ops.

torch's encoder layer is one opaque module (in eval it takes the native "fast path", one C++ call per
layer). Written out as its primitive ops, the other passes fuse it like a hand-written block: the
packed input projection feeds :func:`torchgraph.fused.qkv_attention` directly (no head split/merge
copies), linear layers run oneDNN with their activation, and each residual add + LayerNorm becomes
one :func:`torchgraph.ops.add_layer_norm`. Measured (``benchmarks/bench_peers.py``) faster than the
fast path on the BERT-style stack; the rewrite applies only where it computes exactly what the
module computes:

* self-attention on one tensor, ``batch_first=True``, no masks (``src_mask``, key padding, causal),
  dropout inactive (inference), packed ``in_proj_weight`` (same embedding size for q, k, v);
* ``nn.MultiheadAttention(x, x, x)`` only when its attention weights are not used (``[0]`` alone).
"""

from __future__ import annotations

import operator

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
                    spec: ValueSpec) -> fx.Node:
    """``out_proj(attention(in_proj(x)))`` as nodes; returns the out_proj call (an ``nn.Linear``)."""
    w = graph.get_attr(f"{prefix}.in_proj_weight")
    b = graph.get_attr(f"{prefix}.in_proj_bias") if mha.in_proj_bias is not None else None
    qkv = set_spec(graph.call_function(fused.linear_act, (x, w, b, "none")), _spec_like(spec, 3 * mha.embed_dim))
    attn = set_spec(graph.call_function(fused.qkv_attention, (qkv, mha.num_heads, False)), spec)
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
                   spec: ValueSpec) -> fx.Node:
    """The encoder layer's forward (eval, no masks) as nodes; returns its output."""
    hidden = _spec_like(spec, layer.linear1.out_features)

    def feed_forward(h):
        inner = set_spec(graph.call_module(f"{prefix}.linear1", (h,)), hidden)
        return set_spec(graph.call_module(f"{prefix}.linear2", (_activation(graph, layer, inner, hidden),)), spec)

    def norm(name, h):
        return set_spec(graph.call_module(f"{prefix}.{name}", (h,)), spec)

    if layer.norm_first:
        x = _add(graph, x, _self_attention(graph, f"{prefix}.self_attn", layer.self_attn, norm("norm1", x), spec),
                 spec)
        return _add(graph, x, feed_forward(norm("norm2", x)), spec)
    x = norm("norm1", _add(graph, x, _self_attention(graph, f"{prefix}.self_attn", layer.self_attn, x, spec), spec))
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


def expand_transformer_layers(root: nn.Module, graph: fx.Graph) -> int:
    """Encoder stacks, encoder layers and self-attention modules (inference, no masks) -> their
    primitive ops. Returns how many module calls were expanded."""
    count = 0
    for node in list(graph.nodes):
        module = module_of(root, node)
        if module is None or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        x, spec = node.args[0], node.args[0].meta.get("tg_spec")
        if type(module) is nn.TransformerEncoder and not module.training and \
                all(_expandable_layer(m) and _attention_ok(m.self_attn, spec) for m in module.layers):
            with graph.inserting_before(node):
                for i, layer in enumerate(module.layers):
                    x = _encoder_layer(graph, f"{node.target}.layers.{i}", layer, x, spec)
                if module.norm is not None:
                    x = set_spec(graph.call_module(f"{node.target}.norm", (x,)), spec)
        elif _expandable_layer(module) and _attention_ok(module.self_attn, spec):
            with graph.inserting_before(node):
                x = _encoder_layer(graph, node.target, module, x, spec)
        else:
            continue
        node.replace_all_uses_with(x)
        graph.erase_node(node)
        count += 1
    count += _expand_self_attention(root, graph)
    return count


def _expand_self_attention(root: nn.Module, graph: fx.Graph) -> int:
    """``mha(x, x, x)[0]`` (weights unused, no masks, inference) -> in_proj + attention + out_proj."""
    count = 0
    for node in list(graph.nodes):
        mha = module_of(root, node)
        if not isinstance(mha, nn.MultiheadAttention) or mha.training or len(node.args) != 3:
            continue
        x = node.args[0]
        if not isinstance(x, fx.Node) or node.args[1] is not x or node.args[2] is not x:
            continue
        if set(node.kwargs) - {"need_weights"}:
            continue
        users = list(node.users)
        if not users or any(u.op != "call_function" or u.target is not operator.getitem or u.args[1] != 0
                            for u in users):
            continue
        spec = x.meta.get("tg_spec")
        if not _attention_ok(mha, spec):
            continue
        with graph.inserting_before(node):
            out = _self_attention(graph, node.target, mha, x, spec)
        for user in users:
            user.replace_all_uses_with(out)
            graph.erase_node(user)
        graph.erase_node(node)
        count += 1
    return count
