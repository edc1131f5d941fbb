"""tg.from_module records `F.dropout(x, p, training=self.training)` as a dropout layer that follows the mode.

HuggingFace layers call functional dropout with the module's mode (OPT, BART; Falcon through a
`dropout_add` helper). The recording must follow model.train()/eval() and a submodule's own mode, and
survive everything a from_module model supports (NOTE: [Mode-following dropout as a layer] in
torchgraph/mode_dropout.py).
"""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_from_module_models import _assert_equivalent

import torchgraph as tg
from community_models import hf, tensor_leaves


def dropout_add(x, residual, prob: float, training: bool):
    """Falcon's helper: the mode arrives as an argument."""
    out = F.dropout(x, p=prob, training=training)
    return residual + out


class Block(nn.Module):
    """Written the HuggingFace way: a float `dropout` attribute and functional calls with the mode."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.dropout = 0.3
        self.channel_dropout = 0.2

    def forward(self, x):
        h = F.dropout(self.fc(x), p=self.dropout, training=self.training)
        h = F.dropout2d(h.view(-1, 2, 2, x.shape[-1] // 4), self.channel_dropout, self.training).flatten(1)
        h = F.alpha_dropout(h, 0.1, training=self.training)
        return dropout_add(h, x, 0.4, self.training)


class Net(nn.Module):
    def __init__(self, width: int = 8, mc_dropout: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(2))
        self.head = nn.Linear(width, 3)
        self.mc_dropout = mc_dropout

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if self.mc_dropout:  # Monte Carlo dropout: on in both modes
            x = F.dropout(x, p=0.5, training=True)
        return self.head(x)


def _record(net, *inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "stays one opaque layer" warning
        return tg.from_module(net, *inputs)


def _run(module, x, seed: int = 0):
    torch.manual_seed(seed)
    return module(x)


def _dropout_layers(model) -> dict:
    return {name: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.AlphaDropout))}


def test_functional_dropout_following_the_mode_is_recorded_through():
    torch.manual_seed(0)
    net = Net()
    model = _record(net, (8,))
    assert _dropout_layers(model) == {
        f"blocks.{i}.{name}": kind for i in (0, 1) for name, kind in
        [("dropout", "Dropout"), ("dropout2d", "Dropout2d"), ("alpha_dropout", "AlphaDropout"),
         ("dropout_1", "Dropout")]}
    assert not any(n.op == "call_function" and "dropout" in str(n.target) for n in model.graph.nodes)
    _assert_equivalent(model, net, {"x": torch.randn(5, 8)})


def test_eval_turns_dropout_off_and_a_submodule_follows_its_own_mode():
    torch.manual_seed(0)
    net = Net()
    model = _record(net, (8,))
    x = torch.randn(5, 8)
    model.train()
    assert not torch.equal(_run(model, x, 0), _run(model, x, 1))
    model.eval()
    assert torch.equal(_run(model, x, 0), _run(model, x, 1))
    torch.testing.assert_close(model(x), net.eval()(x), rtol=0, atol=0)
    # Only the second block in train mode: the graph follows that block's container, like eager does.
    model.blocks[1].train()
    net.blocks[1].train()
    assert not torch.equal(_run(model, x, 0), _run(model, x, 1))
    torch.testing.assert_close(_run(model, x, 3), _run(net, x, 3), rtol=0, atol=0)
    model.train()
    model.blocks[0].eval()
    net.train()
    net.blocks[0].eval()
    torch.testing.assert_close(_run(model, x, 4), _run(net, x, 4), rtol=0, atol=0)


def test_a_submodule_in_the_other_mode_when_recorded_follows_its_mode_too():
    torch.manual_seed(0)
    net = Net().train()
    net.blocks[0].eval()  # each module is recorded in its own mode and in the opposite one
    model = _record(net, (8,))
    assert not model.blocks[0].dropout.training and model.blocks[1].dropout.training
    _assert_equivalent(model, net, {"x": torch.randn(5, 8)})


def test_dropout_with_a_constant_training_flag_stays_as_recorded():
    torch.manual_seed(0)
    net = Net(mc_dropout=True)
    model = _record(net, (8,))
    mc = [n for n in model.graph.nodes if n.op == "call_function" and n.target is F.dropout]
    assert len(mc) == 1 and mc[0].kwargs["training"] is True
    _assert_equivalent(model, net, {"x": torch.randn(5, 8)})
    x = torch.randn(5, 8)
    assert not torch.equal(_run(model.eval(), x, 0), _run(model, x, 1))  # still random in eval


def test_round_trips_copies_summary_and_optimize():
    torch.manual_seed(0)
    net = Net()
    model = _record(net, (8,))
    x = torch.randn(5, 8)
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert _dropout_layers(other) == _dropout_layers(model)
        for mode in (True, False):
            other.train(mode)
            model.train(mode)
            torch.testing.assert_close(_run(other, x), _run(model, x), rtol=0, atol=0)
    rebuilt = tg.model_from_json(model.to_json())
    assert rebuilt.code == model.code and _dropout_layers(rebuilt) == _dropout_layers(model)
    lines = []
    model.summary(print_fn=lines.append)
    assert "blocks.0.dropout_1 (Dropout)" in "\n".join(lines)
    fast = tg.optimize(model.eval())
    assert not any(n.op == "call_module" and "dropout" in n.target for n in fast.graph.nodes)
    torch.testing.assert_close(fast(x), net.eval()(x))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = Net()
    model = _record(net, (8,))
    tg.save(model, tmp_path / "model.safetensors")
    loaded = tg.load(tmp_path / "model.safetensors")
    assert loaded.code == model.code and _dropout_layers(loaded) == _dropout_layers(model)
    x = torch.randn(5, 8)
    for mode in (True, False):
        loaded.train(mode)
        net.train(mode)
        torch.testing.assert_close(_run(loaded, x), _run(net, x), rtol=0, atol=0)
    loaded.train()
    loaded.blocks[0].eval()
    assert not loaded.blocks[0].dropout.training and loaded.blocks[1].dropout.training
    tg.export_onnx(loaded.eval(), tmp_path / "model.onnx", exporter="legacy")  # checked in onnxruntime


def test_the_root_forward_may_call_it_too():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return F.dropout(self.fc(x), 0.25, self.training)

    torch.manual_seed(0)
    head = Head()
    model = _record(head, (8,))
    assert type(model.dropout) is nn.Dropout and model.dropout.p == 0.25
    _assert_equivalent(model, head, {"x": torch.randn(5, 8)})


def test_a_module_named_like_the_dropout_layer_keeps_its_name():
    class WithDropoutModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.dropout = nn.Dropout(0.1)

        def forward(self, x):
            return self.dropout(F.dropout(self.fc(x), 0.2, self.training))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = WithDropoutModule()

        def forward(self, x):
            return self.block(x)

    torch.manual_seed(0)
    wrapper = Wrapper()
    model = _record(wrapper, (8,))
    assert model.block.dropout is wrapper.block.dropout
    assert type(model.block.dropout_1) is nn.Dropout and model.block.dropout_1.p == 0.2
    _assert_equivalent(model, wrapper, {"x": torch.randn(5, 8)})


@pytest.mark.skipif(not hf.HAS_TRANSFORMERS, reason="transformers is pinned in requirements-dev.txt")
@pytest.mark.parametrize("make", [hf.tiny_opt, hf.tiny_falcon], ids=["opt", "falcon"])
def test_transformers_decoder_layers_are_recorded_through(make, tmp_path):
    torch.manual_seed(0)
    net = make()
    inputs = {"input_ids": tg.Input(shape=("seq",), dtype=torch.long, name="input_ids"), "use_cache": False}
    model = _record(net, inputs)
    layers = _dropout_layers(model)
    assert layers and all(".0." in name or ".1." in name for name in layers)
    assert not [n for n in model.graph.nodes if n.op == "call_function" and n.target is F.dropout]
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    _assert_equivalent(model, net, {"input_ids": ids})
    tg.save(model, tmp_path / "model.safetensors")
    loaded = tg.load(tmp_path / "model.safetensors")
    for mode in (True, False):
        loaded.train(mode)
        model.train(mode)
        torch.manual_seed(0)
        expected = tensor_leaves(model(input_ids=ids))
        torch.manual_seed(0)
        got = tensor_leaves(loaded(input_ids=ids))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    lines = []
    model.summary(print_fn=lines.append)
    assert "(Dropout)" in "\n".join(lines)


def _eager_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0):
    """transformers' eager_attention_forward (BERT, GPT-2, ViT...): `dropout` is 0.0 in eval mode."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class EagerSelfAttention(nn.Module):
    """Written as transformers' attention modules call their eager attention function."""

    def __init__(self, attention_forward, dropout_prob: float, width: int = 8, heads: int = 2):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.heads = heads
        self.dropout_prob = dropout_prob
        self.attention_forward = attention_forward

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        out, _ = self.attention_forward(self, q, k, v, None, dropout=0.0 if not self.training else self.dropout_prob)
        return out.flatten(2)


class EagerEncoder(nn.Module):
    def __init__(self, attention_forward, dropout_prob: float):
        super().__init__()
        self.layers = nn.ModuleList(EagerSelfAttention(attention_forward, dropout_prob) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _attention_forwards():
    forwards = [pytest.param(_eager_attention_forward, id="as-written")]
    if hf.HAS_TRANSFORMERS:
        from transformers.models.bert.modeling_bert import eager_attention_forward

        forwards.append(pytest.param(eager_attention_forward, id="transformers-bert"))
    return forwards


@pytest.mark.parametrize("attention_forward", _attention_forwards())
@pytest.mark.parametrize("dropout_prob", [0.1, 0.0])
def test_dropout_whose_p_is_zero_in_eval_mode_follows_the_mode(attention_forward, dropout_prob):
    """`F.dropout(w, p=0.0 if not training else p, training=self.training)`: the eval recording's p
    changes nothing (no dropout when not training), so the layer takes the train recording's p."""
    torch.manual_seed(0)
    net = EagerEncoder(attention_forward, dropout_prob).eval()  # recorded with p = 0.0 first
    model = _record(net, (None, 8))
    assert {name: m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout)} == {
        f"layers.{i}.dropout": dropout_prob for i in (0, 1)}
    _assert_equivalent(model, net, {"x": torch.randn(3, 5, 8)})
    x = torch.randn(3, 5, 8)
    model.train()
    assert torch.equal(_run(model, x, 0), _run(model, x, 1)) == (dropout_prob == 0.0)
