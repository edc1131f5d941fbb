"""torch.cat inside tg.optimize's channels_last conv stacks (DenseNet's dense blocks, ShuffleNet's branches): it
reads the convolutions' channels_last values with no copy first (NOTE: [Channels-last islands] in passes/layout.py),
and gives eager's values whatever the layouts of its inputs, and eager's strides where it is the model's output."""

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


def _optimized(net: nn.Module, shape: tuple) -> tg.Model:
    x = tg.Input(shape=shape)
    return tg.optimize(tg.Model(x, net.eval()(x)))


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
