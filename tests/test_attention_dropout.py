"""tg.from_module records attention dropout that follows the mode as `tg.layers.ScaledDotProductAttention`.

nanoGPT writes `F.scaled_dot_product_attention(..., dropout_p=self.dropout if self.training else 0, ...)`,
HuggingFace's `sdpa_attention_forward` gets `dropout=0.0 if not self.training else p` (BERT, GPT-2, OPT).
The attention modules must be recorded through (no opaque layer), match eager in both modes under the
same seed, follow model.eval() and a submodule's own mode, and survive saving and optimizing
(NOTE: [Attention dropout as a layer] in torchgraph/mode_dropout.py).
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
from community_models.nanogpt import GPT, GPTConfig

SDPA = tg.layers.ScaledDotProductAttention


def _record(net, *inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "stays one opaque layer" warning
        return tg.from_module(net, *inputs)


def _attention_layers(model) -> dict:
    return {name: m.dropout_p for name, m in model.named_modules() if isinstance(m, SDPA)}


def _outputs(module, kwargs: dict, seed: int = 0) -> list:
    torch.manual_seed(seed)
    return tensor_leaves(module(**kwargs))


def _assert_same(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _nanogpt(dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def _nanogpt_input():
    return tg.Input(shape=(tg.Dim("seq", max=32),), dtype=torch.long, name="idx")


def test_the_layer_is_sdpa_with_dropout_in_train_mode_only():
    q, k, v = (torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    layer = SDPA(dropout_p=0.3)
    torch.manual_seed(0)
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    torch.manual_seed(0)
    torch.testing.assert_close(layer(q, k, v, is_causal=True), expected, rtol=0, atol=0)
    layer.eval()
    torch.testing.assert_close(layer(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match=r"ScaledDotProductAttention: dropout_p must be a probability"):
            SDPA(dropout_p=bad)


def test_nanogpt_attention_dropout_is_recorded_through_and_follows_the_mode():
    net = _nanogpt()
    model = _record(net, _nanogpt_input())
    assert _attention_layers(model) == {f"transformer.h.{i}.attn.scaled_dot_product_attention": 0.2
                                        for i in (0, 1)}
    assert not any(n.op == "call_function" and n.target in (F.scaled_dot_product_attention,) for n in model.graph.nodes)
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    _assert_equivalent(model, net, {"idx": idx})
    model.train()
    assert not torch.equal(_outputs(model, {"idx": idx}, 0)[0], _outputs(model, {"idx": idx}, 1)[0])
    model.eval()
    _assert_same(_outputs(model, {"idx": idx}, 0), _outputs(model, {"idx": idx}, 1))
    # Only the first block's attention trains: the layer follows its container, as eager does.
    for m in (model, net):
        m.eval()
        m.transformer.h[0].attn.train()
    assert model.transformer.h[0].attn.scaled_dot_product_attention.training
    _assert_same(_outputs(model, {"idx": idx}, 3), _outputs(net, {"idx": idx}, 3))
    assert not torch.equal(_outputs(model, {"idx": idx}, 0)[0], _outputs(model, {"idx": idx}, 1)[0])


def test_nanogpt_round_trips_copies_summary_optimize_and_onnx(tmp_path):
    net = _nanogpt()
    model = _record(net, _nanogpt_input())
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    kwargs = {"idx": idx}
    tg.save(model, tmp_path / "model.safetensors")
    loaded = tg.load(tmp_path / "model.safetensors")
    rebuilt = tg.model_from_json(model.to_json())
    copies = [loaded, rebuilt, pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    rebuilt.load_state_dict(model.state_dict())
    for other in copies:
        assert other.code == model.code and _attention_layers(other) == _attention_layers(model)
        for mode in (True, False):
            other.train(mode)
            model.train(mode)
            _assert_same(_outputs(other, kwargs), _outputs(model, kwargs))
    lines = []
    model.summary(print_fn=lines.append)
    assert "\n".join(lines).count("(ScaledDotProductAttention)") == 2
    assert tg.model_to_dot(model, max_nodes=None).source.count("ScaledDotProductAttention") == 2
    model.eval()
    fast = tg.optimize(model)  # inference: plain SDPA, which the attention pass fuses
    assert not _attention_layers(fast)
    assert sum(getattr(n.target, "__name__", "") == "qkv_attention" for n in fast.graph.nodes) == 2
    torch.testing.assert_close(fast(idx), net.eval()(idx), rtol=1e-5, atol=1e-5)
    trainable = tg.optimize(model.train(), inference=False)  # training: the layer stays (fused linears round)
    assert _attention_layers(trainable) == _attention_layers(model)
    torch.testing.assert_close(_outputs(trainable, kwargs), _outputs(net.train(), kwargs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_outputs(trainable, kwargs, 1)[0], _outputs(net, kwargs, 0)[0], rtol=1e-3)
    tg.export_onnx(model.eval(), tmp_path / "model.onnx", exporter="legacy")  # checked in onnxruntime


def test_sdpa_dropout_that_does_not_follow_the_mode_stays_as_recorded():
    """A constant dropout_p drops out in both modes, as eager does; an inverted one makes its module opaque."""

    class Attention(nn.Module):
        def __init__(self, inverted: bool):
            super().__init__()
            self.proj = nn.Linear(8, 24)
            self.inverted = inverted

        def forward(self, x):
            q, k, v = self.proj(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)
            p = (0.0 if self.training else 0.3) if self.inverted else 0.3
            return F.scaled_dot_product_attention(q, k, v, None, p).transpose(1, 2).flatten(2)

    class Net(nn.Module):
        def __init__(self, inverted: bool):
            super().__init__()
            self.attention = Attention(inverted)

        def forward(self, x):
            return self.attention(x)

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    net = Net(inverted=False)
    model = _record(net, (None, 8))
    assert not _attention_layers(model)
    assert [n.args[4] for n in model.graph.nodes if n.target is F.scaled_dot_product_attention] == [0.3]
    _assert_equivalent(model, net, {"x": x})
    with pytest.warns(UserWarning, match=r"'attention' \(Attention\) stays one opaque layer"):
        model = tg.from_module(Net(inverted=True), (None, 8))
    assert not _attention_layers(model)


def _hf_case(name: str):
    if name == "bert":
        return hf.tiny_bert(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=64), {"attention_mask": True}
    if name == "gpt2":
        return hf.tiny_gpt2(n_embd=32, n_layer=2, n_head=2), {"attention_mask": True}
    return hf.tiny_opt(attention_dropout=0.1), {}


@pytest.mark.skipif(not hf.HAS_TRANSFORMERS, reason="transformers is pinned in requirements-dev.txt")
@pytest.mark.parametrize("name", ["bert", "gpt2", "opt"])
def test_transformers_sdpa_attention_dropout_is_recorded_through(name, tmp_path):
    """Default attention dropouts (BERT attention_probs_dropout_prob, GPT-2 attn_pdrop: 0.1; OPT
    attention_dropout=0.1) with transformers' default sdpa attention."""
    torch.manual_seed(0)
    net, extra = _hf_case(name)
    seq = tg.Dim("seq", max=32)
    inputs = {"input_ids": tg.Input(shape=(seq,), dtype=torch.long, name="input_ids")}
    if extra.get("attention_mask"):
        inputs["attention_mask"] = tg.Input(shape=(seq,), dtype=torch.long, name="attention_mask")
    model = _record(net.eval(), {**inputs, "use_cache": False} if name != "bert" else inputs)
    layers = _attention_layers(model)
    assert len(layers) == 2 and set(layers.values()) == {0.1}
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids}
    if "attention_mask" in inputs:
        kwargs["attention_mask"] = torch.ones(2, 9, dtype=torch.long)
        kwargs["attention_mask"][1, 6:] = 0  # padding
    _assert_equivalent(model, net, kwargs)
    tg.save(model, tmp_path / "model.safetensors")
    loaded = tg.load(tmp_path / "model.safetensors")
    for mode in (True, False):
        loaded.train(mode)
        model.train(mode)
        _assert_same(_outputs(loaded, kwargs), _outputs(model, kwargs))
    fast = tg.optimize(model.eval())
    assert not _attention_layers(fast)
    for a, b in zip(tensor_leaves(fast(**kwargs)), tensor_leaves(net.eval()(**kwargs))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hf.HAS_TRANSFORMERS, reason="transformers is pinned in requirements-dev.txt")
def test_an_attention_module_kept_as_one_layer_saves_once_registered(tmp_path):
    """docs/config_and_saving.md's recipe for a library module kept as one layer (here on purpose)."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertSelfAttention

    tg.register_value_type(BertConfig)
    tg.register_layer(BertSelfAttention, get_config=lambda m: {"config": m.config, "is_causal": m.is_causal,
                                                               "layer_idx": m.layer_idx})
    torch.manual_seed(0)
    net = hf.tiny_bert(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).eval()
    model = tg.from_module(net, {"input_ids": tg.Input(shape=(12,), dtype=torch.long, name="input_ids")},
                           leaf_modules=[BertSelfAttention])
    assert isinstance(model.get_submodule("encoder.layer.0.attention.self"), BertSelfAttention)
    tg.save(model, tmp_path / "model.safetensors")
    loaded = tg.load(tmp_path / "model.safetensors")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    for mode in (True, False):
        _assert_same(_outputs(loaded.train(mode), {"input_ids": ids}), _outputs(net.train(mode), {"input_ids": ids}))


@pytest.mark.skipif(not hf.HAS_TRANSFORMERS, reason="transformers is pinned in requirements-dev.txt")
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_transformers_eager_and_sdpa_attention_of_a_bert_layer(attn_implementation):
    """Eager attention calls F.dropout(weights, p=0.0 in eval, training=module.training): an nn.Dropout
    with the train p. (A whole eager BertModel stops at its mask's torch.finfo of a recorded dtype.)"""
    torch.manual_seed(0)
    bert = hf.tiny_bert(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        attn_implementation=attn_implementation)
    layer = bert.encoder.layer[0]
    model = _record(layer, {"hidden_states": tg.Input(shape=(None, 32), name="hidden_states")})
    added = "dropout_1" if attn_implementation == "eager" else "scaled_dot_product_attention"
    added_layer = model.attention.self.get_submodule(added)
    assert getattr(added_layer, "p", getattr(added_layer, "dropout_p", None)) == 0.1
    _assert_equivalent(model, layer, {"hidden_states": torch.randn(2, 7, 32)})


def test_the_layer_in_a_symbolic_model_keeps_following_the_mode_when_optimized_for_training():
    """tg.optimize(inference=False) inlines custom modules by tracing them; this one stays a call (a
    trace would freeze its training flag), so the optimized model still turns dropout off in eval."""
    q = tg.Input(shape=(2, 5, 4), name="q")
    model = tg.Model(q, SDPA(dropout_p=0.5)(q, q, q))  # positional only: a call the inliner would try
    fast = tg.optimize(model.train(), inference=False)
    assert _attention_layers(fast) == {"scaled_dot_product_attention": 0.5}
    x = torch.randn(3, 2, 5, 4)
    fast.eval()
    torch.testing.assert_close(fast(x), F.scaled_dot_product_attention(x, x, x), rtol=0, atol=0)
    fast.train()
    torch.manual_seed(0)
    expected = F.scaled_dot_product_attention(x, x, x, dropout_p=0.5)
    torch.manual_seed(0)
    torch.testing.assert_close(fast(x), expected, rtol=0, atol=0)
