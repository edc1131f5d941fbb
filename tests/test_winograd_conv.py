"""``ops.winograd_conv2d_inference`` (Winograd's F(2x2, 3x3)) and the fused convolutions that run on it."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph._extension as extension
import torchgraph.ops as ops
from torchgraph.fused import conv as fused_conv
from torchgraph.ops._common import ACTIVATION_FNS
from torchgraph.ops.winograd_conv2d_inference import WINOGRAD_ACTIVATIONS, winograd_filters

needs_c_ops = pytest.mark.skipif(not extension.HAS_C_OPS, reason="torchgraph._C is not built")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _exact(x, weight, bias, padding, act, residual=None):
    """The convolution in float64."""
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=padding)
    return ACTIVATION_FNS[act](y if residual is None else y + residual.double())


def _error(y, expected):
    """The largest error relative to the largest output (the scale a float32 convolution rounds at)."""
    return ((y.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("wrapper", [
    pytest.param(ops.winograd_conv2d_inference, marks=needs_c_ops), ops.reference_winograd_conv2d_inference])
def test_kernel_and_reference_match_the_convolution(wrapper):
    """Odd and even map sizes (a last row or column of tiles half outside the output), padding 0-2, channel
    counts around the SIMD width, one and several images, every activation, with and without bias and residual,
    inputs in either layout: as close to float64 as oneDNN's direct convolution is, or closer."""
    forms = itertools.cycle(itertools.product([True, False], [True, False], [False, True]))
    for (n, channels, out_channels, height, width, padding), act in itertools.product(
            [(1, 8, 16, 8, 8, 1), (2, 3, 5, 5, 7, 1), (3, 17, 9, 6, 3, 0), (1, 12, 24, 9, 10, 2), (2, 64, 32, 14, 14, 1)],
            WINOGRAD_ACTIVATIONS):
        with_bias, channels_last, with_residual = next(forms)
        x = torch.randn(n, channels, height, width)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(out_channels, channels, 3, 3) * (2 / (9 * channels)) ** 0.5
        bias = torch.randn(out_channels) if with_bias else None
        out_shape = (n, out_channels, height + 2 * padding - 2, width + 2 * padding - 2)
        residual = torch.randn(out_shape) if with_residual else None
        y = wrapper(x, winograd_filters(weight), bias, out_channels, padding, act, residual)
        expected = _exact(x, weight, bias, padding, act, residual)
        assert y.shape == expected.shape and y.dtype == torch.float32
        assert y.is_contiguous(memory_format=torch.channels_last)
        direct = F.conv2d(x, weight, bias, padding=padding) + (0 if residual is None else residual)
        bound = max(4 * _error(ACTIVATION_FNS[act](direct), expected), 1e-6)
        assert _error(y, expected) <= bound, (n, channels, out_channels, height, width, padding, act)


def test_filters_are_the_transformed_weight():
    weight = torch.randn(5, 3, 3, 3)
    filters = winograd_filters(weight)
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    assert filters.shape == (16, 1, 3, 16) and filters.dtype == torch.float32 and filters.is_contiguous()
    for k, c in [(0, 0), (4, 2), (2, 1)]:
        torch.testing.assert_close(filters[:, 0, c, k].view(4, 4).double(), g @ weight[k, c].double() @ g.T)
    assert not filters[:, :, :, 5:].any()  # the panel's channels beyond K
    assert winograd_filters(torch.randn(20, 3, 3, 3)).shape == (16, 2, 3, 16)
    with pytest.raises(RuntimeError, match=r"winograd_filters: weight must be \(out_channels, in_channels, 3, 3\), "
                                           r"got shape \[5, 3, 5, 5\]"):
        winograd_filters(torch.randn(5, 3, 5, 5))


@needs_c_ops
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_is_deterministic_across_threads(threads, same_at_any_thread_count):
    x, weight, bias = torch.randn(2, 24, 11, 9), torch.randn(40, 24, 3, 3), torch.randn(40)
    same_at_any_thread_count(lambda: ops.winograd_conv2d_inference(x, winograd_filters(weight), bias, 40, 1, "relu"),
                             threads)


@needs_c_ops
def test_opcheck():
    x, weight = torch.randn(2, 12, 7, 6), torch.randn(20, 12, 3, 3)
    op = torch.ops.torchgraph.winograd_conv2d_inference.default
    torch.library.opcheck(op, (x, winograd_filters(weight), torch.randn(20), 20, [1, 1], "relu6"))
    torch.library.opcheck(op, (x, winograd_filters(weight), None, 20, [1, 1], "relu", torch.randn(2, 20, 7, 6)))
    torch.library.opcheck(op, (x.contiguous(memory_format=torch.channels_last), winograd_filters(weight), None, 20,
                               [0, 2]))


@needs_c_ops
def test_backward_raises_with_the_fix():
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward.*inference=False"):
        ops.winograd_conv2d_inference(x, winograd_filters(torch.randn(8, 8, 3, 3)), None, 8).sum().backward()


@needs_c_ops
@pytest.mark.parametrize("args, match", [
    ((torch.randn(1, 8, 6, 6).double(), winograd_filters(torch.randn(4, 8, 3, 3)), None, 4, [1, 1], "none"),
     "x must be float32"),
    ((torch.randn(8, 6, 6), winograd_filters(torch.randn(4, 8, 3, 3)), None, 4, [1, 1], "none"),
     r"x must be 4-D \(N, C, H, W\)"),
    ((torch.randn(1, 8, 6, 6), winograd_filters(torch.randn(4, 6, 3, 3)), None, 4, [1, 1], "none"),
     r"filters must have shape \[16, 1, 8, 16\] for 4 output channels and 8 input channels "
     r"\(ops.winograd_filters\(weight\)\), got \[16, 1, 6, 16\]"),
    ((torch.randn(1, 8, 6, 6), winograd_filters(torch.randn(4, 8, 3, 3)), None, 20, [1, 1], "none"),
     r"filters must have shape \[16, 2, 8, 16\] for 20 output channels"),
    ((torch.randn(1, 8, 6, 6), winograd_filters(torch.randn(4, 8, 3, 3)), torch.randn(8), 4, [1, 1], "none"),
     r"bias must have shape \[4\], got \[8\]"),
    ((torch.randn(1, 8, 2, 6), winograd_filters(torch.randn(4, 8, 3, 3)), None, 4, [0, 0], "none"),
     "the padded input 2x6 is smaller than the 3x3 filter"),
    ((torch.randn(1, 8, 6, 6), winograd_filters(torch.randn(4, 8, 3, 3)), None, 4, [1, 1], "tanh"),
     "act must be one of none, relu, relu6, silu, hardswish, gelu, gelu_tanh, got 'tanh'"),
    ((torch.randn(1, 8, 6, 6), winograd_filters(torch.randn(4, 8, 3, 3)), None, 4, [1, 1], "none",
      torch.randn(1, 4, 5, 6)), r"residual must have the output's shape \[1, 4, 6, 6\], got \[1, 4, 5, 6\]"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_inputs_raise_the_same_message_on_the_kernel_and_the_fake(args, match, device):
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.torchgraph.winograd_conv2d_inference.default(*args)


# ------------------------------------------------------------------------------- the fused convolutions


@pytest.fixture
def winograd_kernel(monkeypatch):
    """The route switched on, as on an AVX2 CPU, whatever this CPU is (NOTE: [Winograd convolutions])."""
    if not extension.HAS_C_OPS:
        pytest.skip("torchgraph._C is not built")
    if not fused_conv._common._HAS_ONEDNN:
        pytest.skip("needs oneDNN")
    monkeypatch.setattr(fused_conv, "WINOGRAD_KERNEL", True)


@pytest.mark.parametrize("case, routed", [
    (dict(n=1, channels=64, side=14, stride=1, padding=1), True),   # 49 tiles
    (dict(n=8, channels=64, side=8, stride=1, padding=1), True),    # 128 tiles
    (dict(n=1, channels=64, side=7, stride=1, padding=1), False),   # 16 tiles: fewer than WINOGRAD_MIN_TILES
    (dict(n=1, channels=64, side=14, stride=2, padding=1), False),  # stride 2
    (dict(n=1, channels=32, side=14, stride=1, padding=1), False),  # fewer than WINOGRAD_MIN_CHANNELS
])
def test_conv2d_act_routes_stride_one_3x3_convolutions_by_tiles(winograd_kernel, case, routed):
    conv = nn.Conv2d(case["channels"], 72, 3, case["stride"], case["padding"])
    x = torch.randn(case["n"], case["channels"], case["side"], case["side"]).contiguous(
        memory_format=torch.channels_last)
    args = (conv.weight, conv.bias, [case["stride"]] * 2, [case["padding"]] * 2, [1, 1], 1, "relu")
    with torch.no_grad():
        y = fused_conv.conv2d_act(x, *args, channels_last=True)
        again = fused_conv.conv2d_act(x, *args, channels_last=True)  # the plan's path
        expected = F.relu(conv(x))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, y, atol=0, rtol=0)
    assert (fused_conv._planned_route(conv.weight) == "Winograd kernel") is routed, fused_conv._planned_route(
        conv.weight)


@pytest.mark.parametrize("act", ["none", "relu"])
def test_conv2d_add_act_adds_the_residual_in_the_kernel(winograd_kernel, act):
    """A ResNet basic block's second convolution, ``relu(bn(conv(h)) + identity)``: the residual and the ReLU
    in the Winograd kernel's epilogue; a residual of another layout is read as it is."""
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    for residual in (torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last), torch.randn(2, 64, 8, 8)):
        with torch.no_grad():
            y = fused_conv.conv2d_add_act(x, residual, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 1, act,
                                          channels_last=True)
            expected = ACTIVATION_FNS[act](conv(x) + residual)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        assert fused_conv._planned_route(conv.weight) == "Winograd kernel"


def test_a_changed_weight_is_transformed_again(winograd_kernel):
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 1, "none", channels_last=True)
        conv.weight.mul_(-2)
        y = fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 1, "none", channels_last=True)
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)
    assert fused_conv._planned_route(conv.weight) == "Winograd kernel"


@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_resnet_through_optimize_runs_its_3x3_convolutions_by_winograd(winograd_kernel, monkeypatch, name):
    """torchvision's ResNets as their authors write them (tests/community_models): the stride-1 3x3 convolutions
    of ResNet-50's bottlenecks and of ResNet-18's basic blocks (the second with the identity added in the
    kernel) run on the kernel, no further from float64 eager than the community parity tests allow
    (test_optimize_community.assert_as_close_as_eager)."""
    from community_models import ARCHITECTURES
    from test_optimize_community import optimized_as_eager

    monkeypatch.setattr(fused_conv, "WINOGRAD_MIN_TILES", 1)  # the test-sized model's maps are small
    monkeypatch.setattr(fused_conv, "WINOGRAD_MIN_CHANNELS", 1)
    module, fast = optimized_as_eager(ARCHITECTURES[name])
    stride_one = [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                  and m.stride == (1, 1)]
    tensors = [*fast.parameters(), *fast.buffers()]
    routes = [fused_conv._planned_route(t) for t in tensors if t.dim() == 4 and t.shape[-1] == 3]
    assert stride_one and routes.count("Winograd kernel") >= len(stride_one), routes


@needs_c_ops
def test_conv_layouts_benchmark_times_the_same_convolution_on_winograd(monkeypatch):
    """benchmarks/bench_conv_layouts.py's Winograd column computes the layer the other columns do, and its
    `picked` column names the route tg.optimize's plan takes."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_conv_layouts as bench

    torch.manual_seed(0)
    with torch.no_grad():
        fns = bench.variants((64, 64, 3, 3), (8, 64, 16, 16), (1, 1), (1, 1))
        expected = fns["packed channels_last"]()
        assert set(fns) >= {"Winograd channels_last", "packed channels_last"}
        got = fns["Winograd channels_last"]()
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert "Winograd channels_last" not in bench.variants((64, 64, 3, 3), (8, 64, 16, 16), (2, 2), (1, 1))
    monkeypatch.setattr(fused_conv, "WINOGRAD_KERNEL", True)
    assert bench._picked((64, 64, 3, 3), (8, 64, 16, 16), (1, 1), (1, 1)) == "Winograd"
    assert bench._picked((64, 64, 3, 3), (8, 64, 16, 16), (2, 2), (1, 1)) != "Winograd"
    assert bench._tiles((64, 64, 3, 3), (8, 64, 16, 16), (1, 1), (1, 1)) == 8 * 8 * 8
