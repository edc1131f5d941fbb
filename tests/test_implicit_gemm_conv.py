"""``ops.implicit_gemm_conv2d_inference`` (a stem convolution as a GEMM read in place) and the fused convolutions
that run on it (NOTE: [Stem convolutions] in torchgraph/fused/conv.py)."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph._extension as extension
import torchgraph.ops as ops
from torchgraph.fused import conv as fused_conv
from torchgraph.ops._common import ACTIVATION_FNS
from torchgraph.ops.gemm_act_inference import GEMM_ACTIVATIONS
from torchgraph.ops.implicit_gemm_conv2d_inference import implicit_gemm_filters

needs_c_ops = pytest.mark.skipif(not extension.HAS_C_OPS, reason="torchgraph._C is not built")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _error(y, expected):
    """The largest error relative to the largest output (the scale a float32 convolution rounds at)."""
    return ((y.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# (n, in channels, out channels, height, width, kernel, stride, padding): stems as their authors write them
# (torchvision's ResNet and MobileNetV2, ConvNeXt's patchify, a ViT's patches, an MNIST net), odd sizes where
# the last window ends before the map does, kernels wider than tall, and more output channels than a panel holds.
SHAPES = [
    (1, 3, 64, 32, 32, (7, 7), (2, 2), (3, 3)),
    (2, 3, 32, 17, 19, (3, 3), (2, 2), (1, 1)),
    (3, 3, 40, 16, 16, (4, 4), (4, 4), (0, 0)),
    (1, 3, 24, 32, 32, (8, 8), (8, 8), (0, 0)),
    (2, 1, 32, 12, 12, (3, 3), (1, 1), (1, 1)),
    (1, 4, 5, 9, 7, (1, 3), (1, 2), (0, 1)),
    (2, 2, 70, 10, 11, (5, 5), (3, 1), (2, 0)),
    (1, 3, 16, 3, 3, (3, 3), (1, 1), (0, 0)),
]


@pytest.mark.parametrize("wrapper", [
    pytest.param(ops.implicit_gemm_conv2d_inference, marks=needs_c_ops), ops.reference_implicit_gemm_conv2d_inference])
def test_kernel_and_reference_match_the_convolution(wrapper):
    """Every shape above with every activation, with and without bias, inputs NCHW, channels_last and strided: as
    close to float64 as F.conv2d is (the same sums in another order)."""
    forms = itertools.cycle(itertools.product([True, False], ["contiguous", "channels_last", "strided"]))
    for shape, act in itertools.product(SHAPES, GEMM_ACTIVATIONS):
        n, channels, out_channels, height, width, kernel, stride, padding = shape
        with_bias, layout = next(forms)
        x = torch.randn(n, channels, height, width)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            x = torch.randn(n, channels, height, 2 * width)[..., ::2]
        weight = torch.randn(out_channels, channels, *kernel) * (2 / (channels * kernel[0] * kernel[1])) ** 0.5
        bias = torch.randn(out_channels) if with_bias else None
        y = wrapper(x, implicit_gemm_filters(weight), bias, out_channels, kernel, stride, padding, act)
        expected = ACTIVATION_FNS[act](F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(),
                                                stride, padding))
        assert y.shape == expected.shape and y.dtype == torch.float32, (shape, act)
        assert y.is_contiguous(memory_format=torch.channels_last)
        direct = ACTIVATION_FNS[act](F.conv2d(x, weight, bias, stride, padding))
        assert _error(y, expected) <= max(4 * _error(direct, expected), 1e-6), (shape, act, layout)


def test_filters_are_the_weight_in_the_gemm_column_order():
    """Columns ``(ky, kx, c)``: an NHWC im2col's, so one panel column holds output channel k's filter taps."""
    weight = torch.randn(20, 3, 7, 7)
    panels = implicit_gemm_filters(weight)
    assert panels.shape == (2, 147, 16) and panels.is_contiguous()
    assert torch.equal(panels[1, :, 2], weight[18].permute(1, 2, 0).reshape(-1))
    assert not panels[1, :, 4:].any()  # the panel's channels beyond 20
    with pytest.raises(RuntimeError, match=r"implicit_gemm_filters: weight must be \(out_channels, in_channels, "
                                           r"kh, kw\), got shape \[20, 3\]"):
        implicit_gemm_filters(torch.randn(20, 3))


@needs_c_ops
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_is_deterministic_across_threads(threads, same_at_any_thread_count):
    x, weight, bias = torch.randn(2, 3, 23, 21), torch.randn(40, 3, 7, 7), torch.randn(40)
    args = (implicit_gemm_filters(weight), bias, 40, [7, 7], [2, 2], [3, 3], "relu")
    same_at_any_thread_count(lambda: ops.implicit_gemm_conv2d_inference(x, *args), threads)


@needs_c_ops
def test_opcheck():
    x, weight = torch.randn(2, 3, 13, 12), torch.randn(20, 3, 3, 3)
    op = torch.ops.torchgraph.implicit_gemm_conv2d_inference.default
    torch.library.opcheck(op, (x, implicit_gemm_filters(weight), torch.randn(20), 20, [3, 3], [2, 2], [1, 1],
                               "relu6"))
    torch.library.opcheck(op, (x.contiguous(memory_format=torch.channels_last), implicit_gemm_filters(weight), None,
                               20, [3, 3], [1, 1], [0, 0]))


@needs_c_ops
def test_backward_raises_with_the_fix():
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    panels = implicit_gemm_filters(torch.randn(8, 3, 3, 3))
    with pytest.raises(RuntimeError, match="implicit_gemm_conv2d_inference has no backward.*inference=False"):
        ops.implicit_gemm_conv2d_inference(x, panels, None, 8, 3, 1, 1).sum().backward()


def _panels(out_channels=4, channels=3, size=3):
    return implicit_gemm_filters(torch.randn(out_channels, channels, size, size))


@needs_c_ops
@pytest.mark.parametrize("args, match", [
    ((torch.randn(1, 3, 6, 6).double(), _panels(), None, 4, [3, 3], [1, 1], [1, 1], "none"), "x must be float32"),
    ((torch.randn(3, 6, 6), _panels(), None, 4, [3, 3], [1, 1], [1, 1], "none"), r"x must be 4-D \(N, C, H, W\)"),
    ((torch.randn(1, 3, 6, 6), _panels(channels=2), None, 4, [3, 3], [1, 1], [1, 1], "none"),
     r"panels must have shape \[1, 27, 16\] for 4 output channels and 3 input channels of 3x3 "
     r"\(ops.gemm_panels\(weight.permute\(0, 2, 3, 1\).flatten\(1\)\)\), got \[1, 18, 16\]"),
    ((torch.randn(1, 3, 6, 6), _panels(), None, 20, [3, 3], [1, 1], [1, 1], "none"),
     r"panels must have shape \[2, 27, 16\] for 20 output channels"),
    ((torch.randn(1, 3, 6, 6), _panels(), torch.randn(8), 4, [3, 3], [1, 1], [1, 1], "none"),
     r"bias must have shape \[4\], got \[8\]"),
    ((torch.randn(1, 3, 2, 6), _panels(), None, 4, [3, 3], [1, 1], [0, 0], "none"),
     "the padded input 2x6 is smaller than the 3x3 filter"),
    ((torch.randn(1, 3, 6, 6), _panels(), None, 4, [3, 3], [0, 1], [1, 1], "none"),
     r"stride must be two positive ints, got \[0, 1\]"),
    ((torch.randn(1, 3, 6, 6), _panels(), None, 4, [3, 3], [1, 1], [-1, 1], "none"),
     r"padding must be two non-negative ints, got \[-1, 1\]"),
    ((torch.randn(1, 3, 6, 6), _panels(), None, 4, [3, 3], [1, 1], [1, 1], "tanh"),
     "act must be one of none, relu, relu6, silu, hardswish, gelu, gelu_tanh, got 'tanh'"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_inputs_raise_the_same_message_on_the_kernel_and_the_fake(args, match, device):
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.torchgraph.implicit_gemm_conv2d_inference.default(*args)


# ------------------------------------------------------------------------------- the fused convolutions


@pytest.fixture
def implicit_gemm_kernel(monkeypatch):
    """The route switched on, as on an AVX2 CPU, whatever this CPU is (NOTE: [Stem convolutions])."""
    if not extension.HAS_C_OPS:
        pytest.skip("torchgraph._C is not built")
    if not fused_conv._common._HAS_ONEDNN:
        pytest.skip("needs oneDNN")
    monkeypatch.setattr(fused_conv, "IMPLICIT_GEMM_KERNEL", True)


@pytest.mark.parametrize("case, routed", [
    (dict(channels=3, size=7, stride=2, padding=3, act="relu"), True),    # ResNet's stem
    (dict(channels=3, size=3, stride=2, padding=1, act="relu6"), True),   # MobileNetV2's
    (dict(channels=1, size=3, stride=1, padding=1, act="none"), True),    # a grayscale image
    (dict(channels=4, size=4, stride=4, padding=0, act="gelu"), True),    # RGBA patches
    (dict(channels=5, size=3, stride=1, padding=1, act="relu"), False),   # more than IMPLICIT_GEMM_MAX_CHANNELS
    (dict(channels=3, size=1, stride=1, padding=0, act="relu"), False),   # 1x1: not measured
    (dict(channels=3, size=3, stride=1, padding=1, act="sigmoid"), False),  # not in the kernel's epilogue
])
def test_conv2d_act_routes_convolutions_with_few_input_channels(implicit_gemm_kernel, case, routed):
    conv = nn.Conv2d(case["channels"], 24, case["size"], case["stride"], case["padding"])
    x = torch.randn(2, case["channels"], 20, 20)  # the model's input: NCHW
    args = (conv.weight, conv.bias, [case["stride"]] * 2, [case["padding"]] * 2, [1, 1], 1, case["act"])
    with torch.no_grad():
        y = fused_conv.conv2d_act(x, *args, channels_last=True)
        again = fused_conv.conv2d_act(x, *args, channels_last=True)  # the plan's path
        expected = fused_conv._common._ACTIVATION_FNS[case["act"]](conv(x))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, y, atol=0, rtol=0)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert (fused_conv._planned_route(conv.weight) == "implicit GEMM kernel") is routed, \
        fused_conv._planned_route(conv.weight)


def test_the_route_off_plans_onednn_again(implicit_gemm_kernel, monkeypatch):
    """Each plan's key holds the limits: switching the route off (benchmarks' ablations do) replans the layer."""
    conv = nn.Conv2d(3, 16, 3, 2, 1)
    x = torch.randn(1, 3, 16, 16)
    args = (conv.weight, conv.bias, [2, 2], [1, 1], [1, 1], 1, "relu")
    with torch.no_grad():
        on = fused_conv.conv2d_act(x, *args, channels_last=True)
        assert fused_conv._planned_route(conv.weight) == "implicit GEMM kernel"
        monkeypatch.setattr(fused_conv, "IMPLICIT_GEMM_KERNEL", False)
        off = fused_conv.conv2d_act(x, *args, channels_last=True)
    assert fused_conv._planned_route(conv.weight) == "oneDNN convolution"
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)


def test_a_changed_weight_is_packed_again(implicit_gemm_kernel):
    conv = nn.Conv2d(3, 16, 3, padding=1)
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 1, "none", channels_last=True)
        conv.weight.mul_(-2)
        y = fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 1, "none", channels_last=True)
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)
    assert fused_conv._planned_route(conv.weight) == "implicit GEMM kernel"


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "convnext", "siamese"])
def test_community_stems_through_optimize_run_on_the_kernel(implicit_gemm_kernel, name):
    """torchvision's ResNet-50 and MobileNetV2, timm's ConvNeXt and a grayscale siamese net as their authors
    write them (tests/community_models): the stems run on the kernel, no further from float64 eager than the
    community parity tests allow (test_optimize_community.assert_as_close_as_eager)."""
    from community_models import ARCHITECTURES
    from test_optimize_community import optimized_as_eager

    module, fast = optimized_as_eager(ARCHITECTURES[name])
    stems = [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels <= 4
             and m.kernel_size != (1, 1)]
    routes = [fused_conv._planned_route(t) for t in fast.parameters() if t.dim() == 4]
    assert stems and routes.count("implicit GEMM kernel") == len(stems), routes
