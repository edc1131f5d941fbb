"""``passes.share_attribute_walks``: an optimized model's forward reads each submodule once per call,
with the same values, and still sees every change made to the model between calls."""

from __future__ import annotations

import copy
import os
import pickle
import re
import sys

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from torchgraph.passes.attribute_reads import SharedWalkCodeGen

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from handwritten import TorchvisionMobileNetV2, randomize_batchnorm  # noqa: E402


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    net = randomize_batchnorm(TorchvisionMobileNetV2(num_classes=10)).eval()
    x = tg.Input(shape=(3, 32, 32))
    return net, tg.Model(x, net(x)).eval()


class _Zero(nn.Module):
    def forward(self, weight):
        return weight * 0


def _plain(model: tg.Model) -> tg.Model:
    """The same model with fx's own code generator."""
    model = copy.deepcopy(model)
    model.graph.set_codegen(torch.fx.graph.CodeGen())
    model.recompile()
    return model


@pytest.mark.parametrize("inference", [True, False])
def test_each_module_is_walked_once_with_the_same_values(mobilenet, inference):
    net, model = mobilenet
    fast = tg.optimize(model, inference=inference)
    assert isinstance(fast.graph._codegen, SharedWalkCodeGen)
    plain = _plain(fast)
    assert "getattr(getattr(" in plain.code and "getattr(getattr(" not in fast.code
    # one binding per module on a path, each bound once
    paths = {".".join(n.target.split(".")[:depth]) for n in fast.graph.nodes
             if n.op in ("get_attr", "call_module") for depth in range(1, n.target.count(".") + 1)}
    bindings = re.findall(r"(?:^\s+|; )(_\w+) = ", fast.code, flags=re.M)
    assert len(bindings) == len(set(bindings)) == len(paths)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))
        torch.testing.assert_close(fast(x), net(x), atol=1e-4, rtol=1e-4)


def test_changes_between_calls_are_seen(mobilenet):
    """Nothing is cached across calls: a parameter replaced by assignment or by
    ``load_state_dict(assign=True)``, a layer replaced or a parametrization added is read by the next call."""
    _, model = mobilenet
    fast = tg.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = fast(x)
        state = {k: v * 0.5 if k.endswith("classifier.1.weight") else v for k, v in fast.state_dict().items()}
        fast.load_state_dict(state, assign=True)
        halved = fast(x)
        head = fast.get_submodule("torchvision_mobile_net_v2.classifier.1")
        torch.testing.assert_close(halved - head.bias, (before - head.bias) * 0.5, atol=1e-5, rtol=1e-4)
        head.weight = nn.Parameter(torch.zeros_like(head.weight))
        torch.testing.assert_close(fast(x), head.bias.expand(2, -1))
        classifier = fast.get_submodule("torchvision_mobile_net_v2.classifier")
        replacement = nn.Linear(head.weight.shape[1], head.weight.shape[0])
        replacement.weight.data.zero_()
        setattr(classifier, "1", replacement)
        torch.testing.assert_close(fast(x), replacement.bias.expand(2, -1))
        replacement.weight.data.normal_()
        torch.nn.utils.parametrize.register_parametrization(replacement, "weight", _Zero())  # a class property
        torch.testing.assert_close(fast(x), replacement.bias.expand(2, -1))


def test_copies_and_pickles_keep_working(mobilenet):
    _, model = mobilenet
    fast = tg.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = fast(x)
        copied = copy.deepcopy(fast)
        assert isinstance(copied.graph._codegen, SharedWalkCodeGen)
        assert torch.equal(copied(x), want)
        assert torch.equal(pickle.loads(pickle.dumps(fast))(x), want)
