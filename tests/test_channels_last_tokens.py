"""Patch embeddings on tg.optimize's channels_last convolutions: ``x.flatten(2).transpose(1, 2)`` reads the
convolution's value with no copy (NOTE: [Channels-last into tokens] in passes/layout.py), and gives eager's values
(and eager's strides where the tokens are the model's output)."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models import ARCHITECTURES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _copies_before_flattens(model) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "call_method" and n.target == "contiguous"
               and any(u.target in ("flatten", torch.flatten) for u in n.users))


def _optimized(net: nn.Module, shape: tuple) -> tg.Model:
    x = tg.Input(shape=shape)
    return tg.optimize(tg.Model(x, net.eval()(x)))


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
