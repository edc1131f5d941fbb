"""``ops.gemm_act_inference`` and the fused convolutions that run their 1x1 (and few-pixel) GEMMs on it."""

import itertools
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
import torchgraph._extension as extension
import torchgraph.ops as ops
from torchgraph import fused
from torchgraph.fused import conv as fused_conv
from torchgraph.fused.weights import GemmPanels
from torchgraph.ops._common import ACTIVATION_FNS
from torchgraph.ops.gemm_act_inference import GEMM_ACTIVATIONS, gemm_panels

needs_c_ops = pytest.mark.skipif(not extension.HAS_C_OPS, reason="torchgraph._C is not built")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _exact(x, weight, bias, residual, act):
    """The same product in float64."""
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return ACTIVATION_FNS[act](y if residual is None else y + residual.double())


@needs_c_ops
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("in_features", [0, 1, 16, 37, 1030])  # 1030: sums in blocks of 512 (above 1024)
def test_kernel_matches_the_product(in_features, threads):
    """Row counts around the 6- and 12-row tiles and the split between threads (by rows, or by panels where
    rows are few or fewer than output channels), output channels around the 16-channel panels (one, a part of
    one, odd counts of them), every activation, with and without bias and residual, rows read through a
    stride: float32 to its rounding."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        forms = itertools.cycle(itertools.product([True, False], [True, False], [True, False]))
        for rows, out_features, act in itertools.product([1, 5, 6, 7, 13, 50, 97, 200], [1, 15, 16, 17, 40, 48, 100],
                                                         GEMM_ACTIVATIONS):
            with_bias, with_residual, strided = next(forms)
            source = torch.randn(rows, in_features + (3 if strided else 0))
            x = source[:, :in_features] if strided else source
            weight = torch.randn(out_features, in_features)
            bias = torch.randn(out_features) if with_bias else None
            residual = torch.randn(rows, out_features) if with_residual else None
            y = ops.gemm_act_inference(x, gemm_panels(weight), bias, residual, out_features, act)
            expected = _exact(x, weight, bias, residual, act)
            assert y.shape == (rows, out_features) and y.is_contiguous() and y.dtype == torch.float32
            error = ((y.double() - expected).abs() / (1 + expected.abs())).max().item()
            assert error <= 2e-7 * max(in_features, 4), (rows, out_features, act, with_bias, with_residual, error)
    finally:
        torch.set_num_threads(previous)


@needs_c_ops
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_transcendental_epilogues_are_accurate_over_their_range(act, threads):
    """GELU, GELU-tanh and SiLU in the kernel's epilogue (computed in registers: NOTE: [GELU's erf in
    registers], NOTE: [Exp in registers]) against float64 over [-10, 10], where erf and exp saturate, and at
    the tails (exp clamped): within 3e-7 x max(1, |x|), NaN kept."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tails = torch.tensor([-1e4, -100.0, -90.0, -87.5, 87.5, 90.0, 100.0, 1e4, float("nan")])
        x = torch.cat([torch.linspace(-10, 10, 20_001), tails]).unsqueeze(1)
        y = ops.gemm_act_inference(x, gemm_panels(torch.ones(1, 1)), None, None, 1, act)
    finally:
        torch.set_num_threads(previous)
    expected = ACTIVATION_FNS[act](x.double())
    error = (y.double() - expected).abs() / x.double().abs().clamp(min=1)
    assert error[:-1].max().item() <= 3e-7 and y[-1].isnan().all()


@needs_c_ops
def test_the_reference_is_the_product():
    x, weight, bias, residual = torch.randn(9, 24), torch.randn(40, 24), torch.randn(40), torch.randn(9, 40)
    y = ops.reference_gemm_act_inference(x, gemm_panels(weight), bias, residual, 40, "hardswish")
    torch.testing.assert_close(y, F.hardswish(F.linear(x, weight, bias) + residual))
    torch.testing.assert_close(ops.gemm_act_inference(x, gemm_panels(weight), bias, residual, 40, "hardswish"), y,
                               atol=1e-5, rtol=1e-5)
    assert ops.reference_for(ops.gemm_act_inference) is ops.reference_gemm_act_inference


def test_panels_hold_the_weight():
    weight = torch.randn(20, 3)
    panels = gemm_panels(weight)
    assert panels.shape == (2, 3, 16) and panels.is_contiguous()
    assert torch.equal(panels[0], weight[:16].T) and torch.equal(panels[1, :, :4], weight[16:].T)
    assert not panels[1, :, 4:].any()
    with pytest.raises(RuntimeError, match=r"gemm_panels: weight must be 2-D \(out_features, in_features\), got "
                                           r"shape \[20, 3, 1, 1\]"):
        gemm_panels(weight[:, :, None, None])


@needs_c_ops
def test_opcheck():
    x, weight = torch.randn(13, 40), torch.randn(33, 40)
    op = torch.ops.torchgraph.gemm_act_inference.default
    torch.library.opcheck(op, (x, gemm_panels(weight), torch.randn(33), torch.randn(13, 33), 33, "relu6"))
    torch.library.opcheck(op, (x[:, :20], gemm_panels(weight[:, :20]), None, None, 33))


@needs_c_ops
def test_backward_raises_with_the_fix():
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward.*inference=False"):
        ops.gemm_act_inference(x, gemm_panels(torch.randn(8, 8)), None, None, 8).sum().backward()


@needs_c_ops
@pytest.mark.parametrize("args, match", [
    ((torch.randn(4, 8).double(), gemm_panels(torch.randn(8, 8)), None, None, 8, "none"), "x must be float32"),
    ((torch.randn(2, 4, 8), gemm_panels(torch.randn(8, 8)), None, None, 8, "none"), r"x must be 2-D \(rows, "),
    ((torch.randn(4, 8), gemm_panels(torch.randn(8, 6)), None, None, 8, "none"),
     r"panels must have shape \[1, 8, 16\] for 8 output features and 8 input features \(ops.gemm_panels\(weight\)\)"
     r", got \[1, 6, 16\]"),
    ((torch.randn(4, 8), gemm_panels(torch.randn(8, 8)), None, None, 20, "none"),
     r"panels must have shape \[2, 8, 16\] for 20 output features"),
    ((torch.randn(4, 8), gemm_panels(torch.randn(8, 8)), torch.randn(4), None, 8, "none"),
     r"bias must have shape \[8\], got \[4\]"),
    ((torch.randn(4, 8), gemm_panels(torch.randn(8, 8)), None, torch.randn(8, 4), 8, "none"),
     r"residual must have shape \[4, 8\], got \[8, 4\]"),
    ((torch.randn(4, 8), gemm_panels(torch.randn(8, 8)), None, None, 8, "tanh"),
     "act must be one of none, relu, relu6, silu, hardswish, gelu, gelu_tanh, got 'tanh'"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_inputs_raise_the_same_message_on_the_kernel_and_the_fake(args, match, device):
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.torchgraph.gemm_act_inference.default(*args)


# ------------------------------------------------------------------------------- the fused convolutions


def _route(weight):
    return fused_conv._planned_route(weight)


@pytest.fixture
def gemm_kernel(kernel_routes):
    """The kernel switched on, as on an AVX2 CPU, whatever this CPU is (NOTE: [GEMM kernel])."""


@pytest.mark.parametrize("act", ["none", "relu", "relu6", "hardswish", "gelu", "tanh"])  # tanh: after the kernel
@pytest.mark.parametrize("kernel, side, stride", [(1, 8, 1), (1, 9, 2), (3, 2, 1)])  # 3x3 on 2x2: im2col
def test_conv2d_act_runs_its_gemm_on_the_kernel(gemm_kernel, act, kernel, side, stride):
    conv = nn.Conv2d(72, 40, kernel, stride, padding=kernel // 2)
    x = torch.randn(2, 72, side, side).contiguous(memory_format=torch.channels_last)
    args = (conv.weight, conv.bias, [stride] * 2, [kernel // 2] * 2, [1, 1], 1, act)
    with torch.no_grad():
        y = fused_conv.conv2d_act(x, *args, channels_last=True)
        again = fused_conv.conv2d_act(x, *args, channels_last=True)
        expected = fused._common._ACTIVATION_FNS[act](conv(x))
    assert _route(conv.weight).startswith("GEMM kernel, ")
    assert torch.equal(y, again) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["none", "relu"])
@pytest.mark.parametrize("residual_layout", [torch.channels_last, torch.contiguous_format])
def test_conv2d_add_act_adds_the_residual_in_the_kernel(gemm_kernel, act, residual_layout):
    conv = nn.Conv2d(64, 24, 1)
    x = torch.randn(3, 64, 5, 7).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(3, 24, 5, 7).contiguous(memory_format=residual_layout)
    with torch.no_grad():
        y = fused_conv.conv2d_add_act(x, residual, conv.weight, conv.bias, [1, 1], [0, 0], [1, 1], 1, act,
                                      channels_last=True)
        y = fused_conv.conv2d_add_act(x, residual, conv.weight, conv.bias, [1, 1], [0, 0], [1, 1], 1, act,
                                      channels_last=True)  # the planned call
        expected = conv(x) + residual
    assert _route(conv.weight).startswith("GEMM kernel, ")
    torch.testing.assert_close(y, F.relu(expected) if act == "relu" else expected, atol=1e-5, rtol=1e-5)


def test_the_switch_keeps_onednn(gemm_kernel, monkeypatch):
    monkeypatch.setattr(fused_conv, "GEMM_KERNEL", False)
    conv = nn.Conv2d(24, 40, 1)
    x = torch.randn(2, 24, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], [0, 0], [1, 1], 1, "relu6", channels_last=True)
    assert _route(conv.weight) == "GEMM, 128 rows"
    torch.testing.assert_close(y, F.relu6(conv(x)), atol=1e-5, rtol=1e-5)


def test_a_weight_changed_in_place_is_read_again(gemm_kernel):
    conv = nn.Conv2d(64, 32, 1)
    x = torch.randn(1, 64, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], [0, 0], [1, 1], 1, "none", channels_last=True)
        conv.weight.mul_(-2.0)
        y = fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], [0, 0], [1, 1], 1, "none", channels_last=True)
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)
    assert isinstance(fused_conv._PLANS[id(conv.weight)].packed, GemmPanels)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"])
def test_community_models_run_their_gemms_on_the_kernel(gemm_kernel, name, monkeypatch):
    """torchvision's ResNet-50, MobileNetV2 / V3-small and EfficientNet-B0 as their authors write them
    (tests/community_models), through tg.optimize: every 1x1 convolution summing over 24+ channels runs its
    GEMM on the kernel (ReLU, ReLU6, hardswish and the residual adds inside it, SiLU after it), the shorter
    ones on oneDNN, outputs as eager's. (The blocks' expansion + depthwise calls run as their two convolutions
    here, the one-pass kernel switched off: tests/test_expand_depthwise_conv.py has it.)"""
    from community_models import ARCHITECTURES
    from test_optimize_community import _record
    from torchgraph.fused import conv_expand

    monkeypatch.setattr(conv_expand, "EXPAND_DEPTHWISE_KERNEL", False)

    arch = ARCHITECTURES[name]
    module = arch.make_model().eval()
    fast = tg.optimize(_record(arch, module))
    (x,) = arch.make_inputs()
    with torch.no_grad():
        expected = module(x)
        y = fast(x)
    torch.testing.assert_close(y, expected, atol=5e-4, rtol=1e-4)  # ResNet-50: 2.4e-4 on either GEMM (float32 sums)
    routes = [(p.shape[1], _route(p)) for p in fast.parameters()
              if p.dim() == 4 and p.shape[-1] == 1 and p.shape[1] > 1]
    assert routes and all(route.startswith("GEMM kernel, ") == (depth >= fused_conv.GEMM_KERNEL_MIN_DEPTH)
                          for depth, route in routes), routes


@pytest.mark.parametrize("in_channels, on_kernel", [(16, False), (23, False), (24, True), (32, True), (96, True)])
def test_short_sums_stay_on_onednn(gemm_kernel, in_channels, on_kernel):
    """1x1 convolutions summing over fewer than GEMM_KERNEL_MIN_DEPTH (24) channels run their GEMM on oneDNN,
    where the kernel was level to 1.08x slower (MobileNetV2's first expansion, 16 -> 96: NOTE: [GEMM kernel]);
    24 -> 144 and 32 -> 192 run on the kernel."""
    conv = nn.Conv2d(in_channels, 96, 1)
    x = torch.randn(1, in_channels, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], [0, 0], [1, 1], 1, "relu6", channels_last=True)
        torch.testing.assert_close(y, F.relu6(conv(x)), atol=1e-5, rtol=1e-5)
    assert _route(conv.weight).startswith("GEMM kernel, ") is on_kernel, _route(conv.weight)


# ------------------------------------------------------------------------------- the fused linears


def _kernel_calls(monkeypatch) -> list:
    calls = []
    real = torch.ops.torchgraph.gemm_act_inference.default

    def counting(x, *args):
        calls.append(tuple(x.shape))
        return real(x, *args)

    monkeypatch.setattr(torch.ops.torchgraph, "gemm_act_inference", types.SimpleNamespace(default=counting))
    return calls


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "tanh"])  # tanh: after the kernel
def test_linears_run_on_the_kernel_by_depth_and_output_size(gemm_kernel, monkeypatch, act):
    """A ViT's token rows (3-D input), a classifier head (2-D), the GPT block's 1,024 rows summing over 256 and
    BERT-base's over 768 run on the kernel; sums over fewer than 24 inputs, outputs of more than 4M elements and
    a small layer (below ONEDNN_LINEAR_MIN_MACS) do not (NOTE: [Linears on the GEMM kernel]), unless its weight is
    large: MobileNetV2's classifier at batch 1, a 512 -> 512 decoder step (NOTE: [Few rows, large weights])."""
    calls = _kernel_calls(monkeypatch)
    cases = [((2, 97, 384), 1152, True), ((8, 1280), 1000, True), ((8, 128, 768), 96, True), ((8, 128, 256), 96, True),
             ((1025, 768), 64, True), ((4096, 16), 64, False), ((2049, 32), 2048, False), ((4, 32), 10, False),
             ((1, 1280), 1000, True), ((2, 512), 512, True), ((8, 64), 256, False), ((1, 511), 512, False)]
    for shape, out_features, on_kernel in cases:
        layer = nn.Linear(shape[-1], out_features)
        x = torch.randn(shape)
        del calls[:]
        with torch.no_grad():
            y = fused.linear_act(x, layer.weight, layer.bias, act)
            expected = fused._common._ACTIVATION_FNS[act](layer(x))
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
        assert y.shape == expected.shape
        assert calls == ([(x.numel() // shape[-1], shape[-1])] if on_kernel else []), (shape, calls)


def test_linear_kernel_needs_no_gradient(gemm_kernel, monkeypatch):
    calls = _kernel_calls(monkeypatch)
    layer = nn.Linear(384, 384)
    x = torch.randn(197, 384, requires_grad=True)
    y = fused.linear_act(x, layer.weight, layer.bias, "relu")
    y.sum().backward()
    assert calls == [] and x.grad is not None
    torch.testing.assert_close(y, F.relu(layer(x)), atol=1e-5, rtol=1e-4)


def test_vit_through_optimize_runs_its_linears_on_the_kernel(gemm_kernel, monkeypatch):
    """timm's ViT as its authors write it (tests/community_models), at batch 1: its token-row linears and
    head on the kernel, the output as eager's (the test-sized model's linears are below the small-layer
    cut, which is moved out of the way)."""
    from community_models import ARCHITECTURES
    from test_optimize_community import _record

    monkeypatch.setattr(fused.linear, "ONEDNN_LINEAR_MIN_MACS", 0)
    arch = ARCHITECTURES["vit"]
    module = arch.make_model().eval()
    fast = tg.optimize(_record(arch, module))
    x = arch.make_inputs()[0][:1]
    calls = _kernel_calls(monkeypatch)
    with torch.no_grad():
        expected = module(x)
        y = fast(x)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    linears = sum(isinstance(m, nn.Linear) for m in module.modules())
    assert len(calls) >= linears - 1, (len(calls), linears)  # the qkv, proj, fc1 and fc2 of each block, the head


def test_nanogpt_block_through_optimize_runs_its_linears_on_the_kernel(gemm_kernel, monkeypatch):
    """nanoGPT's Block as Karpathy writes it (tests/community_models) at GPT-2 small's width (768, 12 heads),
    8 sequences of 64 tokens: 512 rows summing over 768 or 3,072 inputs, so c_attn, the attention's c_proj,
    c_fc (its GELU in the kernel's epilogue) and the MLP's c_proj all run on the kernel, with eager's values."""
    from community_models import GPTConfig
    from community_models.nanogpt import Block

    torch.manual_seed(0)
    block = Block(GPTConfig(block_size=64, n_embd=768, n_head=12)).eval()
    x = tg.Input(shape=(64, 768))
    fast = tg.optimize(tg.Model(x, block(x)))
    data = torch.randn(8, 64, 768)
    calls = _kernel_calls(monkeypatch)
    with torch.no_grad():
        expected = block(data)
        y = fast(data)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    assert sorted(k for _, k in calls) == [768, 768, 768, 3072], calls
