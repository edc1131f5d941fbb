"""``ops.expand_depthwise_conv2d_inference`` (an inverted residual block's expansion and depthwise convolution in one
pass), ``fused.conv2d_expand_depthwise`` and ``passes.fuse_expand_depthwise`` (NOTE: [Inverted residuals in one
pass] in torchgraph/fused/conv_expand.py)."""

import itertools
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
import torchgraph._extension as extension
import torchgraph.ops as ops
from torchgraph import fused
from torchgraph.fused import conv_expand
from torchgraph.ops._common import ACTIVATION_FNS
from torchgraph.ops.depthwise_conv2d_inference import DEPTHWISE_ACTIVATIONS, taps_last
from torchgraph.ops.gemm_act_inference import GEMM_ACTIVATIONS
from test_depthwise_conv import InvertedResidual, _randomized

needs_c_ops = pytest.mark.skipif(not extension.HAS_C_OPS, reason="torchgraph._C is not built")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _exact(x, expand_weight, expand_bias, expand_act, weight, bias, stride, padding, act):
    """The two convolutions in float64."""
    double = [None if t is None else t.double() for t in (x, expand_weight, expand_bias, weight, bias)]
    h = ACTIVATION_FNS[expand_act](F.conv2d(double[0], double[1], double[2]))
    return ACTIVATION_FNS[act](F.conv2d(h, double[3], double[4], stride, padding, 1, weight.shape[0]))


def _error(y, expected):
    return ((y.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# (n, in channels, expanded channels, height, width, filter, stride, padding): MobileNetV2's, EfficientNet's and
# MobileNetV3's blocks at small sizes, odd maps, expanded channels that are not whole panels or vectors, a 7x7
# filter, a map as high as the filter, and maps wide enough that the ring holds one step only (its rows wrap).
SHAPES = [
    (1, 16, 96, 20, 20, 3, 2, 1),
    (2, 24, 144, 9, 11, 3, 1, 1),
    (1, 8, 40, 13, 7, 5, 2, 2),
    (3, 5, 20, 6, 6, 5, 1, 2),
    (1, 4, 9, 7, 8, 7, 1, 3),
    (2, 3, 17, 3, 5, 3, 1, 0),
    (1, 16, 600, 12, 120, 3, 1, 1),
    (1, 16, 600, 13, 120, 5, 2, 2),
]


@pytest.mark.parametrize("wrapper", [
    pytest.param(ops.expand_depthwise_conv2d_inference, marks=needs_c_ops),
    ops.reference_expand_depthwise_conv2d_inference])
def test_kernel_and_reference_match_the_two_convolutions(wrapper):
    """Every shape above with every pair of activations the two take, with and without biases, inputs in either
    layout: as close to float64 as the two convolutions run apart."""
    acts = itertools.cycle(itertools.product(GEMM_ACTIVATIONS, DEPTHWISE_ACTIVATIONS))
    forms = itertools.cycle(itertools.product([True, False], [True, False]))
    for shape in SHAPES:
        n, channels, mid, height, width, size, stride, padding = shape
        for _ in range(3):
            (expand_act, act), (with_bias, channels_last) = next(acts), next(forms)
            x = torch.randn(n, channels, height, width)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            expand_weight = torch.randn(mid, channels, 1, 1) * channels ** -0.5
            weight = torch.randn(mid, 1, size, size) / size
            expand_bias, bias = (torch.randn(mid), torch.randn(mid)) if with_bias else (None, None)
            args = (ops.gemm_panels(expand_weight.flatten(1)), expand_bias, mid, expand_act, weight, bias,
                    [stride] * 2, [padding] * 2, act)
            y = wrapper(x, *args)
            expected = _exact(x, expand_weight, expand_bias, expand_act, weight, bias, stride, padding, act)
            assert y.shape == expected.shape and y.is_contiguous(memory_format=torch.channels_last)
            h = ACTIVATION_FNS[expand_act](F.conv2d(x, expand_weight, expand_bias))
            apart = ACTIVATION_FNS[act](F.conv2d(h, weight, bias, stride, padding, 1, mid))
            assert _error(y, expected) <= max(4 * _error(apart, expected), 1e-6), (shape, expand_act, act)


# (n, in channels, expanded channels, height, width, filter, stride, padding, threads) and how the kernel splits the
# image (NOTE: [Expanded rows in a ring]): by channel blocks (the last one partial), by bands of output rows (a tall
# map; a wide one whose ring wraps), by both (more threads than blocks).
SPLITS = [
    pytest.param((1, 16, 40, 23, 17, 5, 2, 2, 2), id="channels-2"),
    pytest.param((1, 16, 40, 23, 17, 5, 2, 2, 3), id="channels-3"),
    pytest.param((1, 8, 40, 61, 9, 3, 1, 1, 2), id="bands-2"),
    pytest.param((1, 8, 40, 61, 9, 5, 2, 2, 3), id="bands-3"),
    pytest.param((1, 8, 48, 40, 300, 3, 1, 1, 2), id="bands-wrapping"),
    pytest.param((1, 8, 24, 20, 9, 3, 1, 1, 5), id="channels-and-bands"),
]


@needs_c_ops
@pytest.mark.parametrize("split", SPLITS)
def test_splits_give_the_same_values_at_any_thread_count(split, same_at_any_thread_count):
    """An image is split between the threads by channel blocks or bands of output rows (each band recomputing the
    expanded rows it shares with the band before), or both: the values do not depend on the split."""
    n, channels, mid, height, width, size, stride, padding, threads = split
    x = torch.randn(n, channels, height, width)
    args = (ops.gemm_panels(torch.randn(mid, channels)), torch.randn(mid), mid, "relu6",
            torch.randn(mid, 1, size, size), torch.randn(mid), [stride] * 2, [padding] * 2, "relu6")
    same_at_any_thread_count(lambda: ops.expand_depthwise_conv2d_inference(x, *args), threads)


@needs_c_ops
def test_the_kernel_equals_the_two_kernels_it_replaces():
    """The same sums as ops.gemm_act_inference then ops.depthwise_conv2d_inference, in the same order: equal."""
    x = torch.randn(2, 24, 14, 14).contiguous(memory_format=torch.channels_last)
    panels, expand_bias = ops.gemm_panels(torch.randn(144, 24)), torch.randn(144)
    weight, bias = taps_last(torch.randn(144, 1, 3, 3)), torch.randn(144)
    y = ops.expand_depthwise_conv2d_inference(x, panels, expand_bias, 144, "relu6", weight, bias, 1, 1, "relu6")
    h = ops.gemm_act_inference(x.permute(0, 2, 3, 1).reshape(-1, 24), panels, expand_bias, None, 144, "relu6")
    h = h.view(2, 14, 14, 144).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, ops.depthwise_conv2d_inference(h, weight, bias, 1, 1, "relu6"), atol=0, rtol=0)


@needs_c_ops
def test_opcheck():
    x = torch.randn(2, 8, 9, 7)
    op = torch.ops.torchgraph.expand_depthwise_conv2d_inference.default
    panels = ops.gemm_panels(torch.randn(24, 8))
    torch.library.opcheck(op, (x, panels, torch.randn(24), 24, "relu6", torch.randn(24, 1, 3, 3), torch.randn(24),
                               [2, 2], [1, 1], "relu6"))
    torch.library.opcheck(op, (x.contiguous(memory_format=torch.channels_last), panels, None, 24, "gelu",
                               torch.randn(24, 1, 5, 5), None, [1, 1], [2, 2], "hardswish"))


@needs_c_ops
def test_backward_raises_with_the_fix():
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    args = (ops.gemm_panels(torch.randn(16, 8)), None, 16, "relu", torch.randn(16, 1, 3, 3), None, 1, 1)
    with pytest.raises(RuntimeError, match="expand_depthwise_conv2d_inference has no backward.*inference=False"):
        ops.expand_depthwise_conv2d_inference(x, *args).sum().backward()


def _args(channels=8, mid=16, size=3):
    return [torch.randn(1, channels, 6, 6), ops.gemm_panels(torch.randn(mid, channels)), None, mid, "relu6",
            torch.randn(mid, 1, size, size), None, [1, 1], [1, 1], "relu6"]


def _with(index, value, **kwargs):
    args = _args(**kwargs)
    args[index] = value
    return tuple(args)


@needs_c_ops
@pytest.mark.parametrize("args, match", [
    (_with(0, torch.randn(1, 8, 6, 6).double()), "x must be float32"),
    (_with(0, torch.randn(8, 6, 6)), r"x must be 4-D \(N, C, H, W\)"),
    (_with(1, ops.gemm_panels(torch.randn(16, 6))),
     r"panels must have shape \[1, 8, 16\] for 16 expanded channels and 8 input channels "
     r"\(ops.gemm_panels\(expand_weight\)\), got \[1, 6, 16\]"),
    (_with(2, torch.randn(8)), r"expand_bias must have shape \[16\], got \[8\]"),
    (_with(5, torch.randn(16, 1, 4, 4)), r"weight must have shape \[16, 1, K, K\] with K 3, 5 or 7 \(one depthwise "
                                         r"filter per expanded channel\), got \[16, 1, 4, 4\]"),
    (_with(5, torch.randn(8, 1, 3, 3)), r"weight must have shape \[16, 1, K, K\]"),
    (_with(5, torch.randn(16, 1, 3, 3).double()), "weight must be float32"),
    (_with(6, torch.randn(3)), r"bias must have shape \[16\], got \[3\]"),
    (_with(7, [0, 1]), r"stride must be two positive ints, got \[0, 1\]"),
    (_with(8, [-1, 1]), r"padding must be two non-negative ints, got \[-1, 1\]"),
    (_with(0, torch.randn(1, 8, 2, 6), size=5), "the padded input 4x8 is smaller than the 5x5 filter"),
    (_with(4, "tanh"), "act must be one of none, relu, relu6, silu, hardswish, gelu, gelu_tanh, got 'tanh'"),
    (_with(9, "gelu"), "act must be one of none, relu, relu6, silu, hardswish, got 'gelu'"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_inputs_raise_the_same_message_on_the_kernel_and_the_fake(args, match, device):
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.torchgraph.expand_depthwise_conv2d_inference.default(*args)


# ------------------------------------------------------------------------------- the fused call and the pass


def _net(activation=nn.ReLU6):
    """A stem and three torchvision MobileNetV2 blocks, the last with a 5x5 filter (test_depthwise_conv's)."""
    return _randomized(nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6(),
                                     InvertedResidual(16, 24, 2, 6, activation),
                                     InvertedResidual(24, 24, 1, 6, activation),
                                     InvertedResidual(24, 40, 2, 4, activation, kernel_size=5)))


def _fused_calls(model):
    return [n for n in model.graph.nodes if n.op == "call_function" and n.target is fused.conv2d_expand_depthwise]


def _optimized(net, shape=(3, 32, 32), **options):
    inputs = tg.Input(shape=shape)
    return tg.optimize(tg.Model(inputs, net(inputs)), **options)


@needs_c_ops
@pytest.mark.parametrize("activation", [nn.ReLU6, nn.Hardswish, nn.SiLU])
@pytest.mark.parametrize("batch", [1, 4])
def test_optimize_runs_mobilenet_blocks_in_one_call_as_eager(activation, batch, monkeypatch):
    """Every block's expansion + depthwise convolution (3x3 and 5x5, stride 1 and 2) is one call, on the kernel
    (the route switched on as on an AVX2 CPU), the output eager's."""
    monkeypatch.setattr(conv_expand, "EXPAND_DEPTHWISE_KERNEL", True)
    monkeypatch.setattr(conv_expand, "EXPAND_DEPTHWISE_MIN_BAND_ROWS", 1)  # the test-sized maps are small
    net = _net(activation)
    fast = _optimized(net)
    assert len(_fused_calls(fast)) == 3
    x = torch.randn(batch, 3, 32, 32)
    calls = []
    kernel = torch.ops.torchgraph.expand_depthwise_conv2d_inference.default
    monkeypatch.setattr(torch.ops.torchgraph.expand_depthwise_conv2d_inference, "default",
                        lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == 3


@needs_c_ops
def test_the_fused_call_falls_back_to_the_two_convolutions(monkeypatch):
    """The route off, gradients asked for, or bfloat16 inputs: the two fused convolutions it replaced, same values."""
    net = _net()
    fast = _optimized(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        on = fast(x)
        monkeypatch.setattr(conv_expand, "EXPAND_DEPTHWISE_KERNEL", False)
        off = fast(x)
    torch.testing.assert_close(off, on, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(off, net(x), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(conv_expand, "EXPAND_DEPTHWISE_KERNEL", True)
    with torch.no_grad():
        bf16 = fused.conv2d_expand_depthwise(x[:, :1].expand(2, 16, 32, 32).bfloat16(),
                                             torch.randn(48, 16, 1, 1).bfloat16(), None, "relu",
                                             torch.randn(48, 1, 3, 3).bfloat16(), None, [1, 1], [1, 1], "relu")
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (2, 48, 32, 32)


@needs_c_ops
def test_short_bands_keep_two_kernels(monkeypatch):
    """A batch of one on a small map is split by channel blocks, and runs the kernel; where the threads outnumber the
    blocks it is split into bands of output rows too, and bands of few rows, whose recomputed rows cost more than
    the fusion saves (NOTE: [Inverted residuals in one pass]), keep the two kernels."""
    monkeypatch.setattr(conv_expand, "EXPAND_DEPTHWISE_KERNEL", True)
    threads = 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x, w1, w2 = torch.randn(1, 16, 7, 7), torch.randn(96, 16, 1, 1), torch.randn(96, 1, 3, 3)
    assert conv_expand._runs_kernel(x, w1, None, w2, None, [1, 1], [1, 1])  # two parts of the channels
    assert conv_expand._runs_kernel(x.expand(2, 16, 7, 7), w1, None, w2, None, [1, 1], [1, 1])  # an image a thread
    threads = 4
    narrow_1, narrow_2 = torch.randn(16, 16, 1, 1), torch.randn(16, 1, 3, 3)  # one channel block
    assert not conv_expand._runs_kernel(torch.randn(1, 16, 14, 14), narrow_1, None, narrow_2, None, [1, 1], [1, 1])
    assert conv_expand._runs_kernel(torch.randn(1, 16, 28, 28), narrow_1, None, narrow_2, None, [1, 1], [1, 1])
    threads = 16
    # 6 channel blocks x 3 bands: of 5 rows on 14x14, of 10 on 28x28
    assert not conv_expand._runs_kernel(torch.randn(1, 16, 14, 14), w1, None, w2, None, [1, 1], [1, 1])
    assert conv_expand._runs_kernel(torch.randn(1, 16, 28, 28), w1, None, w2, None, [1, 1], [1, 1])


def test_the_pass_fuses_only_an_expansion_read_by_the_depthwise_convolution_alone():
    """An expansion whose value is also read elsewhere, a depthwise convolution after a 3x3 (not 1x1) one, and a
    grouped convolution that is not depthwise stay as written; bfloat16 and NCHW models are not fused."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand, self.depthwise = nn.Conv2d(8, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.full, self.depthwise2 = nn.Conv2d(8, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.grouped_in, self.grouped = nn.Conv2d(8, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=8)

        def forward(self, x):
            h = F.relu(self.expand(x))
            return torch.cat([self.depthwise(h), h], 1) + torch.cat(
                [self.depthwise2(F.relu(self.full(x))), self.grouped(F.relu(self.grouped_in(x)))], 1)

    net = Shared().eval()
    fast = _optimized(net, (8, 12, 12))
    assert _fused_calls(fast) == []
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)
    block = _net()
    assert len(_fused_calls(_optimized(block))) == 3
    assert _fused_calls(_optimized(block, channels_last=False)) == []


@needs_c_ops
def test_an_optimized_model_with_fused_blocks_pickles_and_exports(tmp_path):
    """The fused call is a module-level function: torch.save keeps it, and ONNX export (dynamo) traces its two
    convolutions, checked in onnxruntime at another batch."""
    onnxruntime = pytest.importorskip("onnxruntime")
    net = _net()
    fast = _optimized(net)
    assert _fused_calls(fast)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
        again = pickle.loads(pickle.dumps(fast))
        torch.testing.assert_close(again(x), expected, atol=1e-5, rtol=1e-5)
    path = str(tmp_path / "fused.onnx")
    tg.export_onnx(fast, path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)


@needs_c_ops
@pytest.mark.parametrize("name, blocks", [("mobilenet_v2", 16), ("efficientnet_b0", 15), ("mobilenet_v3_small", 10)])
def test_community_models_run_their_blocks_in_one_call(name, blocks, monkeypatch):
    """torchvision's MobileNetV2 and V3-small and EfficientNet-B0 as their authors write them
    (tests/community_models): every block with an expansion becomes one call (EfficientNet's and V3's
    squeeze-excitation comes after the depthwise convolution), outputs as close to float64 eager as the community
    parity tests allow."""
    from community_models import ARCHITECTURES
    from test_optimize_community import optimized_as_eager

    monkeypatch.setattr(conv_expand, "EXPAND_DEPTHWISE_KERNEL", True)
    monkeypatch.setattr(conv_expand, "EXPAND_DEPTHWISE_MIN_BAND_ROWS", 1)
    _, fast = optimized_as_eager(ARCHITECTURES[name])
    assert len(_fused_calls(fast)) == blocks


@needs_c_ops
def test_the_plan_follows_changed_weights_shapes_and_gradients(monkeypatch):
    """The first kernel call stores its panels and taps (NOTE: [Plans of fused blocks]); weights changed in place, a
    new input shape, another thread count and an input that needs a gradient do not reuse them."""
    monkeypatch.setattr(conv_expand, "EXPAND_DEPTHWISE_KERNEL", True)
    expand, depthwise = nn.Conv2d(16, 48, 1), nn.Conv2d(48, 48, 3, padding=1, groups=48)

    def call(x):
        return fused.conv2d_expand_depthwise(x, expand.weight, expand.bias, "relu6", depthwise.weight, depthwise.bias,
                                             [1, 1], [1, 1], "relu")

    def eager(x):
        return F.relu(depthwise(F.relu6(expand(x))))

    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(call(x), eager(x), atol=1e-5, rtol=1e-5)
        plan = conv_expand._PLANS[id(depthwise.weight)]
        torch.testing.assert_close(call(x), eager(x), atol=1e-5, rtol=1e-5)
        assert conv_expand._PLANS[id(depthwise.weight)] is plan  # held
        expand.weight.mul_(-1.0)
        depthwise.weight.mul_(0.5)
        torch.testing.assert_close(call(x), eager(x), atol=1e-5, rtol=1e-5)
        assert conv_expand._PLANS[id(depthwise.weight)] is not plan
        wider = torch.randn(2, 16, 5, 12).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(call(wider), eager(wider), atol=1e-5, rtol=1e-5)
        assert conv_expand._PLANS[id(depthwise.weight)].shape == wider.shape
    y = call(x.clone().requires_grad_())
    assert y.requires_grad  # the two convolutions, with autograd
    torch.testing.assert_close(y.detach(), eager(x).detach(), atol=1e-5, rtol=1e-5)
