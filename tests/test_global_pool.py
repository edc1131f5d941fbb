"""``fused.global_avg_pool2d`` and ``passes.use_global_avg_pool`` (NOTE: [Global pools of channels_last maps] in
torchgraph/fused/pool.py)."""

import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import fused
from torchgraph.fused.pool import global_avg_pool2d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("keepdim", [True, False])
def test_the_pool_is_the_mean_over_the_map(layout, keepdim):
    x = torch.randn(3, 40, 7, 5).contiguous(memory_format=layout)
    y = global_avg_pool2d(x, keepdim)
    torch.testing.assert_close(y, x.mean((2, 3), keepdim=keepdim), atol=1e-6, rtol=1e-6)
    assert y.shape == ((3, 40, 1, 1) if keepdim else (3, 40))
    if keepdim:
        torch.testing.assert_close(y, F.adaptive_avg_pool2d(x, 1), atol=1e-6, rtol=1e-6)
    unbatched = torch.randn(40, 7, 5)
    torch.testing.assert_close(global_avg_pool2d(unbatched), F.adaptive_avg_pool2d(unbatched, 1))
    grad_input = x.clone().requires_grad_()
    global_avg_pool2d(grad_input, keepdim).sum().backward()
    torch.testing.assert_close(grad_input.grad, torch.full_like(x, 1 / 35))


class _Heads(nn.Module):
    """A conv stack with the global pools of torchvision (F.adaptive_avg_pool2d, nn.AdaptiveAvgPool2d) and timm
    (``x.mean((2, 3))``, ``x.mean([-2, -1], keepdim=True)``), and pools the pass leaves alone."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pool_2x2 = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        h = F.relu(self.conv(F.relu(self.stem(x))))
        pooled = (F.adaptive_avg_pool2d(h, (1, 1)).flatten(1) + self.pool(h).flatten(1) + h.mean((2, 3))
                  + h.mean([-2, -1], keepdim=True).flatten(1))
        untouched = (h.mean((2, 3), dtype=torch.float64).float() + h.mean(1).flatten(1)[:, :32]
                     + self.pool_2x2(h).flatten(1)[:, :32] + x.mean((2, 3)).sum(1, keepdim=True)
                     + F.adaptive_avg_pool2d(F.relu(self.stem(x)), 1).flatten(1).sum(1, keepdim=True))
        return pooled + untouched


def test_the_pass_takes_every_global_pool_of_a_channels_last_map():
    net = _Heads().eval()
    x_sym = tg.Input(shape=(3, 9, 9))
    fast = tg.optimize(tg.Model(x_sym, net(x_sym)).eval())
    pools = [n for n in fast.graph.nodes if n.target is fused.global_avg_pool2d]
    assert len(pools) == 4, fast.code
    assert sorted(n.args[1] for n in pools) == [False, True, True, True]
    means = [n for n in fast.graph.nodes if n.op == "call_method" and n.target == "mean"]
    assert len(means) == 3  # with a dtype, over the channels, of the (NCHW) input
    assert sum(n.op == "call_function" and n.target is F.adaptive_avg_pool2d for n in fast.graph.nodes) == 1  # 3x3
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)
    restored = pickle.loads(pickle.dumps(fast))
    with torch.no_grad():
        torch.testing.assert_close(restored(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "efficientnet_b0", "convnext"])
def test_community_models_pool_on_rows_as_eager(name):
    """torchvision's ResNet-50, MobileNetV2 and EfficientNet-B0 as their authors write them end in a global pool of a
    1x1 convolution's channels_last map, which the pass takes; EfficientNet's squeeze-excitation pools (of depthwise
    convolutions) and timm ConvNeXt's head (the pool of a residual add) are left alone."""
    from community_models import ARCHITECTURES
    from test_optimize_community import _record

    arch = ARCHITECTURES[name]
    module = arch.make_model().eval()
    fast = tg.optimize(_record(arch, module))
    (x,) = arch.make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), module(x), atol=5e-4, rtol=1e-4)
    pools = sum(n.target is fused.global_avg_pool2d for n in fast.graph.nodes)
    assert pools == (0 if name == "convnext" else 1), fast.code
