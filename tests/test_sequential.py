"""tg.Sequential: a tg.Model built from a list of layers; add/pop re-emit it; deferred build."""

import copy
import doctest
import io
import pickle

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
import torchgraph.sequential


def keras_example():
    return tg.Sequential([tg.Input(shape=(784,)), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)])


def test_builds_a_model_equal_to_handwritten_code():
    """The issue's example: a tg.Model whose forward is the layers applied in order."""
    model = keras_example()
    assert isinstance(model, tg.Model) and isinstance(model, tg.Sequential)
    assert isinstance(model, torch.fx.GraphModule) and type(model).__name__ == "Sequential"
    first, relu, last = model.layers
    x = torch.randn(5, 784)
    torch.testing.assert_close(model(x), last(relu(first(x))))
    assert [n.op for n in model.graph.nodes] == ["placeholder", "call_module", "call_module",
                                                   "call_module", "output"]
    assert repr(model.outputs[0].shape) == "(None, 10)"
    assert model.input_names == ["input_1"] and model.output_names == ["output"]
    assert model.get_layer("linear_1") is last
    assert tg.Model(model.inputs, model.get_output("re_lu"))(x).shape == (5, 128)


def test_mismatched_layer_raises_naming_it():
    """A layer that cannot take the previous output fails at build time, named by position and name."""
    with pytest.raises(tg.GraphBuildError) as info:
        tg.Sequential([tg.Input(shape=(784,)), nn.Linear(784, 128), nn.ReLU(), nn.Linear(64, 10)])
    message = str(info.value)
    assert "tg.Sequential 'Sequential', layer 3 'linear_1' (Linear)" in message
    assert "in_features=64" in message and "(None, 128)" in message
    assert "nn.Linear(128, 10)" in message  # the fix


def test_input_shape_and_typed_input():
    """input_shape builds a float input; a tg.Input first gives the dtype and the name."""
    model = tg.Sequential([nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(8, 4)], input_shape=(3, None, None), name="Cnn")
    assert type(model).__name__ == "Cnn"
    assert model(torch.randn(2, 3, 20, 31)).shape == (2, 4)
    assert repr(model.inputs[0].shape) == "(None, 3, None, None)"
    tokens = tg.Sequential([tg.Input(shape=(None,), dtype=torch.long, name="tokens"),
                            nn.Embedding(50, 8), lambda h: h.mean(dim=1), nn.Linear(8, 2)])
    assert tokens.input_names == ["tokens"]
    assert tokens(torch.randint(0, 50, (3, 7))).shape == (3, 2)
    assert "mean = embedding.mean(dim = 1)" in tokens.code  # the lambda's ops are recorded, not kept


def test_add_re_emits_the_same_object():
    """add() appends in place: same object, new graph, new parameters, old names unchanged."""
    model = keras_example()
    ident, keys = id(model), list(model.state_dict())
    assert model.add(nn.Softmax(dim=-1)) is None
    assert id(model) == ident
    assert list(model.state_dict()) == keys
    out = model(torch.randn(4, 784))
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(4))
    model.add(nn.Linear(10, 3))
    assert model(torch.randn(4, 784)).shape == (4, 3)
    assert list(model.state_dict()) == keys + ["linear_2.weight", "linear_2.bias"]
    assert model.meta["torchgraph_sequential"]["steps"] == ["input_1", "linear", "re_lu", "linear_1",
                                                            "softmax", "linear_2"]


def test_failed_add_leaves_the_model_unchanged():
    """A mismatched add raises and changes nothing."""
    model = keras_example()
    code, layers = model.code, model.layers
    with pytest.raises(tg.GraphBuildError, match=r"layer 4 'linear_2' \(Linear\).*in_features=5"):
        model.add(nn.Linear(5, 3))
    assert model.code == code and model.layers == layers
    assert model(torch.randn(2, 784)).shape == (2, 10)


def test_add_keeps_hooks_training_flag_and_custom_names():
    """Re-emitting keeps forward hooks, eval mode, and tg.name'd layer names."""
    model = tg.Sequential([tg.name(nn.Linear(4, 4), "encoder"), nn.Dropout(0.5)], input_shape=(4,))
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    model.eval()
    model.add(tg.name(nn.Linear(4, 2), "head"))
    assert not model.training
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), model(x))  # dropout is off
    assert calls == [(3, 2), (3, 2)]
    assert [n for n, _ in model.named_children()] == ["encoder", "dropout", "head"]


def test_pop_removes_the_last_layer():
    """pop() returns the removed layer and re-emits the graph; popping to the input is allowed."""
    model = keras_example()
    last = model.layers[-1]
    assert model.pop() is last
    assert model(torch.randn(2, 784)).shape == (2, 128)
    model.pop()
    model.pop()
    assert model(torch.randn(2, 784)).shape == (2, 784)  # identity: only the input is left
    with pytest.raises(tg.GraphBuildError, match="no layers left"):
        model.pop()


def test_add_input_to_an_empty_sequential():
    """Keras style: Sequential(), add(Input), add(layer)..."""
    model = tg.Sequential(name="Built")
    model.add(tg.Input(shape=(6,)))
    model.add(nn.Linear(6, 3))
    model.add(nn.Tanh())
    assert model(torch.randn(2, 6)).shape == (2, 3)
    with pytest.raises(tg.GraphBuildError, match="can only be added first"):
        model.add(tg.Input(shape=(3,)))


def test_deferred_build_on_first_call():
    """Without an input the model is unbuilt; the first tensor it sees builds it (dims fixed, batch free)."""
    model = tg.Sequential([nn.Linear(4, 8), nn.ReLU()])
    assert not model.built and isinstance(model, tg.Model)
    assert sum(p.numel() for p in model.parameters()) == 40  # layers are registered already
    model.add(nn.Linear(8, 2))
    first = model.layers[0]
    model.to(torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    out = model(x)
    assert model.built and out.shape == (3, 2) and out.dtype == torch.float64
    assert model.layers[0] is first and repr(model.inputs[0].shape) == "(None, 4)"
    assert model(torch.randn(7, 4, dtype=torch.float64)).shape == (7, 2)
    with pytest.raises(ValueError, match=r"expects shape \(None, 4\)"):
        model(torch.randn(2, 5, dtype=torch.float64))


def test_deferred_build_from_build_and_from_symbolic_call():
    """build(input_shape), or calling it on a symbolic tensor while building a bigger model."""
    model = tg.Sequential([nn.Linear(4, 2)])
    with pytest.raises(ValueError, match="no inputs yet"):
        model.summary()
    model.build((4,))
    assert repr(model.outputs[0].shape) == "(None, 2)"
    with pytest.raises(tg.GraphBuildError, match="already built"):
        model.build((4,))

    block = tg.Sequential([nn.Linear(4, 4), nn.ReLU()], name="Block")
    x = tg.Input(shape=(4,))
    outer = tg.Model(x, nn.Linear(4, 1)(block(x)))
    assert block.built
    assert [n.target for n in outer.graph.nodes if n.op == "call_module"] == ["block", "linear"]
    assert outer(torch.randn(3, 4)).shape == (3, 1)
    lines = []
    outer.summary(print_fn=lines.append, expand_nested=True)
    assert "| linear (Linear)" in lines[0]


def test_unbuilt_call_needs_one_tensor():
    """An unbuilt model called on something else says how to build it."""
    with pytest.raises(TypeError, match="not built yet"):
        tg.Sequential([nn.Linear(2, 2)])("not a tensor")


def test_copy_and_pickle_keep_the_class_and_allow_add():
    """deepcopy, pickle and torch.save give back a Sequential that can still add() and pop()."""
    model = tg.Sequential([tg.name(nn.Linear(4, 8), "encoder"), nn.ReLU()], input_shape=(4,),
                          name="Small")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                   torch.load(buffer, weights_only=False)):
        assert isinstance(copied, tg.Sequential) and type(copied).__name__ == "Small"
        x = torch.randn(2, 4)
        torch.testing.assert_close(copied(x), model(x))
        copied.add(nn.Linear(8, 3))
        assert [n for n, _ in copied.named_children()] == ["encoder", "re_lu", "linear"]
        assert copied(x).shape == (2, 3)
        assert isinstance(copied.pop(), nn.Linear)
    unbuilt = tg.Sequential([nn.Linear(2, 3)], name="Later")
    for copied in (copy.deepcopy(unbuilt), pickle.loads(pickle.dumps(unbuilt))):
        assert isinstance(copied, tg.Sequential) and not copied.built
        assert copied(torch.randn(1, 2)).shape == (1, 3)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_is_a_plain_graph_module_for_torch_tools():
    """fx tracing and TorchScript see an ordinary GraphModule."""
    model = keras_example()
    x = torch.randn(2, 784)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("layers, message", [
    ([nn.ReLU, nn.Linear(4, 2)], r"element 0 is the class nn.ReLU.*did you mean nn.ReLU\(...\)"),
    ([nn.Linear(4, 2), "relu"], r"element 1 is a str. Expected an nn.Module"),
    ([nn.Linear(4, 4), tg.Input(shape=(4,))], r"element 1 is a symbolic tensor"),
    ([nn.LSTM(4, 4, batch_first=True), nn.Linear(4, 2)], r"layer 1 'lstm' \(LSTM\) returned a tuple of 2"),
    ([nn.Linear(4, 4), lambda h: h.item()], r"step 2 \(<lambda>\)"),
])
def test_bad_layers(layers, message):
    """Non-layers, classes, an Input in the middle, tuple outputs and failing callables are named."""
    with pytest.raises(tg.GraphBuildError, match=message):
        tg.Sequential(layers, input_shape=(5, 4))


def test_bad_arguments():
    """A single layer instead of a list, an Input plus input_shape, a bad name, a computed first tensor."""
    with pytest.raises(tg.GraphBuildError, match="must be a list of layers"):
        tg.Sequential(nn.Linear(2, 2))
    with pytest.raises(tg.GraphBuildError, match="both a tg.Input and input_shape"):
        tg.Sequential([tg.Input(shape=(2,)), nn.Linear(2, 2)], input_shape=(2,))
    with pytest.raises(tg.GraphBuildError, match="name must be a Python identifier"):
        tg.Sequential([nn.Linear(2, 2)], name="my model")
    x = tg.Input(shape=(2,))
    with pytest.raises(tg.GraphBuildError, match="first element must be a tg.Input"):
        tg.Sequential([nn.Linear(2, 2)(x), nn.ReLU()])
    with pytest.raises(TypeError, match="unexpected keyword"):
        tg.Sequential([nn.Linear(2, 2)], input_dim=2)


def test_summary_and_plot_of_a_sequential(tmp_path):
    """A Sequential has every Model feature, including summary and plot."""
    model = keras_example()
    lines = []
    model.summary(print_fn=lines.append)
    assert "Total params: 101,770" in lines[0] and "Connected to" not in lines[0]
    tg.plot_model(model, to_file=tmp_path / "seq.svg")
    assert "re_lu" in (tmp_path / "seq.svg").read_text()


def test_docstring_examples():
    """The Example sections of sequential.py run."""
    assert doctest.testmod(torchgraph.sequential).failed == 0


# ---------------------------------------------------------------------------------------------
# Configs and files: a Sequential comes back as a Sequential
# ---------------------------------------------------------------------------------------------

def test_unbuilt_sequential_round_trips_unbuilt(tmp_path):
    """An unbuilt Sequential's config lists its layers (not `"layers": []`) and revives unbuilt."""
    model = tg.Sequential([nn.Linear(4, 8), nn.ReLU(), torch.tanh], name="Pending")
    config = model.get_config()
    assert [e["class"] for e in config["layers"]] == ["torch.nn.Linear", "torch.nn.ReLU"]
    assert config["steps"] == [{"layer": "linear"}, {"layer": "re_lu"}, {"function": "torch.tanh"}]
    revived = tg.Model.from_config(config)
    assert isinstance(revived, tg.Sequential) and not revived.built and type(revived).__name__ == "Pending"
    revived.add(nn.Linear(8, 2))
    assert revived(torch.randn(3, 4)).shape == (3, 2)
    assert tg.model_from_json(model.to_json()).layers[0].out_features == 8


def test_built_sequential_revives_with_add_and_pop(tmp_path):
    """from_config, tg.load and model_from_json give a tg.Sequential whose add/pop work."""
    model = tg.Sequential([tg.Input(shape=(4,)), nn.Linear(4, 8), nn.ReLU()], name="Stack").eval()
    tg.save(model, tmp_path / "stack.safetensors")
    for revived in (tg.Model.from_config(model.get_config()), tg.load(tmp_path / "stack.safetensors"),
                    tg.Sequential.from_config(model.get_config())):
        assert isinstance(revived, tg.Sequential) and revived.code == model.code
        revived.add(nn.Linear(8, 3))
        assert revived(torch.randn(2, 4)).shape == (2, 3)
        assert isinstance(revived.pop(), nn.Linear) and isinstance(revived.pop(), nn.ReLU)
        assert revived.outputs[0].static_shape == (None, 8)
    loaded = tg.load(tmp_path / "stack.safetensors")
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))


def test_sequential_config_steps_are_validated():
    """Steps that do not name the chain's nodes are a clear error."""
    config = tg.Sequential([tg.Input(shape=(4,)), nn.Linear(4, 8)]).get_config()
    config["steps"] = ["input_1", "nowhere"]
    with pytest.raises(ValueError, match="'steps' must name its input"):
        tg.Model.from_config(config)
    config["steps"] = [{"layer": "missing"}]
    config["inputs"] = []
    with pytest.raises(ValueError):
        tg.Model.from_config(config)
