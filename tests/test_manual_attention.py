"""tg.optimize on attention written out by hand (timm's ``fused_attn=False`` path and its variants):
rewritten to SDPA (then fused) only where it is exactly the attention chain."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import fused

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from community_models.vit import Attention  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class ScaledAfter(nn.Module):
    """Scores scaled after the product, by ``/ math.sqrt(head_dim)`` or ``* scale``; the heads split
    as nanoGPT does; ``extra`` adds a mask, returns the weights, or shares k across heads."""

    def __init__(self, dim=32, heads=4, divide=True, extra=None):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.divide, self.extra = heads, divide, extra
        # not nanoGPT's causal tril (that one becomes SDPA(is_causal=True): tests/test_causal_manual_attention.py)
        self.register_buffer("mask", torch.triu(torch.ones(8, 8)).view(1, 1, 8, 8))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.qkv.in_features, dim=2)  # nanoGPT: split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.extra == "shared_key":
            k = k[:, :1]
        scores = q @ k.transpose(-2, -1)
        d = self.qkv.in_features // self.heads  # a Python number, as HF's attention_head_size
        scores = scores / math.sqrt(d) if self.divide else scores * (d ** -0.5)
        if self.extra == "mask":
            scores = scores.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        weights = F.softmax(scores, dim=-1)
        y = (weights @ v).transpose(1, 2).contiguous().view(B, T, C)
        return (self.proj(y), weights) if self.extra == "weights" else self.proj(y)


def _optimize(net, shape, inference=True):
    x = tg.Input(shape=shape)
    out = net(x)
    model = tg.Model(x, out)
    fast = tg.optimize(model.eval() if inference else model.train(), inference=inference)
    return model, fast


def _targets(model):
    return {n.target for n in model.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("net", [Attention(32, num_heads=4, fused_attn=False), ScaledAfter(divide=True),
                                 ScaledAfter(divide=False)], ids=["timm", "divide", "multiply"])
def test_written_out_attention_becomes_one_fused_call(net):
    """timm's manual path (``q * scale``), and ``(q @ k^T) / sqrt(d)`` or ``* d ** -0.5`` with the
    nanoGPT head split: one qkv_attention call, outputs equal eager's."""
    model, fast = _optimize(net.eval(), (8, 32))
    assert fused.qkv_attention in _targets(fast)
    assert not any(n.target in (F.softmax, "softmax") for n in fast.graph.nodes)
    data = torch.randn(3, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-5, rtol=1e-5)


def test_written_out_attention_trains_with_the_same_gradients():
    """inference=False: the SDPA rewrite has a backward; gradients match the original's."""
    net = Attention(32, num_heads=4, fused_attn=False)
    model, fast = _optimize(net, (8, 32), inference=False)
    data = torch.randn(2, 8, 32)
    fast(data).square().sum().backward()
    net(data).square().sum().backward()
    fast_grads = dict(fast.named_parameters())
    for name, param in net.named_parameters():
        match = [g for n, g in fast_grads.items() if n.endswith(name)]
        assert len(match) == 1
        torch.testing.assert_close(match[0].grad, param.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extra", ["mask", "weights", "shared_key"])
def test_attention_that_is_not_exactly_sdpa_stays_as_written(extra):
    """A mask on the scores, the weights read elsewhere, or k broadcast across heads: no rewrite."""
    net = ScaledAfter(extra=extra).eval()
    model, fast = _optimize(net, (8, 32))
    assert F.scaled_dot_product_attention not in _targets(fast) and fused.qkv_attention not in _targets(fast)
    data = torch.randn(2, 8, 32)
    with torch.no_grad():
        got, want = fast(data), net(data)
    for a, b in zip(got if isinstance(got, (list, tuple)) else [got], want if isinstance(want, tuple) else [want]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dropout_in_training_stays():
    """In training mode the attention dropout sits between softmax and the product: no rewrite."""
    net = Attention(32, num_heads=4, attn_drop=0.1, fused_attn=False)
    model, fast = _optimize(net, (8, 32), inference=False)
    assert F.scaled_dot_product_attention not in _targets(fast) and fused.qkv_attention not in _targets(fast)
