"""tg.optimize and the train/eval mode: a model optimized for training follows model.eval() like the
original (NOTE: [Traced in both modes]); one optimized for inference refuses train mode (NOTE:
[Inference-only models])."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg


class ModeBranches(nn.Module):
    """Custom code that reads self.training, as research code often does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = 0.3

    def forward(self, x):
        h = F.dropout(self.fc(x), self.drop, self.training)
        if self.training:
            h = h + 0.1 * torch.tanh(h)   # a train-only term
        return F.relu(h)


def _model(block: nn.Module) -> tg.Model:
    x = tg.Input(shape=(8,))
    return tg.Model(x, nn.Linear(8, 2)(block(x)))


def test_optimized_for_training_follows_eval_like_the_original():
    """inference=False, then model.eval() and back: the same outputs as the original in both modes."""
    torch.manual_seed(0)
    model = _model(ModeBranches()).train()
    fast = tg.optimize(model, inference=False)
    x = torch.randn(4, 8)
    for mode in (True, False, True):
        model.train(mode)
        fast.train(mode)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(fast(x), expected, atol=1e-6, rtol=1e-6)


def test_optimized_for_inference_refuses_train_mode():
    """tg.optimize(model) folds and removes what train mode needs: .train() says so instead of computing
    something else; eval mode and train(False) are fine."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5))
    x = tg.Input(shape=(3, 8, 8))
    fast = tg.optimize(tg.Model(x, net(x)))
    with pytest.raises(RuntimeError, match=r"inference=True.*tg.optimize\(model, inference=False\)"):
        fast.train()
    assert not fast.training
    fast.eval()
    fast.train(False)
    trainable = tg.optimize(tg.Model(x, net(x)), inference=False)
    assert trainable.train().training


def test_optimized_for_inference_has_frozen_weights_and_runs_its_plans_outside_no_grad():
    """NOTE: [Frozen inference weights]: a plain call (grad mode on, as `model.eval(); model(x)` makes it)
    takes the planned kernels and answers without a graph; the original keeps its trainable weights;
    inference=False keeps them trainable."""
    from torchgraph.fused import conv as fused_conv

    torch.manual_seed(0)
    x = tg.Input(shape=(16, 12, 12))
    h = nn.ReLU()(nn.BatchNorm2d(32)(nn.Conv2d(16, 32, 3, padding=1)(x)))
    model = tg.Model(x, nn.Conv2d(32, 8, 1)(h).mean(dim=(2, 3))).eval()
    fast = tg.optimize(model)
    assert not any(p.requires_grad for p in fast.parameters())
    assert all(p.requires_grad for p in model.parameters())
    data = torch.randn(2, 16, 12, 12)
    out = fast(data)
    assert not out.requires_grad and out.grad_fn is None
    with torch.no_grad():
        torch.testing.assert_close(out, model(data), rtol=1e-4, atol=1e-4)
    assert any(id(p) in fused_conv._PLANS for p in fast.parameters()), "no convolution planned outside no_grad"
    assert all(p.requires_grad for p in tg.optimize(model.train(), inference=False).parameters())


def test_frozen_torchvision_mobilenet_v2_plain_call_matches_eager_and_runs_its_kernels(monkeypatch):
    """torchvision's MobileNetV2 as its authors write it (benchmarks/handwritten.py): a plain call of the
    optimized model equals eager under no_grad, builds no graph, and runs its depthwise layers on planned
    kernels (NOTE: [Frozen inference weights]). Its blocks' expansion + depthwise calls run as the two planned
    convolutions here (the one-pass kernel switched off: tests/test_expand_depthwise_conv.py has it)."""
    import os
    import sys

    import torchgraph._extension as extension
    from torchgraph.fused import conv as fused_conv
    from torchgraph.fused import conv_expand

    monkeypatch.setattr(conv_expand, "EXPAND_DEPTHWISE_KERNEL", False)

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from handwritten import TorchvisionMobileNetV2, randomize_batchnorm

    torch.manual_seed(0)
    net = randomize_batchnorm(TorchvisionMobileNetV2()).eval()
    fast = tg.optimize(tg.from_module(net, (3, 32, 32)))
    data = torch.randn(2, 3, 32, 32)
    out = fast(data)
    assert not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, net(data), rtol=1e-4, atol=1e-4)
    planned = [fused_conv._PLANS[id(p)] for p in fast.parameters() if id(p) in fused_conv._PLANS]
    with_residual = [p for p in fast.parameters() if id(p) in fused_conv._ADD_PLANS]
    assert (len(planned), len(with_residual)) == (42, 10)  # all 52 convolutions
    depthwise = 17 if fused_conv.DEPTHWISE_KERNEL and extension.HAS_C_OPS else 0
    assert sum(plan.depthwise is not None for plan in planned) == depthwise
