"""tg.optimize and in-place ops: rewrites leave values changed in place (or through views) as eager
changes them, and in-place ops on fresh values (torchvision's ``out += identity``) fuse like the
out-of-place spelling (NOTE: [Aliases and in-place ops], NOTE: [Copies of changed values])."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from torchgraph import fused

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from handwritten import Bottleneck, randomize_batchnorm  # noqa: E402


class ReluOnAView(nn.Module):
    """An in-place activation on a slice changes the convolution's output through the view."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        self.act(y[:, :4])  # result unused: only the change through the view matters
        return y * 2


class AddThroughAView(nn.Module):
    """The convolution's output changed through a flattened view, then returned itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y.view(y.shape[0], -1).add_(1.0)
        return y


class ViewReadAfterChange(nn.Module):
    """A view taken before the output changes in place sees the change (a copy would not)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        flat = y.flatten(1)
        y.mul_(3.0)
        return flat


class BroadcastInPlace(nn.Module):
    """``out += bias`` with a broadcast bias keeps ``out``'s shape; out of place would too, but the
    rewrite is only made for operands of one shape: this stays as written."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(8, 1, 1))

    def forward(self, x):
        out = self.conv(x)
        out += self.bias
        return torch.relu(out)


class NegateChannelsAfterBatchNorm(nn.Module):
    """Half the channels of a folded conv + BatchNorm negated through ``narrow``, then read twice."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = self.bn(self.conv(x))
        h.narrow(1, 0, 4).mul_(-1.0)
        h = torch.relu(h)
        return self.conv2(h) + h


class NormalizeAfterChange(nn.Module):
    """A residual sum changed in place before its LayerNorm: the add + LayerNorm fusion (which runs
    the norm at the add) normalized the sum before the change (found by test_optimize_inplace_fuzz)."""

    def __init__(self):
        super().__init__()
        self.lin, self.ln = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        t = self.lin(x) + x
        t.mul_(2.0)
        return self.ln(t)


class ConvInputChangedBeforeItsResidualAdd(nn.Module):
    """The convolution's input changed in place between the convolution and its residual add: the
    conv + add fusion (which runs the convolution at the add) convolved the changed input (found by
    test_optimize_inplace_fuzz)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        r = x * 1.0
        y = self.conv(r)
        r.mul_(-2.0)
        return y + r


MODULES = [ReluOnAView, AddThroughAView, ViewReadAfterChange, BroadcastInPlace, NegateChannelsAfterBatchNorm,
           NormalizeAfterChange, ConvInputChangedBeforeItsResidualAdd]


def _built_from(net: nn.Module, how: str, shape: tuple = (3, 8, 8)) -> tg.Model:
    if how == "from_module":
        return tg.from_module(net, shape).eval()
    x = tg.Input(shape=shape)
    return tg.Model(x, net(x)).eval()


@pytest.mark.parametrize("how", ["from_module", "tg.Model"])
@pytest.mark.parametrize("cls", MODULES, ids=[c.__name__ for c in MODULES])
def test_values_changed_in_place_stay_as_eager_changes_them(cls, how):
    torch.manual_seed(0)
    net = cls().eval()
    model = _built_from(net, how)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x)
        for fast in (tg.optimize(model), tg.optimize(model, channels_last=False),
                     tg.optimize(model, inference=False).eval()):
            torch.testing.assert_close(fast(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["from_module", "tg.Model"])
def test_a_model_input_changed_in_place_is_changed_for_the_caller(how):
    """``x += conv(x)`` changes the caller's tensor in eager; the recorded model (tg.from_module used
    to refuse it, saying the forward differed between train and eval mode) and the optimized one do too."""
    class AddIntoInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            x += self.conv(x)
            return torch.relu(x)

    torch.manual_seed(0)
    net = AddIntoInput().eval()
    if how == "from_module":
        model = tg.from_module(net, (4, 8, 8)).eval()
    else:
        x = tg.Input(shape=(4, 8, 8))
        model = tg.Model(x, net(x)).eval()
    data = torch.randn(2, 4, 8, 8)
    for variant in (model, tg.optimize(model)):
        mine, theirs = data.clone(), data.clone()
        with torch.no_grad():
            torch.testing.assert_close(variant(mine), net(theirs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
        assert not torch.equal(mine, data)


@pytest.mark.skipif(not fused._common._HAS_ONEDNN, reason="the residual fusion needs oneDNN")
def test_torchvision_residual_spelled_in_place_fuses_like_the_out_of_place_one():
    """torchvision's Bottleneck (``out += identity``, one ``nn.ReLU(inplace=True)``) recorded by
    tg.from_module fuses its residual into the last convolution with no layout copies inside the
    stack, as the hand-written graph does; values equal eager's."""
    torch.manual_seed(0)
    net = randomize_batchnorm(nn.Sequential(Bottleneck(64, 16), Bottleneck(64, 16))).eval()
    x_sym = tg.Input(shape=(64, 8, 8))
    for model in (tg.from_module(net, (64, 8, 8)), tg.Model(x_sym, net(x_sym))):
        fast = tg.optimize(model.eval())
        calls = [n.target for n in fast.graph.nodes if n.op in ("call_function", "call_method")]
        assert calls.count(fused.conv2d_add_act) == 2
        assert calls.count("contiguous") <= 1  # at most where the stack's output leaves it
        assert "add_" not in calls
        x = torch.randn(2, 64, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), atol=1e-4, rtol=1e-4)


def test_in_place_ops_whose_results_nobody_reads_still_run():
    """Dead-code elimination keeps an in-place op whose result is unused (it changes its target)."""
    class Accumulate(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            z = y[:, :2]
            z.mul_(0.0)
            return y + 1

    torch.manual_seed(0)
    net = Accumulate().eval()
    fast = tg.optimize(tg.from_module(net, (4,)).eval())
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x))
    assert any(n.op == "call_method" and n.target == "mul_" for n in fast.graph.nodes)


@pytest.mark.parametrize("how", ["from_module", "tg.Model"])
def test_attention_written_out_keeps_a_key_changed_after_the_scores(how):
    """``scores = q @ k^T; k.mul_(-3); softmax(scores) @ v``: the SDPA rewrite (which computes the
    scores at the last matmul) read the changed key; the chain now stays as written."""
    class KeyChangedAfterScores(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def heads(self, t):
            return t.view(t.shape[0], t.shape[1], 2, 4).transpose(1, 2)

        def forward(self, x):
            q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
            scores = q @ k.transpose(-2, -1) * 0.5
            k.mul_(-3.0)
            y = torch.softmax(scores, dim=-1) @ v
            return (y + k).transpose(1, 2).reshape(x.shape[0], x.shape[1], 8)

    torch.manual_seed(0)
    net = KeyChangedAfterScores().eval()
    model = _built_from(net, how, (5, 8))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        for fast in (tg.optimize(model), tg.optimize(model, inference=False).eval()):
            torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not tg.passes.bfloat16_supported()[0], reason="needs a CPU with bfloat16 instructions")
@pytest.mark.parametrize("how", ["from_module", "tg.Model"])
def test_a_model_input_changed_in_place_in_bfloat16_is_changed_for_the_caller(how):
    """``x[:, :2] += ...`` in a graph computed in bfloat16 changed the bfloat16 copy of the input only;
    the caller's tensor now gets the change too (NOTE: [Inputs changed in a bfloat16 graph])."""
    class AddIntoHalfTheInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            x[:, :2] += self.conv(x)[:, :2]
            return torch.relu(x)

    torch.manual_seed(0)
    net = AddIntoHalfTheInput().eval()
    fast = tg.optimize(_built_from(net, how, (4, 8, 8)), dtype=torch.bfloat16)
    data = torch.randn(2, 4, 8, 8)
    mine, theirs = data.clone(), data.clone()
    with torch.no_grad():
        torch.testing.assert_close(fast(mine), net(theirs), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(mine, theirs, atol=5e-2, rtol=2e-2)
    assert not torch.allclose(mine[:, :2], data[:, :2], atol=5e-2)
