"""Ops that read tg.optimize's channels_last convolution values as they are (passes/layout.py, NOTE: [Layout-blind
ops] and [Shape readers]): transposed convolutions, upsampling, padding, pooling and the rest of an
encoder-decoder's ops, and ``x.size()`` / ``x.shape``. Each gives eager's values; ops that depend on the layout
(``x.stride()``, ``x.view``) and ops that answer a tuple (``return_indices=True``) still read the default layout."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import passes
from community_models import ARCHITECTURES, UNet


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _copies(model) -> list:
    """What the ``.contiguous()`` calls tg.optimize inserted copy (node names), but the model's output (copied to
    give eager's strides)."""
    return [n.args[0].name for n in model.graph.nodes if n.op == "call_method" and n.target == "contiguous"
            and all(u.op != "output" for u in n.users)]


def _optimized(net: nn.Module, shape: tuple) -> tg.Model:
    x = tg.Input(shape=shape)
    return tg.optimize(tg.Model(x, net.eval()(x)))


def _assert_matches_eager(fast, net, data, tol=1e-5):
    with torch.no_grad():
        out, expected = fast(data), net.eval()(data)
    torch.testing.assert_close(out, expected, atol=tol * max(1.0, expected.abs().max().item()), rtol=tol)
    assert out.stride() == expected.stride()


@pytest.mark.parametrize("bilinear", [False, True], ids=["ConvTranspose2d", "Upsample bilinear"])
def test_milesial_unet_copies_only_its_output(bilinear):
    """milesial/Pytorch-UNet: the skips' ``x2.size()[2]``, ``F.pad``, ``torch.cat``, the upsampling, all on
    channels_last; only the logits are copied, to eager's layout."""
    net = UNet(n_channels=3, n_classes=2, bilinear=bilinear, base=8) if bilinear else ARCHITECTURES["unet"].make_model()
    fast = _optimized(net, (3, 32, 32))
    _assert_matches_eager(fast, net, torch.randn(2, 3, 32, 32))
    assert _copies(fast) == []


class Between(nn.Module):
    """conv -> ``op`` -> conv: the op reads and answers channels_last in the optimized model."""

    def __init__(self, op, out_channels=8):
        super().__init__()
        self.a, self.op, self.b = nn.Conv2d(3, 8, 3, padding=1), op, nn.Conv2d(out_channels, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.op(self.a(x)))


class Fn(nn.Module):
    """A function as a submodule-free step (recorded as the function call itself)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


LAYOUT_BLIND = {
    "ConvTranspose2d": (nn.ConvTranspose2d(8, 8, 2, stride=2), 8),
    "ConvTranspose2d groups output_padding": (nn.ConvTranspose2d(8, 6, 3, 2, 1, output_padding=1, groups=2), 6),
    "Upsample nearest": (nn.Upsample(scale_factor=2), 8),
    "Upsample bilinear": (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), 8),
    "F.interpolate size": (Fn(lambda y: F.interpolate(y, size=(11, 5), mode="bilinear", align_corners=True)), 8),
    "F.pad constant": (Fn(lambda y: F.pad(y, [1, 2, 0, 3], value=0.5)), 8),
    "F.pad reflect": (Fn(lambda y: F.pad(y, [1, 1, 2, 2], mode="reflect")), 8),
    "ReflectionPad2d": (nn.ReflectionPad2d(2), 8),
    "ReplicationPad2d": (nn.ReplicationPad2d(1), 8),
    "ZeroPad2d": (nn.ZeroPad2d((0, 1, 0, 1)), 8),
    "F.max_pool2d": (Fn(lambda y: F.max_pool2d(y, 3, 2, 1)), 8),
    "F.avg_pool2d": (Fn(lambda y: F.avg_pool2d(y, 2)), 8),
    "AdaptiveAvgPool2d(3)": (nn.AdaptiveAvgPool2d(3), 8),
    "AdaptiveMaxPool2d(2)": (nn.AdaptiveMaxPool2d(2), 8),
    "PixelShuffle": (nn.PixelShuffle(2), 2),
    "LeakyReLU": (nn.LeakyReLU(0.2), 8),
    "PReLU": (nn.PReLU(8), 8),
    "ELU": (nn.ELU(), 8),
    "Mish": (nn.Mish(), 8),
    "Tanh": (nn.Tanh(), 8),
    "clamp": (Fn(lambda y: y.clamp(-0.1, 0.2)), 8),
    "sub div neg abs": (Fn(lambda y: (-(y - 0.5) / 3).abs()), 8),
}


@pytest.mark.parametrize("name", list(LAYOUT_BLIND))
def test_a_layout_blind_op_reads_the_convolution_directly(name):
    op, channels = LAYOUT_BLIND[name]
    net = Between(op, channels)
    fast = _optimized(net, (3, 9, 10))
    _assert_matches_eager(fast, net, torch.randn(2, 3, 9, 10))
    assert _copies(fast) == []


@pytest.mark.parametrize("name", ["ConvTranspose2d", "F.pad constant", "Upsample nearest"])
def test_a_layout_blind_op_returned_by_the_model_keeps_eagers_strides(name):
    op, _ = LAYOUT_BLIND[name]
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), op)
    fast = _optimized(net, (3, 9, 10))
    _assert_matches_eager(fast, net, torch.randn(2, 3, 9, 10))
    assert sum(n.target == "contiguous" for n in fast.graph.nodes) == 1


@pytest.mark.parametrize("op", [Fn(lambda y: F.pad(y, [1, 1, 1, 1], mode="circular")), nn.GroupNorm(8, 8),
                                nn.InstanceNorm2d(8, affine=True)],
                         ids=["circular padding", "GroupNorm of single channels", "InstanceNorm2d"])
def test_ops_slower_on_channels_last_read_the_default_layout(op):
    """Circular padding and InstanceNorm answer NCHW on a channels_last input, and slower; GroupNorm's
    channels_last kernel is up to 9x slower with one channel a group (NOTE: [Layout-blind ops]): each is copied
    first, as before. (A stem before ``a``, so that ``a`` is inside a stack, not a lone convolution run on NCHW:
    NOTE [Lone convolutions].)"""
    net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), Between(op))
    fast = _optimized(net, (3, 9, 10))
    _assert_matches_eager(fast, net, torch.randn(2, 3, 9, 10))
    assert _copies(fast) == ["sequential__1_a_fused"]


class SegNetStage(nn.Module):
    """SegNet's encoder-decoder step: max pooling with its argmax indices, then ``nn.MaxUnpool2d`` with them."""

    def __init__(self, functional: bool):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
        self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)
        self.functional = functional

    def forward(self, x):
        y = F.relu(self.conv(x))
        pooled, indices = F.max_pool2d(y, 2, return_indices=True) if self.functional else self.pool(y)
        return self.out(self.unpool(pooled, indices))


@pytest.mark.parametrize("functional", [False, True], ids=["nn.MaxPool2d", "F.max_pool2d"])
def test_max_pooling_with_indices_runs(functional):
    """A pool that answers (values, indices) is read in the default layout; a channels_last read used to hand
    ``.contiguous()`` the tuple (AttributeError at the first call)."""
    net = SegNetStage(functional)
    fast = _optimized(net, (3, 8, 8))
    _assert_matches_eager(fast, net, torch.randn(2, 3, 8, 8))


class ShapeReaders(nn.Module):
    """``y.size()``, ``y.shape``, ``y.dim()`` and ``y.numel()`` beside ``y``'s other users."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        h, w = y.shape[-2:]
        scale = y.size(0) + y.size()[1] + y.dim() + y.numel() // (h * w)
        return self.b(F.interpolate(F.avg_pool2d(y, 2), size=(h, w))) * scale


def test_shape_readers_read_the_convolution_directly():
    net = ShapeReaders()
    fast = _optimized(net, (3, 8, 6))
    _assert_matches_eager(fast, net, torch.randn(2, 3, 8, 6))
    assert _copies(fast) == []


class StrideReader(nn.Module):
    """``y.stride()`` depends on the layout: the optimized model must read eager's strides."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return y * y.stride()[1]  # 1 in channels_last, H * W in NCHW


def test_stride_readers_still_read_the_default_layout():
    net = StrideReader()
    fast = _optimized(net, (3, 5, 4))
    _assert_matches_eager(fast, net, torch.randn(2, 3, 5, 4))
    assert _copies(fast) == ["stride_reader_a_fused"]


class DiffusionResBlock(nn.Module):
    """A DDPM-style residual block (Ho et al. 2020, as ports of its UNet write it): GroupNorm, SiLU, convolution,
    the time embedding added as ``emb[:, :, None, None]``, again, and a 1x1 skip."""

    def __init__(self, cin, cout, tdim=16):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(4, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DiffusionStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.inc = nn.Conv2d(3, 8, 3, padding=1)
        self.block1, self.block2 = DiffusionResBlock(8, 16), DiffusionResBlock(16, 8)

    def forward(self, x, emb):
        return self.block2(self.block1(self.inc(x), emb), emb)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_group_norms_of_several_channels_read_channels_last_in_float32(dtype):
    """A diffusion UNet's GroupNorm(4, C) before every convolution: in float32 it reads the convolutions'
    channels_last values as they are (two copies a norm saved; NOTE: [Layout-blind ops]); in bfloat16, where
    torch's channels_last group norm is up to 17x slower, each is copied first."""
    net = DiffusionStage().eval()
    x, emb = tg.Input(shape=(3, 8, 8)), tg.Input(shape=(16,))
    fast = tg.optimize(tg.Model([x, emb], net(x, emb)), dtype=dtype)
    data = (torch.randn(2, 3, 8, 8), torch.randn(2, 16))
    with torch.no_grad():
        out, expected = fast(*data), net(*data)
    tol = 1e-5 if dtype is None else 5e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    assert out.stride() == expected.stride()
    computes_float32 = dtype is None or not passes.bfloat16_supported()[0]  # else tg.optimize falls back
    assert (_copies(fast) == []) is computes_float32
