"""tg.optimize folds a pre-activation BatchNorm (``conv(relu(bn(x)))``: DenseNet, ResNetV2) into one
``ops.bias_act`` pass and the convolutions' weights where every channel's scale is positive
(passes/batchnorm.py, NOTE: [Pre-activation BatchNorm]), and leaves it as written everywhere else."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import ops


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _calibrated(bn: nn.BatchNorm2d, negative: bool = False) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        if negative:
            bn.weight[1] = -0.7
    return bn


class PreActBlock(nn.Module):
    """ResNetV2's block: ``relu(bn(x))`` read by the first convolution and the projection shortcut."""

    def __init__(self, negative: bool = False, padding_mode: str = "zeros"):
        super().__init__()
        self.bn = _calibrated(nn.BatchNorm2d(4), negative)
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1, padding_mode=padding_mode, bias=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 6, 1, bias=False)

    def forward(self, x):
        out = F.relu(self.bn(x))
        return self.conv2(self.conv1(out)) + self.shortcut(out)


class DenseLayer(nn.Module):
    """torchvision DenseNet's layer: ``conv1(relu1(norm1(cat(features))))`` with nn.ReLU(inplace=True)."""

    def __init__(self):
        super().__init__()
        self.norm1, self.relu1 = _calibrated(nn.BatchNorm2d(7)), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(7, 5, 1, bias=False)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        features = torch.cat([self.stem(x), x], 1)
        return self.conv1(self.relu1(self.norm1(features)))


def _optimized(net: nn.Module, shape=(4, 6, 7), **kwargs) -> tg.Model:
    x = tg.Input(shape=shape)
    return tg.optimize(tg.Model(x, net.eval()(x)), **kwargs)


def _folded(model) -> int:
    return sum(n.target is ops.bias_act for n in model.graph.nodes)


@pytest.mark.parametrize("net, shape", [(PreActBlock(), (4, 6, 7)), (PreActBlock(padding_mode="reflect"), (4, 6, 7)),
                                        (DenseLayer(), (3, 6, 7))],
                         ids=["ResNetV2 block", "reflect padding", "DenseNet layer"])
def test_preactivation_batchnorm_folds(net, shape):
    weights = {name: p.detach().clone() for name, p in net.named_parameters()}
    fast = _optimized(net, shape)
    assert _folded(fast) == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = 2 * torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)
    # the original's convolutions (whose weights tg.optimize's copy shares until it replaces them) are untouched
    assert all(torch.equal(p, weights[name]) for name, p in net.named_parameters())


class ReluAlsoReturned(PreActBlock):
    def forward(self, x):
        out = F.relu(self.bn(x))
        return self.conv1(out), out


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = _calibrated(nn.BatchNorm2d(4)), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(F.relu(self.bn(x))))


@pytest.mark.parametrize("net", [PreActBlock(negative=True), ReluAlsoReturned(), SharedConv()],
                         ids=["a negative scale", "the ReLU also returned", "a convolution called twice"])
def test_left_as_written(net):
    fast = _optimized(net)
    assert _folded(fast) == 0
    x = torch.randn(2, 4, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)


def test_bfloat16_and_training_mode():
    net = PreActBlock()
    x = torch.randn(2, 4, 6, 7)
    fast = _optimized(net, dtype=torch.bfloat16)
    assert _folded(fast) == 1
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=5e-2, rtol=5e-2)
    training = _optimized(PreActBlock().train(), inference=False)
    assert _folded(training) == 0


def test_kuangliu_preact_resnet_folds_every_block():
    """kuangliu/pytorch-cifar's PreActResNet18 (tests/community_models): each block's ``F.relu(self.bn1(x))``
    feeds conv1 and, in the first block of a stage, the projection shortcut; both fold. The last BatchNorm feeds
    a pooling, so it stays."""
    from community_models import ARCHITECTURES

    arch = ARCHITECTURES["preact_resnet18"]
    net = arch.make_model().eval()
    fast = _optimized(net, arch.inputs[0].shape)
    assert _folded(fast) == 8
    (x,) = arch.make_inputs()
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(fast(x), expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)
