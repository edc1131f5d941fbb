"""``ops.attention_inference`` (SDPA's forward with its products on oneDNN), the
``fused.scaled_dot_product_attention`` that picks it, and ``tg.optimize`` using it for the attention
that is not written on a packed projection (HF LLaMA's, masked, cross-attention)."""

import copy
import io
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchgraph as tg
import torchgraph._extension as extension
import torchgraph.ops as ops
from torchgraph import fused, passes

needs_kernel = pytest.mark.skipif(
    not (extension.HAS_C_OPS and fused._common._HAS_ONEDNN), reason="needs torchgraph._C and oneDNN")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _layouts(b, h, t, d):
    """Queries as code lays them out before SDPA: contiguous heads, heads split from (B, T, H*D), one
    third of a packed (B, T, 3, H, D) projection, a strided last dim (SDPA's math path), sequence-first."""
    return {
        "contiguous": torch.randn(b, h, t, d),
        "from_btc": torch.randn(b, t, h, d).transpose(1, 2),
        "packed": torch.randn(b, t, 3, h, d).permute(2, 0, 3, 1, 4)[0],
        "strided": torch.randn(b, h, t, 2 * d)[..., ::2],
        "seq_first": torch.randn(t, b, h, d).permute(1, 2, 0, 3),
    }


def _masks(b, h, t, s):
    some = torch.rand(b, 1, t, s) > 0.3
    some[0, 0, 0] = False  # a query row with every key masked: SDPA gives zeros
    return {
        "none": (None, False),
        "causal": (None, True),
        "bool": (some, False),
        "bool_2d": (torch.rand(t, s) > 0.5, False),
        "bool_expanded": (some.expand(b, h, t, s), False),
        "additive": (torch.randn(1, 1, t, s), False),
        "additive_full": (torch.randn(b, h, t, s), False),
        "finfo_min": (torch.where(some, 0.0, torch.finfo(torch.float32).min), False),  # HF's additive masks
    }


def _nonunit_strides(t: torch.Tensor) -> list:
    return [stride for stride, size in zip(t.stride(), t.shape) if size > 1]  # a size-1 dim's stride is moot


SHAPES = [(2, 4, 8, 8, 16, 16), (1, 3, 5, 7, 8, 8), (2, 2, 9, 9, 8, 4), (1, 1, 1, 3, 4, 4), (2, 4, 64, 64, 32, 32),
          # the AVX2 tiles' edges (NOTE: [Tiled attention on AVX2]): 3 tiles of 6 rows + 1 row, a panel of 16 keys
          # + 5 and one of 16 features + 1 (values: 2 panels + 1), then more queries than keys (causal rows past S)
          (1, 2, 19, 21, 17, 33), (1, 2, 13, 7, 8, 8)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, h, t, s, d, dv", SHAPES)
def test_matches_sdpa_in_values_layout_and_dtype(b, h, t, s, d, dv, dtype):
    """Every query layout x mask kind: the values of SDPA computed in float64 (float32: to 1e-5; bfloat16:
    at most SDPA's own bfloat16 error plus one rounding), SDPA's output strides and dtype."""
    for (layout, q), (mask_kind, (mask, causal)) in itertools.product(_layouts(b, h, t, d).items(),
                                                                      _masks(b, h, t, s).items()):
        k = torch.randn(b, s, h, d).transpose(1, 2)
        v = torch.randn(b, h, s, dv)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(dtype)
        with torch.inference_mode():
            out = ops.attention_inference(q, k, v, mask, causal)
            sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            exact = F.scaled_dot_product_attention(
                q.double(), k.double(), v.double(), is_causal=causal,
                attn_mask=mask.double() if mask is not None and mask.is_floating_point() else mask)
        case = f"{layout} / {mask_kind} / {dtype}"
        assert out.dtype == dtype and out.shape == sdpa.shape, case
        assert _nonunit_strides(out) == _nonunit_strides(sdpa), case
        error = (out.double() - exact).abs().max().item()
        if dtype == torch.float32:
            assert error < 1e-5, case
        else:
            assert error <= (sdpa.double() - exact).abs().max().item() + 8e-3, case


@needs_kernel
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_a_row_with_every_key_masked_gives_zeros_as_sdpa(mask_dtype):
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    keep = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    keep[..., 1, :] = False
    mask = keep if mask_dtype == torch.bool else torch.where(keep, 0.0, float("-inf"))
    with torch.no_grad():
        out = ops.attention_inference(q, k, v, mask)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 8)) and torch.equal(expected[:, :, 1], out[:, :, 1])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
def test_opcheck(dtype, mask_kind):
    """torch.library.opcheck: schema, fake kernel (strides included), autograd registration."""
    q, k = torch.randn(2, 3, 5, 8, dtype=dtype), torch.randn(2, 3, 6, 8, dtype=dtype)
    v = torch.randn(2, 6, 3, 8, dtype=dtype).transpose(1, 2)
    mask, causal = {"none": (None, False), "causal": (None, True), "bool": (torch.rand(2, 1, 5, 6) > 0.4, False),
                    "additive": (torch.randn(5, 6, dtype=dtype), False)}[mask_kind]
    torch.library.opcheck(torch.ops.torchgraph.attention_inference.default, (q, k, v, mask, causal, 0.2))


@needs_kernel
def test_the_fake_kernel_lays_out_the_output_as_the_kernel():
    for layout, q in _layouts(2, 3, 5, 8).items():
        k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 7, 3, 8).transpose(1, 2)
        out = ops.attention_inference(q, k, v)
        fake = ops.attention_inference(q.to("meta"), k.to("meta"), v.to("meta"))
        assert fake.shape == out.shape and fake.stride() == out.stride(), layout


@needs_kernel
def test_backward_raises_with_the_fix():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    out = ops.attention_inference(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(RuntimeError, match="no backward.*scaled_dot_product_attention"):
        out.sum().backward()


@needs_kernel
@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)), "must be 4-D"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8).double(), torch.randn(1, 2, 3, 8)), "must all be float32 or all bfloat16"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)), r"expected key \[B, H, S, D\]"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 8)), r"expected key \[B, H, S, D\]"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.ones(3, 3).bool(), True),
     "attn_mask and is_causal"),
    ((torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.ones(3, 3, dtype=torch.int)),
     "attn_mask must be bool"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_inputs_raise_the_same_message_on_the_kernel_and_the_fake(args, match, device):
    with pytest.raises(RuntimeError, match=match):
        ops.attention_inference(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))


# ------------------------------------------------------------------ fused.scaled_dot_product_attention


@pytest.fixture
def kernel_calls(monkeypatch, onednn_routes, any_size_attention):
    """Counts the calls fused.scaled_dot_product_attention makes to the real ops.attention_inference."""
    calls = []
    real = ops.attention_inference

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused.attention.ops, "attention_inference", counted)
    return calls


@needs_kernel
def test_fused_sdpa_runs_the_kernel_for_inference(kernel_calls):
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    mask = torch.rand(2, 1, 16, 16) > 0.3
    with torch.no_grad():
        out = fused.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len(kernel_calls) == 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("case", ["grad", "dropout", "grouped_query_grad", "too_long", "too_many_scores", "float64",
                                  "flash_disabled"])
def test_fused_sdpa_calls_sdpa_where_the_kernel_does_not_apply(kernel_calls, monkeypatch, case):
    """Gradients wanted (grouped-query heads too), dropout, long sequences, more scores than the cap, other
    dtypes, a torch whose flash kernel is switched off (its output layout differs): SDPA itself, with its
    values and gradients."""
    t = fused.attention.ATTENTION_INFERENCE_MAX_SEQ + 1 if case == "too_long" else 8
    if case == "too_many_scores":
        monkeypatch.setattr(fused.attention, "ATTENTION_INFERENCE_MAX_SCORES", 4 * t * t - 1)  # 1 x 4 heads
    dtype = torch.float64 if case == "float64" else torch.float32
    q = torch.randn(1, 4, t, 8, dtype=dtype, requires_grad=case in ("grad", "grouped_query_grad"))
    heads_kv = 2 if case == "grouped_query_grad" else 4
    k, v = torch.randn(1, heads_kv, t, 8, dtype=dtype), torch.randn(1, heads_kv, t, 8, dtype=dtype)
    kwargs = dict(dropout_p=0.5 if case == "dropout" else 0.0, enable_gqa=case == "grouped_query_grad")
    backends = [SDPBackend.MATH] if case == "flash_disabled" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        generator_state = torch.get_rng_state()
        out = fused.scaled_dot_product_attention(q, k, v, **kwargs)
        torch.set_rng_state(generator_state)
        expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert kernel_calls == []
    torch.testing.assert_close(out, expected)
    assert out.stride() == expected.stride()
    if case == "grad":
        (grad,) = torch.autograd.grad(out.sum(), q)
        (expected_grad,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).sum(), q)
        torch.testing.assert_close(grad, expected_grad)


# ------------------------------------------------------------------------------------ tg.optimize


class CrossAttentionDecoder(nn.Module):
    """A decoder layer as PyTorch seq2seq code writes one: masked self-attention, then attention over the
    encoder's output with its padding mask (queries and keys of different lengths), then an MLP."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def split(self, x, b, t):
        return x.view(b, t, self.heads, -1).transpose(1, 2)

    def forward(self, x, memory, memory_keep):
        b, t, c = x.size()
        s = memory.size(1)
        q, k, v = (self.split(z, b, t) for z in self.self_qkv(x).chunk(3, dim=-1))
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        k, v = (self.split(z, b, s) for z in self.kv(memory).chunk(2, dim=-1))
        mask = memory_keep[:, None, None, :].bool()
        attended = F.scaled_dot_product_attention(self.split(self.q(x), b, t), k, v, attn_mask=mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(x)


def _decoder_model():
    net = CrossAttentionDecoder().eval()
    x, memory = tg.Input(shape=(6, 32), name="x"), tg.Input(shape=(9, 32), name="memory")
    keep = tg.Input(shape=(9,), dtype=torch.long, name="memory_keep")
    return net, tg.Model([x, memory, keep], net(x, memory, keep))


def _decoder_data(batch=3):
    keep = torch.ones(batch, 9, dtype=torch.long)
    keep[1, 5:] = 0
    return torch.randn(batch, 6, 32), torch.randn(batch, 9, 32), keep


def _targets(model) -> list:
    return [node.target for node in model.graph.nodes if node.op == "call_function"]


@needs_kernel
def test_optimize_runs_cross_and_masked_attention_on_the_kernel(kernel_calls):
    """The causal self-attention on a packed projection becomes qkv_attention; the masked cross-attention,
    which is not on a packed projection, runs ops.attention_inference; outputs equal eager's."""
    net, model = _decoder_model()
    fast = tg.optimize(model)
    assert fused.scaled_dot_product_attention in _targets(fast) and fused.qkv_attention in _targets(fast)
    data = _decoder_data()
    with torch.no_grad():
        torch.testing.assert_close(fast(*data), net(*data), atol=1e-5, rtol=1e-5)
    assert len(kernel_calls) == 1
    # the optimized model pickles (torch.fx re-traces the fused call when it loads)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*data), fast(*data))
        torch.testing.assert_close(copy.deepcopy(fast)(*data), fast(*data))


@needs_kernel
def test_optimize_for_training_keeps_sdpa(onednn_routes):
    _, model = _decoder_model()
    trainable = tg.optimize(model, inference=False)
    assert fused.scaled_dot_product_attention not in _targets(trainable)


@needs_kernel
def test_optimized_model_exports_to_onnx_with_sdpa(tmp_path, onednn_routes):
    """Exporters trace fused.scaled_dot_product_attention's SDPA branch: the ONNX file gives eager's outputs."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net, model = _decoder_model()
    path = tmp_path / "decoder.onnx"
    tg.export_onnx(tg.optimize(model), path)
    data = _decoder_data()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: d.numpy() for i, d in zip(session.get_inputs(), data)}
    (out,) = session.run(None, feeds)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), net(*data), atol=1e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_optimize_hf_llama_runs_its_attention_on_the_kernel(kernel_calls, dtype):
    """HF LLaMA (rotary embeddings between the projections and SDPA, a boolean causal mask): its SDPA
    calls run ops.attention_inference, and the output matches eager's (bfloat16: to bfloat16's accuracy)."""
    pytest.importorskip("transformers")
    from community_models.hf import tiny_llama

    net = tiny_llama(num_key_value_heads=4).eval()
    ids = tg.Input(shape=(12,), dtype=torch.long, name="input_ids")
    model = tg.Model(ids, net(ids).last_hidden_state)
    if dtype is not None and not passes.bfloat16_supported()[0]:
        pytest.skip("this CPU has no bfloat16 instructions")
    fast = tg.optimize(model, dtype=dtype)
    data = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, out = net(data).last_hidden_state, fast(data)
    assert len(kernel_calls) == 2  # one per decoder layer
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype is None else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(out, expected, **tolerance)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_attention_stays_on_sdpa(monkeypatch, onednn_routes, dtype):
    """NOTE: [Small attention on SDPA]: ViT-tiny's 2 x 4 heads x 17 positions of 16 (where the kernel's ~60 us
    fixed cost made tg.optimize slower than eager) run SDPA, ViT-S's 1 x 6 x 197 x 64 the kernel; both
    through fused.scaled_dot_product_attention and fused.qkv_attention, with SDPA's values."""
    calls = []
    for name in ("attention_inference", "qkv_attention"):
        real = getattr(ops, name)
        monkeypatch.setattr(fused.attention.ops, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for (batch, heads, seq, dim), runs_kernel in (((2, 4, 17, 16), False), ((1, 6, 197, 64), True)):
        assert fused.attention._kernel_pays(batch, heads, seq, seq, dim) is runs_kernel
        q, k, v = (torch.randn(batch, heads, seq, dim).to(dtype) for _ in range(3))
        qkv = torch.randn(batch, seq, 3 * heads * dim).to(dtype)
        calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(fused.scaled_dot_product_attention(q, k, v),
                                       F.scaled_dot_product_attention(q, k, v), **tol)
            torch.testing.assert_close(fused.qkv_attention(qkv, heads),
                                       fused.attention._sdpa_qkv_attention(qkv, heads, False, None), **tol)
        on_kernel = runs_kernel and dtype in fused._common._ONEDNN_DTYPES  # bf16 only with bf16 instructions
        assert calls == (["attention_inference", "qkv_attention"] if on_kernel else [])
