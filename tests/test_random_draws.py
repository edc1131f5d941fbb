"""Random draws that depend on no input are never baked into a recording (NOTE: [Random draws in a
forward] in torchgraph/tracing.py, NOTE: [Draws outside torch] in torchgraph/generator_states.py): the
module that makes them stays one opaque layer. A build never depends on the generators' state and
draws nothing from them (NOTE: [Same draws in every run] in torchgraph/module_scopes.py)."""

from __future__ import annotations

import random
import warnings

import numpy as np
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
    """HuggingFace BART with encoder/decoder LayerDrop 0.1 and dropout 0.1, built at several generator
    states: the same outputs as eager in train mode under the same seeds (the recording used to keep
    whatever layers one draw had kept, then to fail for some states), and the generator is untouched."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=32, use_cache=False,
                                     encoder_layerdrop=0.1, decoder_layerdrop=0.1, dropout=0.1)
    inputs = {"input_ids": tg.Input(shape=(tg.Dim("seq", max=32),), dtype=torch.long, name="input_ids"),
              "decoder_input_ids": tg.Input(shape=(tg.Dim("dseq", max=32),), dtype=torch.long,
                                            name="decoder_input_ids"),
              "use_cache": False}
    ids, decoder_ids = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 7))
    for build_seed in range(6):
        torch.manual_seed(build_seed)
        net = transformers.BartModel(config)
        before = torch.get_rng_state()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tg.from_module(net, inputs)
        assert torch.equal(torch.get_rng_state(), before), build_seed
        for seed in range(3):
            for mode in (True, False):
                net.train(mode)
                model.train(mode)
                torch.manual_seed(seed)
                expected = net(input_ids=ids, decoder_input_ids=decoder_ids).last_hidden_state
                torch.manual_seed(seed)
                got = model(input_ids=ids, decoder_input_ids=decoder_ids)["last_hidden_state"]
                torch.testing.assert_close(got, expected, atol=0, rtol=0)


class TimeMasking(nn.Module):
    """SpecAugment's time masking as HuggingFace's Wav2Vec2 writes it (``_compute_mask_indices``): spans
    drawn with ``np.random.rand`` / ``np.random.choice`` in train mode, filled with a learned vector."""

    def __init__(self, dim=8, mask_prob=0.5, mask_length=2):
        super().__init__()
        self.masked_spec_embed = nn.Parameter(torch.rand(dim))
        self.mask_prob, self.mask_length = mask_prob, mask_length

    def forward(self, h):
        if not self.training:
            return h
        steps = h.shape[1]
        num_spans = int(self.mask_prob * steps / self.mask_length + np.random.rand())
        starts = np.random.choice(steps - self.mask_length, num_spans, replace=False)
        mask = np.zeros(steps, dtype=bool)
        for start in starts:
            mask[start:start + self.mask_length] = True
        return torch.where(torch.from_numpy(mask)[None, :, None], self.masked_spec_embed.to(h.dtype), h)


class RandomLayerDrop(nn.Module):
    """LayerDrop drawn with Python's ``random`` (as older HuggingFace models wrote it), then a norm."""

    def __init__(self, layerdrop=0.5, depth=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))
        self.norm = nn.LayerNorm(8)
        self.layerdrop = layerdrop

    def forward(self, x):
        for layer in self.layers:
            if self.training and random.uniform(0, 1) < self.layerdrop:
                continue
            x = torch.relu(layer(x))
        return self.norm(x)


class Frames(nn.Module):
    """(batch, 8) -> (batch, 6, 8): a fixed number of time steps, as a feature encoder makes them."""

    def __init__(self, block):
        super().__init__()
        self.inp = nn.Linear(8, 48)
        self.block = block

    def forward(self, x):
        return self.block(self.inp(x).view(x.shape[0], 6, 8))


def _seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _generator_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _same_generator_states(a, b):
    return torch.equal(a[0], b[0]) and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:] and a[2] == b[2]


def _equal_to_eager(net, model, x, output=lambda out: out, seeds=range(4)):
    for seed in seeds:
        for mode in (True, False):
            net.train(mode)
            model.train(mode)
            _seed_all(seed)
            expected = output(net(x))
            _seed_all(seed)
            torch.testing.assert_close(output(model(x)), expected, atol=0, rtol=0)


@pytest.mark.parametrize("block", [TimeMasking, RandomLayerDrop], ids=["np.random", "random"])
def test_a_draw_from_numpy_or_python_random_keeps_its_module_opaque_and_exact(block):
    """A module drawing from numpy's global generator or Python's random stays one layer (named, with the
    generator); for every generator state the build succeeds, leaves the generators as they were, and
    the model equals the module under the same seeds (the recording used to bake one draw, or fail)."""
    generator = "np.random" if block is TimeMasking else "random"
    x = torch.randn(5, 8)
    for seed in range(12):
        _seed_all(seed)
        net = Frames(block() if block is TimeMasking else nn.Sequential(block(), nn.Flatten(1))).train()
        before = _generator_states()
        model, warned = _record(net)
        assert _same_generator_states(before, _generator_states()), seed
        drawing = "'block'" if block is TimeMasking else "'block.0'"
        assert any(drawing in w and f"random numbers from {generator}" in w for w in warned), warned
        _equal_to_eager(net, model, x, seeds=range(3))


class NoisyGate(nn.Module):
    """Draws from a numpy Generator object of its own (``self.rng``) to decide whether to zero its input."""

    def __init__(self):
        super().__init__()
        self.rng = np.random.default_rng(0)

    def forward(self, x):
        return x * 0 if self.rng.random() < 0.5 else x + 1


def test_a_draw_from_the_modules_own_generator_keeps_it_opaque_and_exact():
    """A generator object stored on the module is watched like the global ones: the module stays one layer,
    its generator is left as it was by the build, and the model draws from it like eager."""
    net = nn.Sequential(nn.Linear(4, 4), NoisyGate())
    state = net[1].rng.bit_generator.state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tg.from_module(net, (4,))
    warned = [str(w.message) for w in caught]
    assert net[1].rng.bit_generator.state == state
    assert any("'1'" in w and "random numbers from a Generator of the module" in w for w in warned), warned
    x = torch.randn(3, 4)
    for _ in range(6):
        state = net[1].rng.bit_generator.state
        expected = net(x)
        net[1].rng.bit_generator.state = state
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def test_a_numpy_draw_at_the_top_level_fails_the_build_with_the_fix():
    """A root forward drawing from numpy's generator cannot be recorded: the message names the generator
    and the fix; the generator is left as it was."""
    np.random.seed(0)
    before = np.random.get_state()
    with pytest.raises(tg.GraphBuildError, match=r"TimeMasking.forward draws random numbers from np.random, .*"
                                                 r"received a change of their state.*one layer of a tg.Model"):
        tg.from_module(TimeMasking().train(), (6, 8))
    after = np.random.get_state()
    assert np.array_equal(before[1], after[1]) and before[2:] == after[2:]


@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
def test_layerdrop_builds_for_every_generator_state(mode):
    """LayerDrop (torch.rand([]) before the first use of the input) builds for every seed, in train and eval
    mode, draws nothing from the generator, and equals eager under the same seeds. (It used to fail for
    about half the seeds: the layer's original call drew before its shadow runs saved the generator,
    and real probe data was drawn from the same generator between the forward's own draws.)"""
    x = torch.randn(5, 8)
    for seed in range(25):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(8, 8), LayerDropStack(), nn.Linear(8, 2)).train(mode)
        before = _generator_states()
        model, warned = _record(net)
        assert _same_generator_states(before, _generator_states()), seed
        assert model.get_submodule("1") is net[1], warned
        _equal_to_eager(net, model, x, seeds=range(2))


class LayerDropEncoder(LayerDropStack):
    """LayerDrop, then a final norm (as HuggingFace encoders end): it never hands back its input object."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(super().forward(x))


def test_hand_written_builds_do_not_depend_on_the_generators():
    """Layers called on a tg.Input that draw (torch or numpy) before they use their input build for every
    seed: their probe runs start from the generator states their calls started from."""
    x = torch.randn(5, 8)
    for seed in range(20):
        _seed_all(seed)
        encoder, masking = LayerDropEncoder(), TimeMasking(dim=2)
        inputs = tg.Input(shape=(8,))
        model = tg.Model(inputs, masking(encoder(inputs).view(-1, 4, 2)))
        for s in range(2):
            for mode in (True, False):
                model.train(mode)
                _seed_all(s)
                expected = masking.train(mode)(encoder.train(mode)(x).view(-1, 4, 2))
                _seed_all(s)
                torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def test_wav2vec2_with_spec_augment_and_layerdrop_matches_eager():
    """HuggingFace Wav2Vec2ForCTC (random init) with SpecAugment (mask_time_prob 0.3, numpy draws) and
    LayerDrop 0.1: the build leaves torch's and numpy's generators as they were, and the model equals
    eager in train and eval mode under the same seeds."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(
        vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, mask_time_prob=0.3, mask_time_length=2, layerdrop=0.1,
        feat_extract_norm="group", apply_spec_augment=True)
    x = torch.randn(2, 400)
    for seed in range(3):
        _seed_all(seed)
        net = transformers.Wav2Vec2ForCTC(config).train()
        before = _generator_states()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tg.from_module(net, {"input_values": (400,)})
        assert _same_generator_states(before, _generator_states()), seed
        _equal_to_eager(net, model, x, output=lambda out: out["logits"], seeds=range(3))


@pytest.mark.parametrize("inference", [True, False])
def test_optimize_draws_nothing_from_the_users_generators(inference):
    """tg.optimize runs a module it cannot run on meta tensors (a branch on the data) on real probe
    data: that data and the module's own draws (its dropout, in train mode) leave torch's generator as
    it was, so the user's next random numbers do not depend on whether tg.optimize ran."""
    class DataBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.dropout = nn.Linear(8, 8), nn.Dropout(0.5)

        def forward(self, x):
            if x.sum() > 0:
                return self.dropout(self.linear(x))
            return self.linear(x) * 2

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), DataBranch(), nn.Linear(8, 2))
    x = tg.Input(shape=(8,))
    model = tg.Model(x, net(x)).train()
    before = torch.get_rng_state()
    tg.optimize(model, inference=inference)
    assert torch.equal(torch.get_rng_state(), before)
