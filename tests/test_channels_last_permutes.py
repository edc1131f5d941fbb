"""ConvNeXt's hand-made channels-last (``x.permute(0, 2, 3, 1)``) on tg.optimize's channels_last convolutions:
the permute reads the convolution's value with no copy (NOTE: [Channels-last into NHWC] in passes/layout.py)."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models.convnext import LayerNorm2d, convnext_atto
from torchgraph import fused


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _copies_before_permutes(model) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "call_method" and n.target == "contiguous"
               and any(u.op == "call_method" and u.target == "permute" for u in n.users))


def _channels_last_convs(model) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "call_function" and n.target is fused.conv2d_act
               and n.kwargs.get("channels_last"))


def test_timm_convnext_permutes_read_the_convolutions_directly():
    net = convnext_atto(num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), ls_init_value=0.5).eval()
    x = tg.Input(shape=(3, 64, 64))
    fast = tg.optimize(tg.Model(x, net(x)))
    assert _channels_last_convs(fast) > 0 and _copies_before_permutes(fast) == 0
    data = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-4, rtol=1e-4)


class ConvThen(nn.Module):
    """A conv, then what ``tail`` does with its (channels_last, once optimized) output."""

    def __init__(self, tail):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = LayerNorm2d(8)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.norm(self.conv(x)))


@pytest.mark.parametrize("tail", [
    lambda y: y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, 8),  # tokens, as a ViT-style head reads them
    lambda y: torch.permute(y, (0, 2, 3, 1)).flatten(1),
    lambda y: y.permute(0, 2, 3, 1).mean(-1),
], ids=["reshape", "torch.permute", "reduce"])
def test_permuted_values_give_eagers_results(tail):
    net = ConvThen(tail).eval()
    x = tg.Input(shape=(8, 6, 5))
    fast = tg.optimize(tg.Model(x, net(x)))
    data = torch.randn(3, 8, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-5, rtol=1e-5)


def test_a_permute_returned_by_the_model_keeps_eagers_strides():
    net = ConvThen(lambda y: y.permute(0, 2, 3, 1)).eval()
    x = tg.Input(shape=(8, 6, 5))
    fast = tg.optimize(tg.Model(x, net(x)))
    data = torch.randn(3, 8, 6, 5)
    with torch.no_grad():
        out, expected = fast(data), net(data)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.stride() == expected.stride()


class PermuteChangedInPlace(nn.Module):
    """The permuted view is changed in place, and the conv's value is read after: a copy would not see it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.after = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        y.permute(0, 2, 3, 1).mul_(2.0)
        return self.after(y)


def test_a_permute_changed_in_place_changes_the_convolutions_value():
    net = PermuteChangedInPlace().eval()
    x = tg.Input(shape=(8, 6, 5))
    fast = tg.optimize(tg.Model(x, net(x)))
    data = torch.randn(3, 8, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-5, rtol=1e-5)
