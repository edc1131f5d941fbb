"""``passes.fold_layer_scale``: a learned per-channel scale after a linear layer folded into its weight."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models.convnext import convnext_atto
from community_models.drop_path import DropPathViTBlock, LayerScale


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _muls(model) -> int:
    return sum(1 for n in model.graph.nodes
               if (n.op == "call_method" and n.target in ("mul", "mul_")) or (n.op == "call_function" and n.target in (
                   torch.mul, __import__("operator").mul)))


def _random_scales(net: nn.Module) -> nn.Module:
    """Scales far from timm's 1e-6 init and from powers of two (where folding would be exact anyway)."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gamma") or name.endswith("layer_scale_parameter"):
                p.uniform_(0.2, 1.7)
    return net.eval()


def _optimized(net, shape):
    x = tg.Input(shape=shape)
    out = net(x)
    return tg.optimize(tg.Model(x, out if isinstance(out, tg.SymbolicTensor) else out[0]))


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("make, shape", [
    (lambda: DropPathViTBlock(64, 4, init_values=1e-5), (10, 64)),  # timm's LayerScale: x * gamma
    (lambda: convnext_atto(num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)), (3, 32, 32)),
], ids=["timm_vit_layer_scale", "timm_convnext_gamma"])
def test_layer_scales_fold_into_the_linear_and_match_eager(make, shape):
    net = _random_scales(make())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = _optimized(net, shape)
    assert _muls(fast) == 0
    data = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the original is untouched


class InPlaceLayerScale(nn.Module):
    """timm's ``LayerScale(dim, inplace=True)``: ``x.mul_(self.gamma)``."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.3)

    def forward(self, x):
        return x.mul_(self.gamma)


class InPlaceScaledMlp(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.fc1, self.fc2, self.ls = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), InPlaceLayerScale(dim)

    def forward(self, x):
        return x + self.ls(self.fc2(torch.relu(self.fc1(x))))


def test_an_in_place_layer_scale_on_a_fresh_value_folds_too():
    """``fc2(h).mul_(gamma)`` changes a value nobody else reads: canonicalize makes it out of place (a
    broadcast operand of the same dtype keeps the shape), then it folds."""
    net = InPlaceScaledMlp().eval()
    fast = _optimized(net, (5, 16))
    assert _muls(fast) == 0
    data = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-6, rtol=1e-5)


def test_huggingface_convnext_layer_scale_folds():
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], image_size=32)
    net = _random_scales(transformers.ConvNextModel(config))
    fast = _optimized(net, (3, 32, 32))
    assert _muls(fast) == 0
    data = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), _first(net(data)), atol=1e-5, rtol=1e-5)


class ScaledTwice(nn.Module):
    """Cases left as written: the unscaled output read again, a shared linear, a scalar scale."""

    def __init__(self):
        super().__init__()
        self.fc, self.shared = nn.Linear(8, 8), nn.Linear(8, 8)
        self.ls = LayerScale(8, init_values=0.7)
        self.g, self.s = nn.Parameter(torch.rand(8) + 0.3), nn.Parameter(torch.tensor(1.3))
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        a = self.ls(y) + y  # y has another reader
        b = self.shared(x) * self.g + self.shared(a)  # the linear is called twice
        return b + self.other(x) * self.s  # a scalar, not per channel


def test_scales_that_cannot_be_folded_stay_as_written():
    net = ScaledTwice().eval()
    fast = _optimized(net, (5, 8))
    assert _muls(fast) == 3
    data = torch.randn(3, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-6, rtol=1e-6)


def test_training_mode_keeps_the_scale():
    net = _random_scales(DropPathViTBlock(64, 4, init_values=1e-5)).train()
    x = tg.Input(shape=(10, 64))
    fast = tg.optimize(tg.Model(x, net(x)), inference=False)
    assert _muls(fast) >= 2
