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
