"""nanoGPT's manual attention (a causal mask from a tril buffer) becomes SDPA with is_causal=True in
tg.optimize (NOTE: [Causal mask from a buffer] in torchgraph/passes/manual_attention.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models.nanogpt import GPT, CausalSelfAttention, GPTConfig
from torchgraph import fused


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _attention(block_size=16, dropout=0.1) -> CausalSelfAttention:
    config = GPTConfig(block_size=block_size, n_layer=1, n_head=4, n_embd=32, dropout=dropout, flash=False)
    return CausalSelfAttention(config).eval()


def _optimized(module: nn.Module, block_size: int):
    x = tg.Input(shape=(tg.Dim("T", max=block_size), 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tg.optimize(tg.Model(x, module(x)))


def _targets(model) -> list:
    return [n.target for n in model.graph.nodes if n.op == "call_function"]


def test_nanogpt_manual_attention_fuses_like_the_flash_path():
    """With a dynamic T: q/k/v packed attention, no (B, H, T, T) masking left, exact at several T."""
    attention = _attention()
    fast = _optimized(attention, 16)
    targets = _targets(fast)
    assert fused.qkv_attention in targets
    assert not any(n.target == "masked_fill" for n in fast.graph.nodes)
    for length in (1, 5, 16):
        x = torch.randn(3, length, 32)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), attention(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["upper", "band", "ones"])
def test_a_buffer_that_is_not_causal_is_left_as_written(change):
    """The buffer's values decide: an upper-triangular, banded or all-ones mask is not rewritten, and
    the optimized model still equals eager."""
    attention = _attention()
    n = attention.bias.shape[-1]
    mask = {"upper": torch.ones(n, n).triu(), "band": torch.ones(n, n).tril() - torch.ones(n, n).tril(-3),
            "ones": torch.ones(n, n)}[change]
    attention.bias.copy_(mask.view(1, 1, n, n))
    fast = _optimized(attention, n)
    assert fused.qkv_attention not in _targets(fast)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        expected = attention(x)
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_whole_nanogpt_with_manual_attention_matches_eager():
    """The full GPT (recorded as one call, fixed T) with flash=False: every block's attention fused, exact."""
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32, flash=False)
    gpt = GPT(config).eval()
    idx = tg.Input(shape=(tg.Dim("T", max=32),), dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = tg.optimize(tg.Model(idx, gpt(idx)[0]))
    assert _targets(fast).count(fused.qkv_attention) == 2
    data = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(fast(data), gpt(data)[0], atol=1e-5, rtol=1e-5)
