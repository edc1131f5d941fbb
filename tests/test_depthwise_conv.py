"""``ops.depthwise_conv2d_inference`` and the fused convolutions that run MobileNet's depthwise layers on it."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
import torchgraph._extension as extension
import torchgraph.ops as ops
from torchgraph.fused import conv as fused_conv
from torchgraph.ops._common import ACTIVATION_FNS
from torchgraph.ops.depthwise_conv2d_inference import DEPTHWISE_ACTIVATIONS, taps_last

needs_c_ops = pytest.mark.skipif(not extension.HAS_C_OPS, reason="torchgraph._C is not built")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _exact(x, weight, bias, stride, padding, act):
    """The convolution in float64: what both float32 and bfloat16 results are measured against."""
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, 1,
                 x.shape[1])
    return ACTIVATION_FNS[act](y)


@needs_c_ops
@pytest.mark.parametrize("size", [3, 5, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 7, 16, 17, 32, 33, 48, 144])
def test_kernel_matches_the_convolution(channels, dtype, size):
    """Every channel-block shape (full and partial vectors), 3x3, 5x5 and 7x7 filters, border and interior
    pixels, rows of 1 to 17 output pixels (groups of 8, 4 and 2, a last group shifted back), strides,
    paddings, activations, with and without bias, in either layout and weight form: float32 to its
    rounding, bfloat16 to one rounding of the float32 sum."""
    # the layout, bias and weight form vary from case to case (all eight combinations in turn)
    forms = itertools.cycle(itertools.product([True, False], [True, False], [True, False]))
    for (h, w), stride, padding, act in itertools.product(
            [(1, 1), (2, 5), (7, 7), (9, 12), (3, 19)], [1, 2], [0, 1, 2], list(DEPTHWISE_ACTIVATIONS)):
        if h + 2 * padding < size or w + 2 * padding < size:
            continue
        channels_last, with_bias, taps = next(forms)
        x = (2 * torch.randn(2, channels, h, w)).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(channels, 1, size, size).to(dtype)
        bias = torch.randn(channels).to(dtype) if with_bias else None
        with torch.no_grad():
            y = ops.depthwise_conv2d_inference(x, taps_last(weight) if taps else weight, bias, stride, padding, act)
        expected = _exact(x, weight, bias, stride, padding, act)
        assert y.shape == expected.shape and y.dtype == dtype
        assert y.is_contiguous(memory_format=torch.channels_last)
        tolerance = 2e-6 * size * size / 9 if dtype == torch.float32 else 2.0 ** -8  # float32: K*K roundings
        error = ((y.double() - expected).abs() / (1 + expected.abs())).max().item()
        assert error <= tolerance, (h, w, stride, padding, act, channels_last, with_bias, taps, error)


@needs_c_ops
def test_the_reference_is_the_convolution():
    x, weight, bias = torch.randn(2, 24, 9, 9), torch.randn(24, 1, 3, 3), torch.randn(24)
    y = ops.reference_depthwise_conv2d_inference(x, weight, bias, [2, 2], [1, 1], "relu6")
    torch.testing.assert_close(y, F.relu6(F.conv2d(x, weight, bias, 2, 1, groups=24)))
    assert y.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(ops.depthwise_conv2d_inference(x, weight, bias, 2, 1, "relu6"), y,
                                   atol=1e-5, rtol=1e-5)


@needs_c_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = torch.randn(2, 40, 6, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(40, 1, 3, 3, dtype=dtype), torch.randn(40, dtype=dtype)
    torch.library.opcheck(torch.ops.torchgraph.depthwise_conv2d_inference.default,
                          (x, weight, bias, [2, 1], [1, 0], "hardswish"))
    torch.library.opcheck(torch.ops.torchgraph.depthwise_conv2d_inference.default,
                          (x, taps_last(weight), None, [1, 1], [1, 1]))


@needs_c_ops
def test_backward_raises_with_the_fix():
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward.*inference=False"):
        ops.depthwise_conv2d_inference(x, torch.randn(8, 1, 3, 3), None).sum().backward()


@needs_c_ops
@pytest.mark.parametrize("args, match", [
    ((torch.randn(1, 8, 4, 4).double(), torch.randn(8, 1, 3, 3).double(), None, [1, 1], [1, 1], "none"),
     "x must be float32 or bfloat16"),
    ((torch.randn(8, 4, 4), torch.randn(8, 1, 3, 3), None, [1, 1], [1, 1], "none"), "x must be 4-D"),
    ((torch.randn(1, 8, 4, 4), torch.randn(8, 1, 9, 9), None, [1, 1], [4, 4], "none"),
     r"weight must have shape \[8, 1, K, K\] with K 3, 5 or 7 \(one 3x3, 5x5 or 7x7 filter per channel of x\)"),
    ((torch.randn(1, 8, 4, 4), torch.randn(8, 1, 3, 5), None, [1, 1], [1, 1], "none"),
     r"weight must have shape \[8, 1, K, K\] with K 3, 5 or 7"),
    ((torch.randn(1, 8, 4, 4), torch.randn(8, 1, 3, 3).bfloat16(), None, [1, 1], [1, 1], "none"),
     "weight dtype must equal x dtype"),
    ((torch.randn(1, 8, 4, 4), torch.randn(8, 1, 3, 3), torch.randn(4), [1, 1], [1, 1], "none"),
     r"bias must have shape \[8\]"),
    ((torch.randn(1, 8, 4, 4), torch.randn(8, 1, 3, 3), None, [0, 1], [1, 1], "none"),
     "stride must be two positive ints"),
    ((torch.randn(1, 8, 1, 4), torch.randn(8, 1, 3, 3), None, [1, 1], [0, 0], "none"),
     "the padded input 1x4 is smaller than the 3x3 filter"),
    ((torch.randn(1, 8, 3, 6), torch.randn(8, 1, 5, 5), None, [1, 1], [0, 0], "none"),
     "the padded input 3x6 is smaller than the 5x5 filter"),
    ((torch.randn(1, 8, 4, 4), torch.randn(8, 1, 3, 3), None, [1, 1], [1, 1], "gelu"),
     "act must be one of none, relu, relu6, silu, hardswish, got 'gelu'"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_inputs_raise_the_same_message_on_the_kernel_and_the_fake(args, match, device):
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.torchgraph.depthwise_conv2d_inference.default(*args)


# ------------------------------------------------------------------------------- the fused convolutions


def _planned(weight):
    plan = fused_conv._PLANS.get(id(weight))
    return plan is not None and plan.depthwise is not None


@needs_c_ops
@pytest.mark.parametrize("dtype, size, kernel, uses_kernel", [
    (torch.float32, 8, 3, True), (torch.float32, 40, 3, True), (torch.float32, 8, 5, True),
    (torch.float32, 40, 5, True),
    (torch.bfloat16, 8, 3, True), (torch.bfloat16, 40, 3, False),  # 2 x 40 x 40 pixels: above the bfloat16 limit
    (torch.bfloat16, 8, 5, False),  # bfloat16 5x5: oneDNN's
    (torch.float32, 40, 7, True),  # 7x7: 32 channels fill whole vectors
    (torch.bfloat16, 4, 7, True), (torch.bfloat16, 16, 7, False),  # 2 x 16 x 16 pixels: above the 7x7 bfloat16 limit
])
def test_conv2d_act_plans_depthwise_layers_on_the_kernel(dtype, size, kernel, uses_kernel):
    conv = nn.Conv2d(32, 32, kernel, padding=kernel // 2, groups=32).to(dtype)
    x = torch.randn(2, 32, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
    padding = [kernel // 2] * 2
    with torch.no_grad():
        expected = F.relu6(conv(x))
        y = fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], padding, [1, 1], 32, "relu6",
                                  channels_last=True)
        again = fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], padding, [1, 1], 32, "relu6",
                                      channels_last=True)
    # bfloat16 runs oneDNN (and so the planned kernel) only on a CPU with bf16 instructions; elsewhere F.conv2d.
    assert _planned(conv.weight) is (uses_kernel and dtype in fused_conv._ONEDNN_DTYPES)
    assert torch.equal(y, again) and y.is_contiguous(memory_format=torch.channels_last)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), expected.float(), atol=tolerance, rtol=tolerance)


@needs_c_ops
def test_the_switch_and_other_filters_keep_onednn(monkeypatch):
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    layers = {"9x9": nn.Conv2d(16, 16, 9, padding=4, groups=16), "dilated": nn.Conv2d(16, 16, 3, padding=2,
                                                                                     dilation=2, groups=16),
              "grouped": nn.Conv2d(16, 16, 3, padding=1, groups=4), "switched off": nn.Conv2d(16, 16, 3, padding=1,
                                                                                             groups=16)}
    for name, conv in layers.items():
        if name == "switched off":
            monkeypatch.setattr(fused_conv, "DEPTHWISE_KERNEL", False)
        with torch.no_grad():
            y = fused_conv.conv2d_act(x, conv.weight, conv.bias, list(conv.stride), list(conv.padding),
                                      list(conv.dilation), conv.groups, "relu", channels_last=True)
            torch.testing.assert_close(y, F.relu(conv(x)), atol=1e-5, rtol=1e-5)
        assert not _planned(conv.weight), name


@needs_c_ops
@pytest.mark.parametrize("channels, side, uses_kernel", [(40, 16, True), (40, 23, False), (48, 23, True)])
def test_float32_7x7_layers_take_the_kernel_where_it_is_faster(channels, side, uses_kernel):
    """ConvNeXt's 7x7 layers in float32: on the kernel where the channels fill whole vectors or the map has at
    most 1,024 output pixels (NOTE: [Depthwise convolutions]); 2 x 23 x 23 pixels of 40 channels keep oneDNN."""
    conv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
    x = torch.randn(2, channels, side, side).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], [3, 3], [1, 1], channels, "none",
                                  channels_last=True)
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)
    assert _planned(conv.weight) is uses_kernel


@needs_c_ops
def test_a_weight_changed_in_place_is_read_again():
    conv = nn.Conv2d(24, 24, 3, padding=1, groups=24)
    x = torch.randn(1, 24, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 24, "none", channels_last=True)
        conv.weight.mul_(-2.0)
        y = fused_conv.conv2d_act(x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 24, "none", channels_last=True)
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)


@pytest.fixture
def two_kernels(monkeypatch):
    """An inverted residual block's expansion and depthwise convolution as the two planned convolutions, the
    one-pass kernel switched off (tests/test_expand_depthwise_conv.py has it)."""
    from torchgraph.fused import conv_expand

    monkeypatch.setattr(conv_expand, "EXPAND_DEPTHWISE_KERNEL", False)


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block (mobilenetv2.py): expand, depthwise, project, residual."""

    def __init__(self, inp, oup, stride, expand_ratio, activation=nn.ReLU6, kernel_size=3):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), activation(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size, stride, kernel_size // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), activation(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


def _randomized(net):
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return net.eval()


@needs_c_ops
@pytest.mark.parametrize("activation", [nn.ReLU6, nn.Hardswish, nn.SiLU])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_optimize_runs_mobilenet_blocks_on_the_kernel_as_eager(activation, dtype, two_kernels):
    net = _randomized(nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), InvertedResidual(16, 24, 2, 6, activation),
        InvertedResidual(24, 24, 1, 6, activation), InvertedResidual(24, 40, 2, 4, activation)))
    x = torch.randn(2, 3, 32, 32)
    inputs = tg.Input(shape=(3, 32, 32))
    model = tg.Model(inputs, net(inputs))
    fast = tg.optimize(model, dtype=dtype) if dtype else tg.optimize(model)
    with torch.no_grad():
        expected = net(x)
        y = fast(x)
    assert y.dtype == torch.float32
    tolerance = 1e-5 if dtype is None else 0.1
    torch.testing.assert_close(y, expected, atol=tolerance, rtol=tolerance)
    tensors = {id(t) for t in itertools.chain(fast.parameters(), fast.buffers())}
    planned = [plan for ident, plan in fused_conv._PLANS.items() if ident in tensors and plan.depthwise is not None]
    assert len(planned) == 3  # one depthwise layer a block


@needs_c_ops
@pytest.mark.parametrize("name, sizes", [("mobilenet_v2", {(3, 3)}), ("mobilenet_v3_small", {(3, 3), (5, 5)}),
                                         ("convnext", {(7, 7)})])
def test_community_models_run_their_depthwise_layers_on_the_kernel(name, sizes, two_kernels):
    """torchvision's MobileNetV2 and V3-small and timm's ConvNeXt as their authors write them
    (tests/community_models): their 3x3, 5x5 (V3) and 7x7 (ConvNeXt) depthwise layers run on the kernel in
    float32, outputs as eager's."""
    from community_models import ARCHITECTURES
    from test_optimize_community import _record

    arch = ARCHITECTURES[name]
    module = arch.make_model().eval()
    fast = tg.optimize(_record(arch, module))
    (x,) = arch.make_inputs()
    with torch.no_grad():
        expected = module(x)
        y = fast(x)
    torch.testing.assert_close(y, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), rtol=1e-4)
    tensors = {id(t) for t in itertools.chain(fast.parameters(), fast.buffers())}
    plans = [plan for ident, plan in fused_conv._PLANS.items() if ident in tensors]
    depthwise = [p for p in plans if p.onednn_args[3] > 1]
    assert {p.kernel_size for p in depthwise} == sizes
    assert all(p.depthwise is not None for p in depthwise)
