"""tg.optimize runs an nn.InstanceNorm2d that normalises by its input's statistics as F.group_norm with one channel
a group (passes/canonical.py, NOTE: [InstanceNorm as GroupNorm]): the same values, on torch's faster kernel."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from community_models import ResnetGenerator, get_norm_layer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class ConvNormConv(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 6, 3, padding=1), norm, nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.b(F.relu(self.norm(self.a(x))))


def _optimized(net: nn.Module, shape: tuple, **kwargs) -> tg.Model:
    x = tg.Input(shape=shape)
    return tg.optimize(tg.Model(x, net(x)), **kwargs)


def _norm_calls(model) -> tuple[int, int]:
    """(instance norm layers called, group norm calls) in the optimized graph."""
    layers = sum(isinstance(model.get_submodule(n.target), nn.InstanceNorm2d) for n in model.graph.nodes
                 if n.op == "call_module")
    return layers, sum(n.target is F.group_norm for n in model.graph.nodes)


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_runs_as_group_norm(affine):
    norm = nn.InstanceNorm2d(6, affine=affine, eps=1e-3)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0), norm.bias.uniform_(-1.0, 1.0)
    net = ConvNormConv(norm).eval()
    fast = _optimized(net, (3, 7, 9))
    assert _norm_calls(fast) == (0, 1)
    x = 3 * torch.randn(4, 3, 7, 9) + 1
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)


def test_running_statistics_and_training_keep_the_layer():
    """With track_running_stats=True an eval instance norm uses its running statistics (an affine map, not
    a group norm); in training (inference=False) the layer also stays as written."""
    norm = nn.InstanceNorm2d(6, track_running_stats=True)
    norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
    net = ConvNormConv(norm).eval()
    fast = _optimized(net, (3, 7, 9))
    assert _norm_calls(fast) == (1, 0)
    x = torch.randn(2, 3, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)
    training = _optimized(ConvNormConv(nn.InstanceNorm2d(6)).train(), (3, 7, 9), inference=False)
    assert _norm_calls(training) == (1, 0)


def test_cyclegan_generator_matches_eager_with_every_norm_a_group_norm():
    """CycleGAN's ResnetGenerator (tests/community_models): InstanceNorm2d from a functools.partial, reflection
    padding and transposed convolutions on channels_last, against eager in float64."""
    net = ResnetGenerator(3, 3, ngf=8, norm_layer=get_norm_layer("instance"), n_blocks=2).eval()
    fast = _optimized(net, (3, 32, 32))
    assert _norm_calls(fast) == (0, 9)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        exact = net.double()(x.double())
        net.float()
        error, eager_error = ((fast(x).double() - exact).abs().max().item(),
                              (net(x).double() - exact).abs().max().item())
    assert error <= max(4 * eager_error, 1e-5)
