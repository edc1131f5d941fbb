"""Consumers that read tg.optimize's channels_last convolution values as they are, with no copy first (passes/layout.py):
``torch.cat`` (DenseNet's dense blocks, ShuffleNet's branches; NOTE: [Channels-last islands]), which gives eager's
values whatever the layouts of its inputs, and ``x.flatten(2).transpose(1, 2)`` (patch embeddings; NOTE:
[Channels-last into tokens]). Both keep eager's strides where their result is the model's output."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models import ARCHITECTURES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _copies(model) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "call_method" and n.target == "contiguous")


def _copies_before_flattens(model) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "call_method" and n.target == "contiguous"
               and any(u.target in ("flatten", torch.flatten) for u in n.users))


def _optimized(net: nn.Module, shape: tuple) -> tg.Model:
    x = tg.Input(shape=shape)
    return tg.optimize(tg.Model(x, net.eval()(x)))


# ------------------------------------------------------------------------------------------- torch.cat

def test_densenet_concatenates_its_layers_without_copies():
    """torchvision's DenseNet as torchvision writes it: each layer's input is ``torch.cat(features, 1)``."""
    arch = ARCHITECTURES["densenet"]
    net = arch.make_model().eval()
    fast = _optimized(net, arch.inputs[0].shape)
    (data,) = arch.make_inputs()
    with torch.no_grad():
        expected = net(data)
        torch.testing.assert_close(fast(data), expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)
    assert _copies(fast) == 0


class ConcatBranches(nn.Module):
    """Two convolutions and ``extra`` (the input itself, or nothing) concatenated, then ``tail``."""

    def __init__(self, with_input: bool, tail=None):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 2, 1)
        self.after = nn.Conv2d(12 if with_input else 8, 5, 3, padding=1)
        self.with_input, self.tail = with_input, tail

    def forward(self, x):
        parts = [self.a(x), torch.relu(self.b(x))] + ([x] if self.with_input else [])
        y = torch.cat(parts, dim=1)
        return self.tail(y) if self.tail is not None else self.after(y)


@pytest.mark.parametrize("with_input", [False, True], ids=["convolutions", "with the input (NCHW)"])
def test_concatenation_gives_eagers_values_in_any_mix_of_layouts(with_input):
    net = ConcatBranches(with_input)
    fast = _optimized(net, (4, 7, 9))
    data = torch.randn(3, 4, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net.eval()(data), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tail", [
    lambda y: y,  # the model's output
    lambda y: y.view(y.shape[0], -1),  # a view needs the default layout
    lambda y: y.relu_().sum(dim=(2, 3)),  # changed in place
], ids=["output", "view", "in place"])
def test_a_concatenation_read_as_written(tail):
    net = ConcatBranches(False, tail)
    fast = _optimized(net, (4, 7, 9))
    data = torch.randn(3, 4, 7, 9)
    with torch.no_grad():
        out, expected = fast(data), net.eval()(data)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.stride() == expected.stride()


# --------------------------------------------------------------------- flatten(2).transpose(1, 2)

def test_timm_vit_patch_embedding_reads_the_convolution_directly():
    arch = ARCHITECTURES["vit"]
    net = arch.make_model().eval()
    fast = _optimized(net, arch.inputs[0].shape)
    (data,) = arch.make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-4, rtol=1e-4)
    assert _copies_before_flattens(fast) == 0


class PatchEmbed(nn.Module):
    """A convolution into tokens, as timm's PatchEmbed and HF's patch embeddings spell it; then ``tail``."""

    def __init__(self, tail, spelling):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.tail, self.spelling = tail, spelling

    def forward(self, x):
        tokens = self.spelling(self.proj(x))
        return self.tail(self.norm(tokens)) if self.tail is not None else tokens


@pytest.mark.parametrize("spelling", [
    lambda y: y.flatten(2).transpose(1, 2),
    lambda y: torch.flatten(y, 2).transpose(-1, -2),
    lambda y: y.flatten(start_dim=2).permute(0, 2, 1),
    lambda y: torch.transpose(y.flatten(2), 2, 1),
], ids=["method", "torch.flatten", "permute", "torch.transpose"])
def test_every_spelling_reads_the_convolution_directly(spelling):
    net = PatchEmbed(lambda t: t.mean(1), spelling)
    fast = _optimized(net, (3, 16, 12))
    data = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-5, rtol=1e-5)
    assert _copies_before_flattens(fast) == 0


def test_tokens_returned_by_the_model_keep_eagers_strides():
    net = PatchEmbed(None, lambda y: y.flatten(2).transpose(1, 2))
    fast = _optimized(net, (3, 16, 12))
    data = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        out, expected = fast(data), net(data)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.stride() == expected.stride()


def test_other_flattens_still_read_the_default_layout():
    """``flatten(1)`` (a classifier head) and a flatten also read elsewhere are copied first, as before."""
    for spelling in (lambda y: y.flatten(1), lambda y: y.flatten(2) + y.flatten(2).transpose(1, 2).transpose(1, 2)):
        net = PatchEmbed(lambda t: t, spelling)
        net.norm = nn.Identity()
        fast = _optimized(net, (3, 16, 12))
        data = torch.randn(2, 3, 16, 12)
        with torch.no_grad():
            torch.testing.assert_close(fast(data), net(data), atol=1e-5, rtol=1e-5)
        assert _copies_before_flattens(fast) == 1
