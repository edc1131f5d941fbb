"""Grouped-query attention: ``ops.attention_inference(..., enable_gqa=True)`` (no repeated keys and values in
the kernel) and ``passes.drop_repeated_kv`` (``repeat_kv`` before SDPA -> ``enable_gqa=True``)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
import torchgraph._extension as extension
import torchgraph.ops as ops
from community_models.llama_titan import Transformer, TransformerModelArgs
from community_models.llama_titan import repeat_kv as repeat_kv_titan
from torchgraph import fused

needs_kernel = pytest.mark.skipif(
    not (extension.HAS_C_OPS and fused._common._HAS_ONEDNN), reason="needs torchgraph._C and oneDNN")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _qkv(b, h, hk, t, s, d, layout):
    if layout == "from_bthd":  # heads split from (B, T, H * D), as LLaMA code does
        return (torch.randn(b, t, h, d).transpose(1, 2), torch.randn(b, s, hk, d).transpose(1, 2),
                torch.randn(b, s, hk, d).transpose(1, 2))
    return torch.randn(b, h, t, d), torch.randn(b, hk, s, d), torch.randn(b, hk, s, d)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["from_bthd", "contiguous"])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("b, h, hk, t, s", [(2, 8, 2, 9, 9), (1, 6, 3, 5, 7), (2, 4, 1, 16, 16)])
def test_kernel_matches_sdpa_with_grouped_heads(b, h, hk, t, s, mask_kind, layout, dtype):
    q, k, v = (x.to(dtype) for x in _qkv(b, h, hk, t, s, 16, layout))
    mask, causal = {"none": (None, False), "causal": (None, True), "bool": (torch.rand(b, 1, t, s) > 0.3, False),
                    "additive": (torch.randn(b, h, t, s).to(dtype), False)}[mask_kind]
    with torch.inference_mode():
        out = ops.attention_inference(q, k, v, mask, causal, None, True)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=True,
                                               attn_mask=mask.double() if mask is not None and mask.is_floating_point()
                                               else mask)
    assert out.dtype == dtype and out.shape == expected.shape and out.stride() == expected.stride()
    error = (out.double() - exact).abs().max().item()
    assert error < 1e-5 if dtype == torch.float32 else error <= (expected.double() - exact).abs().max().item() + 8e-3


@needs_kernel
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_heads_that_do_not_divide_raise_on_the_kernel_and_the_fake(device):
    q, k = torch.randn(1, 6, 3, 8, device=device), torch.randn(1, 4, 3, 8, device=device)
    with pytest.raises(RuntimeError, match=r"expected key \[B, Hk, S, D\].*\(H a multiple of Hk\)"):
        ops.attention_inference(q, k, k, None, False, None, True)


@needs_kernel
def test_opcheck_with_grouped_heads():
    q, k, v = _qkv(2, 6, 2, 5, 7, 8, "from_bthd")
    torch.library.opcheck(torch.ops.torchgraph.attention_inference.default, (q, k, v, None, True, 0.3, True))


@needs_kernel
def test_fused_sdpa_runs_the_kernel_for_enable_gqa(monkeypatch, onednn_routes, any_size_attention):
    """SDPA calls written with enable_gqa=True (transformers without a mask, newer torchtitan) take the kernel."""
    calls = []
    real = ops.attention_inference
    monkeypatch.setattr(fused.attention.ops, "attention_inference", lambda *a: calls.append(a) or real(*a))
    q, k, v = _qkv(2, 8, 2, 16, 16, 8, "from_bthd")
    with torch.no_grad():
        out = fused.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert len(calls) == 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.stride() == expected.stride()


# ------------------------------------------------------------------------------------ passes.drop_repeated_kv


def repeat_kv_hf(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv (modeling_llama.py), on (batch, key heads, seq, head_dim)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class HFGroupedAttention(nn.Module):
    """HF LLaMA's attention without rotary embeddings: heads transposed, then repeat_kv, then SDPA."""

    def __init__(self, dim=32, heads=4, kv_heads=2, read_keys_again=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj, self.v_proj = nn.Linear(dim, kv_heads * self.head_dim), nn.Linear(dim, kv_heads * self.head_dim)
        self.read_keys_again = read_keys_again

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        keys = repeat_kv_hf(k, self.heads // self.kv_heads)
        out = F.scaled_dot_product_attention(q, keys, repeat_kv_hf(v, self.heads // self.kv_heads), is_causal=True)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return out + keys.mean() if self.read_keys_again else out


def _gqa_calls(model) -> list:
    return [n.kwargs.get("enable_gqa", False) for n in model.graph.nodes
            if n.op == "call_function" and n.target is fused.scaled_dot_product_attention]


def _expands(model) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "call_method" and n.target == "expand")


@pytest.mark.parametrize("net, calls", [
    (lambda: HFGroupedAttention(), [True]),
    (lambda: Transformer(TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64)),
     [True, True]),  # torchtitan / Meta: repeat_kv on (B, S, Hk, D), then the head transpose
    (lambda: HFGroupedAttention(read_keys_again=True), [False]),  # the repeated keys are read again
], ids=["hf", "torchtitan", "keys_read_again"])
def test_optimize_drops_repeat_kv_and_matches_eager(net, calls):
    net = net().eval()
    tokens = isinstance(net, Transformer)
    x = tg.Input(shape=(12,), dtype=torch.long) if tokens else tg.Input(shape=(12, 32))
    fast = tg.optimize(tg.Model(x, net(x)))
    assert _gqa_calls(fast) == calls
    if all(calls):
        assert _expands(fast) == 0
    data = torch.randint(0, 64, (3, 12)) if tokens else torch.randn(3, 12, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-5, rtol=1e-5)


def test_repeat_kv_of_torchtitan_is_repeat_interleave():
    """The pattern the pass reads as ``repeat_interleave`` (query head h on key head h // n_rep) is that."""
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(repeat_kv_titan(x, 2), x.repeat_interleave(2, dim=2))
    torch.testing.assert_close(repeat_kv_hf(x, 2), x.repeat_interleave(2, dim=1))


class WrittenWithEnableGqa(nn.Module):
    """SDPA with enable_gqa=True written by the user (no repeat_kv)."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * kv_heads * self.head_dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, t, -1)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("net, optimize", [(HFGroupedAttention, True), (WrittenWithEnableGqa, False),
                                           (WrittenWithEnableGqa, True)],
                         ids=["optimized_repeat_kv", "enable_gqa", "optimized_enable_gqa"])
def test_grouped_heads_export_to_onnx(net, optimize, exporter, tmp_path):
    """The legacy exporter has no SDPA with enable_gqa: the export repeats the heads first (same values)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = net().eval()
    x = tg.Input(shape=(12, 32))
    model = tg.Model(x, net(x))
    path = tmp_path / "gqa.onnx"
    tg.export_onnx(tg.optimize(model) if optimize else model, path, exporter=exporter)
    data = torch.randn(2, 12, 32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: data.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), net(data), atol=1e-5, rtol=1e-5)
