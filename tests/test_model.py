"""tg.Model: input/output structures, names, shared layers, nesting and introspection."""

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg


def _two_layer(name=None):
    x = tg.Input(shape=(4,))
    h = F.relu(nn.Linear(4, 8)(x))
    return tg.Model(x, nn.Linear(8, 2)(h), name=name)


def test_model_is_a_graph_module_with_readable_code():
    """The result is an fx.GraphModule (a tg.Model) whose code frees values after last use."""
    model = _two_layer(name="Tiny")
    assert isinstance(model, fx.GraphModule) and isinstance(model, tg.Model)
    assert type(model).__name__ == "Tiny"
    assert "def forward(self, input_1)" in model.code
    assert "linear = None" in model.code  # freed after last use, like handwritten code
    assert "forward" in type(model).__dict__  # a real class-level forward


def test_dict_inputs_become_keyword_arguments_and_outputs_keep_structure():
    """Dict inputs -> forward keyword args (positional also works); dict/list outputs keep structure."""
    image, meta = tg.Input(shape=(3,)), tg.Input(shape=(2,))
    joint = torch.cat([image, meta], dim=1)
    model = tg.Model({"image": image, "meta": meta}, {"logits": joint * 2, "aux": [joint, meta]})
    i, m = torch.randn(5, 3), torch.randn(5, 2)
    by_kw = model(image=i, meta=m)
    by_pos = model(i, m)
    assert set(by_kw) == {"logits", "aux"} and isinstance(by_kw["aux"], list)
    torch.testing.assert_close(by_kw["logits"], by_pos["logits"])
    torch.testing.assert_close(by_kw["aux"][1], m)
    assert model.input_names == ["image", "meta"] and model.output_names == ["logits", "aux_0", "aux_1"]


def test_tuple_outputs_and_input_names():
    """Named inputs name forward's arguments; tuple outputs come back as a tuple."""
    a = tg.Input(shape=(2,), name="left")
    b = tg.Input(shape=(2,))
    model = tg.Model([a, b], (a + b, a - b))
    assert model.input_names == ["left", "input_1"]
    out = model(left=torch.ones(1, 2), input_1=torch.ones(1, 2))
    assert isinstance(out, tuple) and len(out) == 2


def test_layer_names_are_readable_and_stable_across_rebuilds():
    """Automatic names follow class names with counters, and the same code gives the same names."""
    def build():
        x = tg.Input(shape=(3, 8, 8))
        h = nn.BatchNorm2d(4)(nn.Conv2d(3, 4, 3)(x))
        h = nn.Conv2d(4, 4, 3)(h)
        return tg.Model(x, nn.Linear(4, 2)(h.mean((2, 3))))

    names = [n for n, _ in build().named_children()]
    assert names == ["conv2d", "batch_norm2d", "conv2d_1", "linear"]
    assert names == [n for n, _ in build().named_children()]
    assert list(build().state_dict())[:2] == ["conv2d.weight", "conv2d.bias"]


def test_user_names_set_submodule_and_state_dict_prefix():
    """tg.name(layer, name) sets the submodule name and the state_dict prefix."""
    x = tg.Input(shape=(4,))
    model = tg.Model(x, tg.name(nn.Linear(4, 2), "classifier")(F.relu(tg.name(nn.Linear(4, 4), "encoder")(x))))
    assert [n for n, _ in model.named_children()] == ["encoder", "classifier"]
    assert "classifier.weight" in model.state_dict()


def test_shared_layer_is_stored_once():
    """A layer called twice is one submodule; its parameters are counted once."""
    shared = nn.Linear(4, 4)
    a, b = tg.Input(shape=(4,)), tg.Input(shape=(4,))
    model = tg.Model([a, b], shared(a) + shared(b))
    assert len(list(model.children())) == 1
    assert sum(p.numel() for p in model.parameters()) == 20
    calls = [n.name for n in model.graph.nodes if n.op == "call_module"]
    assert calls == ["linear", "linear_call_1"]
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(model(x, y), shared(x) + shared(y))


def test_nested_models_every_way():
    """tg.Model inside tg.Model, inside a subclassed module, and inside nn.Sequential."""
    inner = _two_layer()
    x = tg.Input(shape=(4,))
    outer = tg.Model(x, F.softmax(inner(x), dim=-1))
    assert [n.op for n in outer.graph.nodes].count("call_module") == 1
    assert outer.get_layer("model") is inner

    class UserModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = outer

        def forward(self, t):
            return self.body(t).argmax(-1)

    inp = torch.randn(3, 4)
    assert UserModule()(inp).shape == (3,)
    seq = nn.Sequential(inner, nn.ReLU())
    torch.testing.assert_close(seq(inp), F.relu(inner(inp)))
    y = tg.Model(x, seq(x))
    torch.testing.assert_close(y(inp), seq(inp))


def test_introspection_and_feature_extractor_shares_weights():
    """inputs/outputs/layers/get_layer/get_output; a feature extractor shares the layers."""
    x = tg.Input(shape=(3, 16, 16))
    c1 = nn.Conv2d(3, 4, 3)(x)
    c2 = nn.Conv2d(4, 8, 3)(F.relu(c1))
    model = tg.Model(x, nn.Linear(8, 2)(c2.mean((2, 3))))
    assert model.inputs[0] is x and model.outputs[0].static_shape == (None, 2)
    assert [type(m).__name__ for m in model.layers] == ["Conv2d", "Conv2d", "Linear"]
    assert model.get_output("conv2d_1").static_shape == (None, 8, 12, 12)
    features = tg.Model(model.inputs, model.get_output("conv2d_1"))
    assert features.conv2d_1 is model.conv2d_1
    inp = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(features(inp), model.conv2d_1(F.relu(model.conv2d(inp))))
    try:
        model.get_layer("nope")
    except ValueError as e:
        assert "conv2d_1" in str(e)


def test_introspection_survives_deepcopy():
    """After a deepcopy, inputs/get_output are rebuilt from the graph and share the copy's layers."""
    import copy

    model = _two_layer()
    clone = copy.deepcopy(model)
    assert clone.inputs[0].static_shape == (None, 4)
    head = tg.Model(clone.get_output("relu"), clone.outputs[0])
    assert head.linear_1 is clone.linear_1
    assert head(torch.randn(2, 8)).shape == (2, 2)


def test_model_from_intermediate_inputs():
    """Any symbolic tensor can be a model input: the model starts there (a head)."""
    x = tg.Input(shape=(4,))
    h = nn.Linear(4, 6)(x)
    y = nn.Linear(6, 2)(F.relu(h))
    head = tg.Model(h, y)
    assert [n.op for n in head.graph.nodes].count("call_module") == 1
    assert head(torch.randn(3, 6)).shape == (3, 2)


def test_layer_attributes_follow_every_submodule_change():
    """Layers are plain attributes (fast lookup in forward) that follow setattr/add_module/delattr."""
    import copy
    import pickle

    model = _two_layer()
    assert model.__dict__["linear"] is model._modules["linear"]
    replacement = nn.Linear(8, 2)
    model.linear_1 = replacement
    assert model.linear_1 is replacement and model._modules["linear_1"] is replacement
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), replacement(F.relu(model.linear(x))))
    other = nn.Linear(8, 2)
    model.register_module("linear_1", other)
    assert model.linear_1 is other
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.linear is clone._modules["linear"] and clone.linear is not model.linear
    del model.linear_1
    assert not hasattr(model, "linear_1")


def test_sequential_pop_leaves_no_stale_layer_attribute():
    """After Sequential.pop() the removed layer is no longer an attribute."""
    seq = tg.Sequential([tg.Input(shape=(4,)), nn.Linear(4, 4), nn.Linear(4, 2)])
    names = [n for n, _ in seq.named_children()]
    seq.pop()
    assert not hasattr(seq, names[-1]) and seq(torch.randn(2, 4)).shape == (2, 4)


# ------------------------------------------------------------------ issue 11: checks across inputs

def test_inputs_sharing_the_batch_must_agree_at_call_time():
    """Two inputs share the batch: batch 2 with batch 1 is a ValueError naming both, not a broadcast."""
    import pytest

    a, b = tg.Input((3,), name="a"), tg.Input((3,), name="b")
    model = tg.Model([a, b], a + b)
    model(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"inputs 'a' and 'b' share the batch dim.*received 2 and 1"):
        model(torch.ones(2, 3), torch.ones(1, 3))


def test_inputs_sharing_a_named_dim_must_agree_at_call_time():
    """A named dim ('T') used by two inputs must have one size per call; the error names the dim."""
    import pytest

    ids, mask = tg.Input(("T",), dtype=torch.long, name="ids"), tg.Input(("T",), name="mask")
    model = tg.Model({"ids": ids, "mask": mask}, nn.Embedding(10, 4)(ids) * mask.unsqueeze(-1))
    assert model(ids=torch.zeros(2, 5, dtype=torch.long), mask=torch.ones(2, 5)).shape == (2, 5, 4)
    with pytest.raises(ValueError, match=r"inputs 'ids' and 'mask' share 'T' \(dim 1 of 'ids', dim 1 of "
                                         r"'mask'\).*received 5 and 1"):
        model(ids=torch.zeros(2, 5, dtype=torch.long), mask=torch.ones(2, 1))


def test_bounded_dims_are_checked_at_call_time():
    """tg.Dim('T', max=8): a call with T=9 names the input, the dim and the bound."""
    import pytest

    x = tg.Input((tg.Dim("T", min=2, max=8), 4), name="tokens")
    model = tg.Model(x, x.relu())
    assert model(torch.randn(1, 8, 4)).shape == (1, 8, 4)
    with pytest.raises(ValueError, match=r"input 'tokens' dim 1 \('T'\) must satisfy 2 <= size <= 8.*received 9"):
        model(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match=r"received 1"):
        model(torch.randn(1, 1, 4))
