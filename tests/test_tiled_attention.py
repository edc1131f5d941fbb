"""Attention on CPUs with AVX2 only (NOTE: [Tiled attention on AVX2] in torchgraph/fused/attention.py): which
calls go to the kernels' SIMD tiles and which stay on SDPA, with SDPA's values either way. The tiles' own values
are tested with the kernels (test_ops.py's qkv_attention tests, test_attention_inference.py's shapes), which
run them on AVX2 builds."""

import pytest
import torch
import torch.nn.functional as F

import torchgraph as tg
import torchgraph._extension as extension
import torchgraph.ops as ops
from torchgraph import fused

needs_kernels = pytest.mark.skipif(not extension.HAS_C_OPS, reason="needs torchgraph's compiled kernels")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the kernels fused attention calls, in order."""
    calls = []
    for name in ("attention_inference", "qkv_attention"):
        real = getattr(ops, name)
        monkeypatch.setattr(fused.attention.ops, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


def test_the_tiles_are_routed_on_avx2_cpus_only():
    """The routing follows the CPU capability that picks the kernels' build (torchgraph/_extension.py)."""
    capability, _ = extension._cpu_flags()
    assert fused.attention._TILED_ATTENTION == (capability == "AVX2" and not fused.attention._ONEDNN_ATTENTION)


@needs_kernels
@pytest.mark.usefixtures("tiled_routes")
@pytest.mark.parametrize("seq, causal, runs_kernel", [
    (40, False, True), (256, False, True), (300, False, False),  # non-causal: up to TILED_ATTENTION_MAX_SEQ
    (300, True, True),  # causal: up to QKV_ATTENTION_MAX_SEQ
    (600, True, False),  # past it: SDPA, whose memory grows with T only
])
def test_qkv_attention_takes_the_tiles_where_they_pay(kernel_calls, seq, causal, runs_kernel):
    qkv = torch.randn(1, seq, 3 * 32)
    with torch.no_grad():
        out = fused.qkv_attention(qkv, 2, causal)
    assert kernel_calls == (["qkv_attention"] if runs_kernel else [])
    torch.testing.assert_close(out, fused.attention._sdpa_qkv_attention(qkv, 2, causal, None), atol=1e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.usefixtures("tiled_routes")
def test_qkv_attention_in_bfloat16_stays_off_the_tiles(kernel_calls):
    """The tiles are float32's: bfloat16 attention runs SDPA's native bfloat16 kernel (NOTE: [bfloat16
    attention])."""
    with torch.no_grad():
        fused.qkv_attention(torch.randn(2, 16, 3 * 32, dtype=torch.bfloat16), 2, True)
    assert kernel_calls == []


@needs_kernels
@pytest.mark.usefixtures("tiled_routes")
@pytest.mark.parametrize("seq_q, seq_k, runs_kernel", [
    (16, 16, True), (8, 64, True),  # queries at least an eighth of the keys
    (1, 1, True),
    (1, 128, False), (7, 64, False),  # a decode step against cached keys: packing them costs more than it saves
])
@pytest.mark.parametrize("mask", [None, "padding"])
def test_sdpa_calls_take_the_tiles_where_they_pay(kernel_calls, seq_q, seq_k, runs_kernel, mask):
    q = torch.randn(2, seq_q, 4, 16).transpose(1, 2)  # HF's layout: heads split from (B, T, H*D)
    k, v = (torch.randn(2, seq_k, 4, 16).transpose(1, 2) for _ in range(2))
    attn_mask = None if mask is None else torch.rand(2, 1, 1, seq_k) > 0.2
    with torch.no_grad():
        out = fused.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    assert kernel_calls == (["attention_inference"] if runs_kernel else [])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert out.stride() == expected.stride()


@needs_kernels
@pytest.mark.usefixtures("tiled_routes")
def test_an_optimized_gpt_block_runs_its_attention_on_the_tiles(kernel_calls):
    """tg.optimize on the GPT block of torchgraph.applications: its attention fused into qkv_attention, on
    the tiles, with the eager model's values."""
    block = tg.applications.GPTBlock(64, 4).eval()
    x = tg.Input(shape=(24, 64))
    model = tg.Model(x, block(x)).eval()
    fast = tg.optimize(model)
    data = torch.randn(3, 24, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), block(data), atol=1e-5, rtol=1e-4)
    assert kernel_calls == ["qkv_attention"]
