"""A convolution that reads and is read in the default layout only (between instance norms: fast neural style,
CycleGAN) runs as written, ``F.conv2d`` on NCHW, in float32 (passes/layout.py, NOTE: [Lone convolutions]);
convolutions in a stack, 1x1 ones and those read by channels_last readers keep channels_last."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import fused, passes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class StyleBlock(nn.Module):
    """fast neural style's ConvLayer + InstanceNorm2d(affine=True) + ReLU, twice, with reflection padding."""

    def __init__(self, kernel_size=3):
        super().__init__()
        self.pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv1, self.in1 = nn.Conv2d(3, 8, kernel_size), nn.InstanceNorm2d(8, affine=True)
        self.conv2, self.in2 = nn.Conv2d(8, 8, kernel_size), nn.InstanceNorm2d(8, affine=True)

    def forward(self, x):
        y = F.relu(self.in1(self.conv1(self.pad(x))))
        return F.relu(self.in2(self.conv2(self.pad(y))))


def _optimized(net, shape, **kwargs):
    x = tg.Input(shape=shape)
    return tg.optimize(tg.Model(x, net.eval()(x)), **kwargs)


def _kinds(model) -> tuple[int, int, int]:
    """(F.conv2d calls, channels_last conv2d_act calls, copies)."""
    nodes = list(model.graph.nodes)
    return (sum(n.target is F.conv2d for n in nodes),
            sum(n.target is fused.conv2d_act and n.kwargs.get("channels_last", False) for n in nodes),
            sum(n.target == "contiguous" for n in nodes))


def test_convolutions_between_instance_norms_run_on_nchw():
    net = StyleBlock()
    fast = _optimized(net, (3, 12, 12))
    assert _kinds(fast) == (2, 0, 0)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)


def test_bfloat16_1x1_and_small_maps_keep_channels_last():
    """In bfloat16, for 1x1 filters and for maps no wider than the GEMM path's (4), the convolutions stay
    channels_last conv2d_act calls, copied out before the norm."""
    in_bfloat16 = _kinds(_optimized(StyleBlock(), (3, 12, 12), dtype=torch.bfloat16))[:2]
    assert in_bfloat16 == ((0, 2) if passes.bfloat16_supported()[0] else (2, 0))  # else computed in float32
    assert _kinds(_optimized(StyleBlock(kernel_size=1), (3, 12, 12)))[:2] == (0, 2)
    assert _kinds(_optimized(StyleBlock(), (3, 4, 4)))[:2] == (0, 2)


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8)

    def forward(self, x):
        return self.norm(self.b(F.relu(self.a(x))))


@pytest.mark.parametrize("net, expected", [(PatchEmbed(), (0, 1, 0)), (Stack(), (0, 2, 1))],
                         ids=["read as tokens", "a stack of two"])
def test_convolutions_that_gain_from_channels_last_keep_it(net, expected):
    fast = _optimized(net, (3, 8, 8))
    assert _kinds(fast) == expected
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)


class OutputLayer(nn.Module):
    """CycleGAN's ResnetGenerator ends with ReflectionPad2d(3), a 7x7 convolution to 3 channels and Tanh."""

    def __init__(self, channels=32):
        super().__init__()
        self.pad, self.conv = nn.ReflectionPad2d(3), nn.Conv2d(channels, 3, 7)

    def forward(self, x):
        return torch.tanh(self.conv(self.pad(x)))


class ResidualBlock(nn.Module):
    """CycleGAN's ResnetBlock: (pad, 3x3, InstanceNorm, ReLU) twice, then the skip."""

    def __init__(self, channels):
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.conv1, self.in1 = nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels)
        self.conv2, self.in2 = nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels)

    def forward(self, x):
        return x + self.in2(self.conv2(self.pad(F.relu(self.in1(self.conv1(self.pad(x)))))))


def test_few_output_channels_keep_channels_last():
    """A lone convolution to fewer than LONE_CONV_FEW_OUTPUTS channels from at least as many inputs stays a
    channels_last conv2d_act (NOTE: [Lone convolutions that pay in channels_last]); from 3 inputs it does not."""
    net = OutputLayer()
    fast = _optimized(net, (32, 16, 16))
    assert _kinds(fast)[:2] == (0, 1)
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)
    assert _kinds(_optimized(OutputLayer(channels=3), (3, 16, 16)))[:2] == (1, 0)


@pytest.mark.parametrize("winograd", [True, False])
def test_many_channels_on_small_maps_keep_channels_last_where_winograd_runs(monkeypatch, winograd):
    """3x3 convolutions of 128 channels on a 16x16 map stay channels_last where the Winograd kernel runs; on a
    64x64 map, with 64 channels, or without the kernel they run as written."""
    monkeypatch.setattr(fused.conv, "WINOGRAD_KERNEL", winograd)
    net = ResidualBlock(128)
    fast = _optimized(net, (128, 16, 16))
    assert _kinds(fast)[:2] == ((0, 2) if winograd else (2, 0))
    x = torch.randn(2, 128, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-4, rtol=1e-4)
    assert _kinds(_optimized(ResidualBlock(128), (128, 64, 64)))[:2] == (2, 0)
    assert _kinds(_optimized(ResidualBlock(64), (64, 16, 16)))[:2] == (2, 0)
