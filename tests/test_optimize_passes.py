"""tg.optimize on models written the way their communities write them: inlining, canonical forms,
encoder layers as primitive ops, bfloat16, and the shape-based never-slower decisions."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
import torchgraph.passes as passes
from torchgraph import fused, ops
from torchgraph.optimize import OPTIMIZE_META

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from handwritten import (Bottleneck, EncoderClassifier, InvertedResidual,  # noqa: E402
                         TorchvisionResNet, randomize_batchnorm)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _wrap(module: nn.Module, shape: tuple) -> tg.Model:
    x = tg.Input(shape=shape)
    return tg.Model(x, module(x))


def _targets(model) -> list:
    return [n.target for n in model.graph.nodes if n.op == "call_function"]


def _called_modules(model) -> list:
    return [model.get_submodule(n.target) for n in model.graph.nodes if n.op == "call_module"]


def _parity(model, module, x, atol=1e-4, **options):
    fast = tg.optimize(model.eval(), **options)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), module.eval()(x), atol=atol, rtol=1e-4)
    return fast


def test_torchvision_resnet_is_inlined_folded_and_fused():
    """A torchvision-style ResNet (Bottleneck, shared nn.ReLU(inplace=True), nn.Sequential
    downsample, `out += identity`) recorded as one module call: every BatchNorm is folded, every
    ReLU fused, and the outputs match eager."""
    net = randomize_batchnorm(TorchvisionResNet(layers=(1, 1, 1, 1), num_classes=10))
    model = _wrap(net, (3, 32, 32))
    assert len(list(model.graph.nodes)) == 3  # input, the whole network, output
    fast = _parity(model, net, torch.randn(2, 3, 32, 32))
    called = _called_modules(fast)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.Sequential, Bottleneck)) for m in called)
    targets = _targets(fast)
    # each block's last conv adds the residual and applies the ReLU in its epilogue
    assert targets.count(fused.conv2d_act) == 13 and targets.count(fused.conv2d_add_act) == 4
    assert ops.add_relu not in targets
    assert ops.max_pool2d_inference in targets
    names = {k.split(".", 1)[1] for k in fast.state_dict()}  # less the wrapping layer's name
    folded_biases = {k for k in names if k.endswith(".bias") and k not in net.state_dict()}
    assert all(k.replace(".bias", ".weight") in names for k in folded_biases)
    assert names - folded_biases <= set(net.state_dict())  # parameters keep their owners' names


def test_original_torchvision_model_untouched():
    """Inlining and folding work on the copy: the user's module keeps its layers and its outputs."""
    net = randomize_batchnorm(TorchvisionResNet(layers=(1, 1, 1, 1), num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = net(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    tg.optimize(_wrap(net, (3, 32, 32)))
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert isinstance(net.layer1[0].bn1, nn.BatchNorm2d) and net.layer1[0].relu.inplace
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)


def test_training_mode_inlined_gradients_match():
    """inference=False on the torchvision-style ResNet: BatchNorm stays (batch statistics), and the
    gradients of every parameter equal the original module's."""
    net = TorchvisionResNet(layers=(1, 1, 1, 1), num_classes=4)
    model = _wrap(net, (3, 32, 32)).train()
    fast = tg.optimize(model, inference=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in _called_modules(fast))
    x = torch.randn(3, 3, 32, 32)
    reference = TorchvisionResNet(layers=(1, 1, 1, 1), num_classes=4)
    reference.load_state_dict(net.state_dict())
    reference.train()(x).square().sum().backward()
    fast(x).square().sum().backward()
    grads = dict(reference.named_parameters())
    for name, p in fast.named_parameters():
        key = name.split(".", 1)[1]  # drop the wrapping layer's name
        torch.testing.assert_close(p.grad, grads[key].grad, atol=1e-4, rtol=1e-3)


def test_mobilenet_block_depthwise_and_relu6_stay_channels_last():
    """An inverted residual (1x1 + ReLU6, depthwise 3x3 + ReLU6, 1x1, residual add): ReLU6 fuses
    into the convs, the expansion and the depthwise conv become one call (passes.fuse_expand_depthwise), the
    residual goes into the last conv, and all run in the channels_last stack; outputs match."""
    block = randomize_batchnorm(nn.Sequential(InvertedResidual(16, 16, 1, 6), InvertedResidual(16, 24, 2, 6)))
    fast = _parity(_wrap(block, (16, 8, 8)), block, torch.randn(2, 16, 8, 8))
    convs = [n for n in fast.graph.nodes if n.target in (fused.conv2d_act, fused.conv2d_add_act)]
    blocks = [n for n in fast.graph.nodes if n.target is fused.conv2d_expand_depthwise]
    assert len(convs) == 2 and all(n.kwargs == {"channels_last": True} for n in convs)
    assert len(blocks) == 2 and all(n.args[3] == n.args[8] == "relu6" for n in blocks)
    # the first block's `x + conv(x)` adds the residual in the conv's epilogue
    assert [n.args[-1] for n in convs if n.target is fused.conv2d_add_act] == ["none"]
    assert not any(n.target == "contiguous" for n in fast.graph.nodes if n is not convs[-1].next)


def test_inplace_activation_with_other_users_is_kept():
    """An in-place ReLU whose input is read again afterwards (or is a model input) is not turned
    into an out-of-place one: the other reader sees the mutated value, as in eager."""

    class Aliasing(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.linear(x)
            y = self.act(h)
            return y + h  # h was mutated by the in-place ReLU

    net = Aliasing()
    fast = _parity(_wrap(net, (4,)), net, torch.randn(3, 4))
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in _called_modules(fast))


def test_untraceable_submodule_stays_opaque():
    """A block with data-dependent control flow is kept as one call; the rest is still inlined."""

    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x - 1

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), DataDependent())
    randomize_batchnorm(net)
    fast = _parity(_wrap(net, (3, 8, 8)), net, torch.randn(2, 3, 8, 8))
    assert any(isinstance(m, DataDependent) for m in _called_modules(fast))
    # a lone convolution (NCHW in, read by a layer that needs NCHW) runs as F.conv2d (NOTE: [Lone convolutions])
    assert F.conv2d in _targets(fast) and fused.conv2d_act not in _targets(fast)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in _called_modules(fast))


def test_nested_tg_model_is_inlined():
    """A tg.Model used as a layer of another tg.Model is inlined, so its conv + BN + ReLU fuse."""
    x = tg.Input(shape=(3, 8, 8))
    inner = tg.Model(x, F.relu(nn.BatchNorm2d(4)(nn.Conv2d(3, 4, 3)(x))))
    randomize_batchnorm(inner)
    y = tg.Input(shape=(3, 8, 8))
    outer = tg.Model(y, nn.Flatten()(inner(y)))
    fast = _parity(outer, outer, torch.randn(2, 3, 8, 8))
    assert not any(isinstance(m, (tg.Model, nn.BatchNorm2d)) for m in _called_modules(fast))
    assert F.conv2d in _targets(fast)  # its BatchNorm folded; a lone convolution (NOTE: [Lone convolutions])


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_becomes_fused_primitives(norm_first, activation):
    """nn.TransformerEncoder of nn.TransformerEncoderLayer (post-LN and pre-LN, ReLU and GELU)
    becomes linear + qkv_attention + add_layer_norm; outputs match the module's (fast path)."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation=activation, batch_first=True,
                                       norm_first=norm_first)
    net = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    fast = _parity(_wrap(net, (10, 32)), net, torch.randn(3, 10, 32))
    targets = _targets(fast)
    assert targets.count(fused.qkv_attention) == 2 and ops.add_layer_norm in targets
    assert not any(isinstance(m, (nn.TransformerEncoder, nn.MultiheadAttention)) for m in _called_modules(fast))


def test_encoder_with_a_mask_is_left_alone():
    """An encoder called with a mask keeps the module call (the rewrite covers unmasked attention)."""
    net = EncoderClassifier(dim=16, heads=2, layers=1).encoder.eval()
    x = tg.Input(shape=(6, 16))
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    model = tg.Model(x, net(x, mask=mask))
    fast = tg.optimize(model)
    assert any(isinstance(m, nn.TransformerEncoder) for m in _called_modules(fast))


def test_self_attention_module_output_only():
    """`mha(x, x, x)[0]` (weights unused) becomes in_proj + qkv_attention + out_proj; using the
    weights keeps the module."""
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = tg.Input(shape=(5, 16))
    out, weights = mha(x, x, x)
    fast = tg.optimize(tg.Model(x, out))
    assert fused.qkv_attention in _targets(fast)
    data = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), mha.eval()(data, data, data)[0], atol=1e-5, rtol=1e-4)
    kept = tg.optimize(tg.Model(x, [out, weights]))
    assert any(isinstance(m, nn.MultiheadAttention) for m in _called_modules(kept))


# ---------------------------------------------------------------------------- bfloat16


@pytest.mark.skipif(not passes.bfloat16_supported()[0], reason="this CPU has no native bfloat16")
def test_bfloat16_takes_and_returns_float32():
    """dtype=torch.bfloat16: weights in bf16, float32 in and out, close to float32 (bf16 rounding)."""
    net = randomize_batchnorm(TorchvisionResNet(layers=(1, 1, 1, 1), num_classes=10)).eval()
    fast = tg.optimize(_wrap(net, (3, 32, 32)), dtype=torch.bfloat16)
    assert fast.meta[OPTIMIZE_META]["dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out, expected = fast(x), net(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0.05 * expected.abs().max().item(), rtol=0.05)


@pytest.mark.skipif(not passes.bfloat16_supported()[0], reason="this CPU has no native bfloat16")
def test_bfloat16_transformer_keeps_integer_and_float_interfaces():
    """A token model: integer input untouched, embeddings and encoder in bf16, float32 output."""
    emb = nn.Embedding(50, 32)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    tokens = tg.Input(shape=(12,), dtype=torch.long)
    model = tg.Model(tokens, nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)(emb(tokens))).eval()
    fast = tg.optimize(model, dtype=torch.bfloat16)
    data = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        out, expected = fast(data), model(data)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0.1, rtol=0.05)


def test_bfloat16_falls_back_with_a_message(monkeypatch):
    """On a CPU without bf16 instructions (capability check forced), it warns and stays float32."""
    monkeypatch.setattr(passes, "bfloat16_supported", lambda: (False, "this CPU has neither AVX512-BF16 nor AMX"))
    x = tg.Input(shape=(8,))
    model = tg.Model(x, nn.Linear(8, 3)(x))
    with pytest.warns(UserWarning, match="computing in float32"):
        fast = tg.optimize(model, dtype=torch.bfloat16)
    assert fast.meta[OPTIMIZE_META]["dtype"] == "float32"
    assert all(p.dtype == torch.float32 for p in fast.parameters())


def test_bad_dtype_arguments_raise():
    """Other dtypes and bf16 training are refused with what to do instead."""
    x = tg.Input(shape=(8,))
    model = tg.Model(x, nn.Linear(8, 3)(x))
    with pytest.raises(ValueError, match="dtype must be None, torch.float32 or torch.bfloat16"):
        tg.optimize(model, dtype=torch.float16)
    with pytest.raises(ValueError, match="for inference"):
        tg.optimize(model, inference=False, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------- never slower


@pytest.mark.skipif(not fused._common._HAS_ONEDNN, reason="needs oneDNN")
@pytest.mark.parametrize("threshold,expect_onednn", [(0, True), (1 << 40, False)])
def test_small_linear_decision_is_shape_based_and_forcible(monkeypatch, threshold, expect_onednn):
    """Below ONEDNN_LINEAR_MIN_MACS a fused linear runs F.linear + activation (oneDNN's fixed cost
    loses there); the decision depends on shapes only, so moving the threshold forces either path."""
    monkeypatch.setattr(fused.linear, "ONEDNN_LINEAR_MIN_MACS", threshold)
    calls = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or real_linear(*a, **k))
    x, w, b = torch.randn(300, 8), torch.randn(6, 8), torch.randn(6)  # rows >= MKL_PACKED_MAX_ROWS
    with torch.no_grad():
        y = fused.linear_act(x, w, b, "relu")
    torch.testing.assert_close(y, torch.relu(real_linear(x, w, b)))
    assert bool(calls) is not expect_onednn


@pytest.mark.usefixtures("mkl_routes")
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "hardswish"])
def test_few_rows_use_mkl_packed_weights(monkeypatch, act):
    """Fewer rows than MKL_PACKED_MAX_ROWS (a classifier head at a small batch) run MKL's prepacked
    GEMM, cached per (weight, rows) and refreshed when the weight changes; values match F.linear.
    (The threshold on the weight's size is moved so that a small layer takes the path.)"""
    monkeypatch.setattr(fused.weights, "_MKL_PACKED", {})
    monkeypatch.setattr(fused.linear, "MKL_PACKED_MIN_WEIGHT", 0)
    x, w, b = torch.randn(2, 3, 16), torch.randn(10, 16), torch.randn(10)
    with torch.no_grad():
        y = fused.linear_act(x, w, b, act)
        torch.testing.assert_close(y, fused._common._activation(F.linear(x, w, b), act), atol=1e-5, rtol=1e-5)
        assert list(fused.weights._MKL_PACKED) == [id(w)] and list(fused.weights._MKL_PACKED[id(w)][2]) == [6]
        w.mul_(2)  # bumps the version: the packed copy is rebuilt
        torch.testing.assert_close(fused.linear_act(x, w, b, act), fused._common._activation(F.linear(x, w, b), act),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("mkl_routes")
def test_token_rows_below_the_limit_run_mkl_and_above_onednn(monkeypatch):
    """ViT-S's linears (197 token rows at batch 1) run MKL's packed GEMM (NOTE: [MKL for a few
    hundred rows]); from MKL_PACKED_MAX_ROWS rows on, oneDNN's fused linear. Same values either way."""
    monkeypatch.setattr(fused.weights, "_MKL_PACKED", {})
    limit = fused.linear.MKL_PACKED_MAX_ROWS
    w, b = torch.randn(512, 384) * 0.05, torch.randn(512)
    for rows, kernel in ((197, "mkl::_mkl_linear"), (limit - 1, "mkl::_mkl_linear"),
                         (limit, "mkldnn::_linear_pointwise")):
        x = torch.randn(1, rows, 384)
        with torch.no_grad(), torch.profiler.profile() as prof:
            y = fused.linear_act(x, w, b, "gelu")
        names = [event.name for event in prof.events()]
        assert kernel in names and not {"mkl::_mkl_linear", "mkldnn::_linear_pointwise"} - {kernel} & set(names)
        torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not fused._common._HAS_ONEDNN, reason="needs oneDNN")
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_large_linears_run_from_weights_reordered_once(monkeypatch, act):
    """Inference linears on oneDNN read a copy of the weight reordered for its matmul, cached beside
    the parameter and rebuilt when the weight changes; inference-mode weights run unpacked."""
    monkeypatch.setattr(fused.weights, "_ONEDNN_LINEAR", {})
    monkeypatch.setattr(fused.linear, "KERNEL_MAX_ROWS", 0)  # AVX2 would take 256 rows to the GEMM kernel
    x, w, b = torch.randn(2, 128, 256), torch.randn(512, 256) * 0.05, torch.randn(512)
    with torch.no_grad():
        torch.testing.assert_close(fused.linear_act(x, w, b, act), fused._common._activation(F.linear(x, w, b), act),
                                   atol=1e-4, rtol=1e-4)
        assert list(fused.weights._ONEDNN_LINEAR) == [id(w)]
        w.mul_(-1)
        torch.testing.assert_close(fused.linear_act(x, w, b, act), fused._common._activation(F.linear(x, w, b), act),
                                   atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        frozen = w.clone()
        torch.testing.assert_close(fused.linear_act(x, frozen, b, act),
                                   fused._common._activation(F.linear(x, frozen, b), act), atol=1e-4, rtol=1e-4)
    assert list(fused.weights._ONEDNN_LINEAR) == [id(w)]


@pytest.mark.usefixtures("onednn_routes")
def test_on_other_vendors_cpus_every_placed_gemm_runs_on_onednn(monkeypatch):
    """On a CPU where MKL is slow (AMD: NOTE: [MKL on other vendors' CPUs]) a few-row head and ViT's
    token rows run oneDNN's fused linear from the reordered weight, never MKL; a tiny linear stays
    F.linear. Same values either way."""
    monkeypatch.setattr(fused.weights, "_MKL_PACKED", {})
    w, b = torch.randn(512, 384) * 0.05, torch.randn(512)
    for rows in (16, 197):  # 16 rows: 3.1M multiply-adds
        x = torch.randn(1, rows, 384)
        with torch.no_grad(), torch.profiler.profile() as prof:
            y = fused.linear_act(x, w, b, "gelu")
        names = {event.name for event in prof.events()}
        assert "mkldnn::_linear_pointwise" in names and "mkl::_mkl_linear" not in names
        torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)), atol=1e-4, rtol=1e-4)
    assert not fused.weights._MKL_PACKED
    tiny = torch.randn(8, 64)
    with torch.no_grad(), torch.profiler.profile() as prof:
        fused.linear_act(tiny, torch.randn(10, 64), None, "relu")  # 8 x 64 x 10 multiply-adds
    assert "mkldnn::_linear_pointwise" not in {event.name for event in prof.events()}


def test_this_cpu_decides_the_gemm_routes():
    """MKL's routes are the default on Intel CPUs only; the vendor is read from the CPU."""
    from torchgraph.fused import cpu_profile

    vendor = cpu_profile.cpu_vendor()
    assert vendor in {"GenuineIntel", "AuthenticAMD", ""} or vendor.isprintable()
    assert cpu_profile.MKL_GEMMS_FAST == (vendor == "GenuineIntel" and torch.backends.mkl.is_available())
    assert (fused.linear.MKL_PACKED_MAX_ROWS > 0) == cpu_profile.MKL_GEMMS_FAST
    assert fused.conv._MKL_CONV_GEMMS == (cpu_profile.MKL_GEMMS_FAST and fused.weights._HAS_MKL_PACKED)


def test_default_threshold_keeps_gpt_sized_linears_on_onednn():
    """The GPT block's projections (1024 rows x 256 x 768) are above the threshold, an MLP head on a
    small batch (8 x 64 x 10) below it."""
    assert 1024 * 256 * 768 >= fused.ONEDNN_LINEAR_MIN_MACS > 8 * 64 * 10


def test_bfloat16_export_warning_free_structure():
    """The optimized graph records what it chose (dtype) for inspection."""
    x = tg.Input(shape=(8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = tg.optimize(tg.Model(x, nn.Linear(8, 3)(x)))
    assert fast.meta[OPTIMIZE_META] == {"dtype": "float32", "inference": True}


# ---------------------------------------------------------------------------- attention spellings


class _NanoGPTAttention(nn.Module):
    """Self-attention as nanoGPT's CausalSelfAttention writes it (flash path)."""

    def __init__(self, n_embd=32, n_head=4):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(0.1)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, 0.1

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                           dropout_p=self.dropout if self.training else 0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class _TimmAttention(nn.Module):
    """Self-attention as timm's vision_transformer.Attention writes it (fused_attn path)."""

    def __init__(self, dim=32, num_heads=4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


# pytest rewrites `assert` statements in test modules; this class must keep plain Python bytecode.
_ASSERTING_SOURCE = """
class WithAssertAndDefault(nn.Module):
    \"\"\"nanoGPT's GPT.forward habits: an assert on a traced size and an optional argument.\"\"\"

    def __init__(self):
        super().__init__()
        self.attn = attention()

    def forward(self, x, targets=None):
        b, t, c = x.size()
        assert t <= 16, f"sequence of length {t} is too long"
        y = self.attn(x)
        if targets is not None:
            return F.mse_loss(y, targets)
        return y
"""


def _with_assert_and_default() -> nn.Module:
    namespace = {"nn": nn, "F": F, "attention": _NanoGPTAttention}
    exec(compile(_ASSERTING_SOURCE, "<asserting block>", "exec"), namespace)
    return namespace["WithAssertAndDefault"]()


@pytest.mark.parametrize("block,causal", [(_NanoGPTAttention, True), (_TimmAttention, False)])
@pytest.mark.parametrize("inference", [True, False])
def test_community_attention_spellings_fuse(block, causal, inference):
    """nanoGPT's split/view/transpose/contiguous and timm's reshape/permute/unbind attention become
    one fused.qkv_attention; outputs (and in training mode, without dropout, gradients) match."""
    net = block()
    if hasattr(net, "dropout"):  # nanoGPT with dropout=0.0 (with dropout, training keeps SDPA)
        net.dropout, net.resid_dropout = 0.0, nn.Dropout(0.0)
    net.train(not inference)
    fast = tg.optimize(_wrap(net, (10, 32)), inference=inference)
    (node,) = [n for n in fast.graph.nodes if n.target is fused.qkv_attention]
    assert node.args[1:] == (4, causal)
    x = torch.randn(3, 10, 32)
    if inference:
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-4)
        return
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    fast(xs[0]).square().sum().backward()
    net(xs[1]).square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-5, rtol=1e-4)
    grads = dict(net.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads[name.split(".", 1)[1]].grad, atol=1e-4, rtol=1e-4)


def test_dropout_in_training_keeps_sdpa():
    """nanoGPT attention with dropout, optimized for training, is not fused (dropout must run)."""
    net = _NanoGPTAttention().train()
    fast = tg.optimize(_wrap(net, (10, 32)), inference=False)
    assert fused.qkv_attention not in _targets(fast)


def test_assert_and_optional_argument_inline():
    """An `assert` on a traced size stays as a run-time check (torch._assert) and `targets=None`
    takes the inference branch, so the block is inlined and its attention fused."""
    net = _with_assert_and_default().eval()
    fast = _parity(_wrap(net, (12, 32)), net, torch.randn(2, 12, 32), atol=1e-5)
    assert fused.qkv_attention in _targets(fast) and torch._assert in _targets(fast)
    assert not any(t is F.mse_loss for t in _targets(fast))


@pytest.mark.parametrize("page", ["docs/optimize.md", "docs/kernels.md"])
def test_docs_python_blocks_run_standalone(page):
    """Every ```python block of the optimize and kernels pages runs on its own in a fresh namespace."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent
    blocks = re.findall(r"```python\n(.*?)```", (root / page).read_text(), flags=re.S)
    for i, code in enumerate(blocks):
        exec(compile(code, f"{page}[{i}]", "exec"), {})


def test_inlined_models_export_to_onnx(tmp_path):
    """An optimized torchvision-style block stack and an optimized encoder (inlined, expanded,
    fused) export to standard ONNX ops and match in onnxruntime (tg.export_onnx verifies)."""
    pytest.importorskip("onnxruntime")
    import onnx

    cnn = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True),
                                            InvertedResidual(16, 16, 1, 2)))
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1,
                                    enable_nested_tensor=False)
    for net, shape in ((cnn, (3, 8, 8)), (encoder, (6, 16))):
        fast = tg.optimize(_wrap(net, shape).eval())
        path = tg.export_onnx(fast, tmp_path / "m.onnx")
        domains = {n.domain for n in onnx.load(path).graph.node}
        assert domains <= {"", "ai.onnx"}, domains


def test_small_linear_in_training_uses_eager_autograd():
    """Below the threshold, a trainable linear runs F.linear + the activation with eager autograd
    (no autograd.Function overhead); gradients equal the plain computation's."""
    x = torch.randn(4, 8, requires_grad=True)
    w, b = torch.randn(6, 8, requires_grad=True), torch.randn(6, requires_grad=True)
    y = fused.linear_act(x, w, b, "gelu")
    assert "_TrainableLinearAct" not in type(y.grad_fn).__name__
    y.square().sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    F.gelu(F.linear(x2, w2, b2)).square().sum().backward()
    for got, want in ((x, x2), (w, w2), (b, b2)):
        torch.testing.assert_close(got.grad, want.grad)
