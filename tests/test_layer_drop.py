"""A hand-written LayerDrop (each layer skipped with probability p in training) as a layer of a model.

Its forward draws random numbers to choose what it computes, so it is one opaque layer that draws at
every call, as in eager. A build that happens to skip every layer (the layer hands back its input)
still records the call (NOTE: [Lost calls] in module_scopes.py), whatever the user's generator state;
test_core_limits.py checks the same for a forward that branches on the data.
"""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg


class LayerDrop(nn.Module):
    """The way LayerDrop is written by hand (fairseq, HF `if self.training and dropout_probability < p`)."""

    def __init__(self, p: float, depth: int = 3):
        super().__init__()
        self.p = p
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(depth)])

    def forward(self, x):
        for layer in self.layers:
            if self.training and torch.rand(()) < self.p:
                continue
            x = torch.relu(layer(x))
        return x


def _build(block: LayerDrop) -> tg.Model:
    x = tg.Input(shape=(8,))
    return tg.Model(x, block(x) * 2)


def _assert_matches_eager(model: tg.Model, block: LayerDrop) -> None:
    data = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    for training in (True, False):
        model.train(training)
        for seed in range(4):
            torch.manual_seed(seed)
            got = model(data)
            torch.manual_seed(seed)
            torch.testing.assert_close(got, block(data) * 2)


def test_layer_drop_that_skips_every_layer_at_build_time_is_one_layer():
    """p=1: the build-time call hands back its input; the call stays in the graph and draws at run time."""
    torch.manual_seed(0)
    block = LayerDrop(p=1.0)
    model = _build(block)
    assert [n.op for n in model.graph.nodes].count("call_module") == 1
    _assert_matches_eager(model, block)
    block.p = 0.0  # the layer's own forward runs at every call: no layer is skipped any more
    model.train()
    data = torch.randn(2, 8)
    torch.testing.assert_close(model(data), block(data) * 2)
    assert not torch.equal(model(data), data * 2)


@pytest.mark.parametrize("seed", range(8))
def test_layer_drop_builds_the_same_model_whatever_the_generator_state(seed):
    """p=0.5 skips all three layers on 1 draw in 8: every user seed gives the same graph, equal to eager."""
    torch.manual_seed(0)
    block = LayerDrop(p=0.5)
    torch.manual_seed(seed)
    model = _build(block)
    assert model.code == _build(block).code
    _assert_matches_eager(model, block)


def test_from_module_of_a_layer_drop_root_says_to_use_it_as_one_layer():
    """tg.from_module cannot look through a root that draws: the message names the draw and the fix."""
    with pytest.raises(tg.GraphBuildError, match=r"LayerDrop.forward itself .* 'rand' draws random numbers.*"
                                                 r"Use the module as one layer of a tg.Model"):
        tg.from_module(LayerDrop(p=0.5), (8,))
