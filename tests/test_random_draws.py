"""Random draws that depend on no input are never baked into a recording (NOTE: [Random draws in a
forward] in torchgraph/tracing.py): the module that makes them stays one opaque layer."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import torchgraph as tg


class LayerDropStack(nn.Module):
    """LayerDrop as HuggingFace writes it (BART, Wav2Vec2): a scalar draw per layer in train mode."""

    def __init__(self, layerdrop=0.5, depth=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))
        self.layerdrop = layerdrop

    def forward(self, x):
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0:
                if torch.rand([]) < self.layerdrop:  # skip the layer
                    continue
            x = torch.relu(layer(x))
        return x


class NoisyFeatures(nn.Module):
    """Noise drawn on a fresh tensor of a fixed size (no input involved), added in train mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        if self.training:
            h = h * torch.empty(8).bernoulli_(0.5)
        return h


class Net(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.block = block
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.drop(self.block(self.inp(x))))


def _record(net):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tg.from_module(net, (8,))
    return model, [str(w.message) for w in caught]


def _same_in_both_modes(net, model):
    x = torch.randn(5, 8)
    for seed in range(6):
        for mode in (True, False):
            net.train(mode)
            model.train(mode)
            torch.manual_seed(seed)
            expected = net(x)
            torch.manual_seed(seed)
            torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("block", [LayerDropStack, NoisyFeatures])
def test_a_draw_on_no_input_keeps_its_module_opaque_and_exact(block):
    """The block drawing without input stays one layer (named, with the reason); the model equals the
    module in train and eval mode under the same seeds, layers skipped and noise drawn anew per call."""
    torch.manual_seed(0)
    net = Net(block())
    model, warned = _record(net)
    assert any("'block'" in w and "random numbers" in w for w in warned), warned
    assert model.get_submodule("block") is net.block
    _same_in_both_modes(net, model)


def test_a_draw_at_the_top_level_fails_the_build_with_the_fix():
    """A root forward that draws without input cannot be recorded: the message says why and what to do."""
    torch.manual_seed(0)
    with pytest.raises(tg.GraphBuildError, match=r"'rand' draws random numbers that depend on no input"):
        tg.from_module(LayerDropStack().train(), (8,))
    model, _ = _record(LayerDropStack(layerdrop=0.0).train())  # LayerDrop 0: no draw, fully recorded
    assert not any(n.op == "call_module" and n.target == "" for n in model.graph.nodes)


def test_bart_with_layerdrop_matches_eager_in_train_mode():
    """HuggingFace BART with encoder/decoder LayerDrop 0.1 and dropout 0.1: the same outputs as eager in
    train mode under the same seeds (the recording used to keep whatever layers one draw had kept)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=32, use_cache=False,
                                     encoder_layerdrop=0.1, decoder_layerdrop=0.1, dropout=0.1)
    net = transformers.BartModel(config)
    inputs = {"input_ids": tg.Input(shape=(tg.Dim("seq", max=32),), dtype=torch.long, name="input_ids"),
              "decoder_input_ids": tg.Input(shape=(tg.Dim("dseq", max=32),), dtype=torch.long,
                                            name="decoder_input_ids"),
              "use_cache": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tg.from_module(net, inputs)
    ids, decoder_ids = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 7))
    for seed in range(4):
        for mode in (True, False):
            net.train(mode)
            model.train(mode)
            torch.manual_seed(seed)
            expected = net(input_ids=ids, decoder_input_ids=decoder_ids).last_hidden_state
            torch.manual_seed(seed)
            got = model(input_ids=ids, decoder_input_ids=decoder_ids)["last_hidden_state"]
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
