"""tg.clone_model's Keras options (input_tensors, call_function, recursive), names, classes, compile."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg


def mlp():
    x = tg.Input(shape=(4,), name="features")
    return tg.Model(x, nn.Linear(8, 3)(nn.ReLU()(nn.Linear(4, 8)(x))), name="MLP")


def test_input_tensors_rebuild_the_model_on_given_tensors():
    """input_tensors: a new tg.Input renames the input; a layer's output grafts the clone on it."""
    model = mlp()
    fresh_input = tg.Input(shape=(4,), name="pixels")
    renamed = tg.clone_model(model, input_tensors=fresh_input)
    assert renamed.input_names == ["pixels"]
    assert renamed.code == model.code.replace("features", "pixels")

    raw = tg.Input(shape=(6,), name="raw")
    projection = nn.Linear(6, 4)
    head = tg.clone_model(model, lambda layer: layer, input_tensors={"features": projection(raw)})
    full = tg.Model(raw, head.outputs[0])
    x = torch.randn(2, 6)
    assert torch.equal(full(x), model(projection(x)))


def test_input_tensors_are_checked():
    """Wrong counts, names and non-symbolic tensors are clear errors."""
    model = mlp()
    with pytest.raises(ValueError, match="1 input"):
        tg.clone_model(model, input_tensors=[tg.Input(shape=(4,)), tg.Input(shape=(4,))])
    with pytest.raises(ValueError, match="input names"):
        tg.clone_model(model, input_tensors={"other": tg.Input(shape=(4,))})
    with pytest.raises(ValueError, match="symbolic tensor"):
        tg.clone_model(model, input_tensors=torch.zeros(2, 4))
    with pytest.raises(tg.GraphBuildError, match="Linear"):
        tg.clone_model(model, input_tensors=tg.Input(shape=(5,)))


def test_call_function_wraps_every_layer_call():
    """call_function(layer, *args) runs instead of layer(*args): here it clips every layer's output."""
    model = mlp()
    calls = []

    def clipped(layer, *args, **kwargs):
        calls.append(type(layer).__name__)
        return layer(*args, **kwargs).clamp(-0.1, 0.1)

    clone = tg.clone_model(model, lambda layer: layer, call_function=clipped)
    assert calls == ["Linear", "ReLU", "Linear"]
    x = torch.randn(5, 4)
    expected = model.linear_1(model.re_lu(model.linear(x).clamp(-0.1, 0.1)).clamp(-0.1, 0.1)).clamp(-0.1, 0.1)
    assert torch.equal(clone(x), expected)


def test_recursive_clones_nested_models_layer_by_layer():
    """recursive=True hands the inner model's layers to clone_function; False hands the inner model."""
    inner_x = tg.Input(shape=(4,))
    inner = tg.Model(inner_x, nn.Linear(4, 4)(inner_x), name="Inner")
    x = tg.Input(shape=(4,))
    outer = tg.Model(x, nn.Linear(4, 2)(inner(x)))
    seen = []

    def keep(layer):
        seen.append(type(layer).__name__)
        return layer

    deep = tg.clone_model(outer, keep, recursive=True)
    assert seen == ["Linear", "Linear"] and deep.inner is not inner and deep.inner.linear is inner.linear
    seen.clear()
    shallow = tg.clone_model(outer, keep)
    assert seen == ["Inner", "Linear"] and shallow.inner is inner
    with pytest.raises(TypeError, match="recursive"):
        tg.clone_model(outer, recursive="yes")


def test_names_given_in_clone_function_are_kept():
    """A layer named with tg.name inside clone_function keeps that name (state_dict keys follow)."""
    model = mlp()

    def renamed(layer):
        if isinstance(layer, nn.Linear):
            return tg.name(nn.Linear(layer.in_features, layer.out_features), f"dense_{layer.out_features}")
        return layer

    clone = tg.clone_model(model, renamed)
    assert list(clone.state_dict()) == ["dense_8.weight", "dense_8.bias", "dense_3.weight", "dense_3.bias"]


def test_compiled_model_clones_come_back_compiled():
    """A model configured with compile(optimizer=, loss=, metrics=) gives a clone configured alike:
    a new optimizer of the same class and settings, on the clone's parameters."""
    model = mlp()
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), loss="cross_entropy",
                  metrics=["accuracy"])
    clone = tg.clone_model(model)
    assert type(clone.optimizer) is torch.optim.SGD and clone.optimizer is not model.optimizer
    assert clone.optimizer.defaults["lr"] == 0.05 and clone.optimizer.defaults["momentum"] == 0.9
    params = {id(p) for g in clone.optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in clone.parameters()}
    torch.manual_seed(0)
    history = clone.fit(torch.randn(32, 4), torch.randint(0, 3, (32,)), epochs=1, verbose=0)
    assert set(history.history) == {"loss", "accuracy"}
    named = mlp()
    named.compile(optimizer="adam", loss=nn.CrossEntropyLoss(label_smoothing=0.1))
    assert type(tg.clone_model(named).optimizer) is torch.optim.Adam
    assert tg.clone_model(mlp()).optimizer is None  # not compiled: not configured


def test_sequential_clones_stay_sequential():
    """Built and unbuilt tg.Sequential clones are tg.Sequential, and add/pop work on them."""
    seq = tg.Sequential([tg.Input(shape=(4,)), nn.Linear(4, 8), nn.ReLU()], name="Stack")
    clone = tg.clone_model(seq)
    assert isinstance(clone, tg.Sequential) and clone.code == seq.code and type(clone).__name__ == "Stack"
    clone.add(nn.Linear(8, 2))
    assert clone(torch.randn(3, 4)).shape == (3, 2) and isinstance(clone.pop(), nn.Linear)
    unbuilt = tg.clone_model(tg.Sequential([nn.Linear(4, 8), nn.ReLU()]))
    assert isinstance(unbuilt, tg.Sequential) and not unbuilt.built and len(unbuilt.layers) == 2
    assert unbuilt(torch.randn(2, 4)).shape == (2, 8)


def test_a_from_module_model_clones_with_its_whole_state():
    """nanoGPT through tg.from_module: the clone has its module paths, its unused submodules, its
    non-persistent constant and its tied lm_head/wte weights, fresh or shared with the original."""
    import copy

    from community_models import ARCHITECTURES

    arch = ARCHITECTURES["nanogpt"]
    net = arch.make_model().eval()
    model = tg.from_module(net, {"idx": tg.Input(shape=(arch.seq_len,), dtype=torch.long, name="idx")})
    idx = arch.make_inputs()[0]
    for clone_function in (None, lambda layer: layer, copy.deepcopy):
        clone = tg.clone_model(model, clone_function).eval()
        assert list(clone.state_dict()) == list(model.state_dict()) == list(net.state_dict())
        assert {n for n, _ in clone.named_modules()} == {n for n, _ in model.named_modules()}
        assert clone.lm_head.weight is clone.transformer.wte.weight
        assert sum(p.numel() for p in clone.parameters()) == sum(p.numel() for p in net.parameters())
        clone.load_state_dict(net.state_dict())
        assert torch.equal(clone(idx)[0], net(idx)[0])
    half = tg.clone_model(model, lambda layer: layer if layer is model.lm_head else copy.deepcopy(layer))
    assert half.lm_head is model.lm_head and model.lm_head.weight is model.transformer.wte.weight
