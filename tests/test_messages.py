"""Build-time errors: raised at the user's line, naming the layer, the shapes, and the fix."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg


def test_linear_mismatch_names_layer_shapes_and_fix():
    """A Linear fed the wrong width says in_features, the received shape (None batch) and the fix."""
    x = tg.Input(shape=(32,))
    with pytest.raises(tg.GraphBuildError) as info:
        tg.name(nn.Linear(64, 10), "head")(x)
    msg = str(info.value)
    assert "Layer 'head'" in msg and "Linear(in_features=64" in msg
    assert "(None, 32)" in msg and "in_features=64" in msg and "nn.Linear(32, 10)" in msg
    assert "test_messages.py" in msg  # the user's line


def test_error_is_not_chained_to_a_torch_traceback():
    """The GraphBuildError is raised from None: no 'During handling of the above exception' chain."""
    x = tg.Input(shape=(32,))
    with pytest.raises(tg.GraphBuildError) as info:
        nn.Linear(64, 10)(x)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_conv_channel_mismatch():
    """Conv2d with the wrong in_channels names in_channels and suggests the right layer."""
    x = tg.Input(shape=(3, 32, 32))
    with pytest.raises(tg.GraphBuildError, match=r"Expected 16 input channels.*received 3.*nn.Conv2d\(3, 8"):
        nn.Conv2d(16, 8, 3)(x)


def test_conv_rank_mismatch():
    """A 2-d input to Conv2d says what rank is expected."""
    x = tg.Input(shape=(32,))
    with pytest.raises(tg.GraphBuildError, match="4-d input"):
        nn.Conv2d(3, 8, 3)(x)


def test_dynamic_dims_are_shown_as_none_not_probe_sizes():
    """Shapes in messages show the batch and None dims as None."""
    x = tg.Input(shape=(None, 7))
    with pytest.raises(tg.GraphBuildError, match=r"\(None, None, 7\)"):
        nn.Linear(8, 2)(x)


def test_batchnorm_layernorm_embedding_hints():
    """Norm layers name num_features/normalized_shape; Embedding asks for integer ids."""
    with pytest.raises(tg.GraphBuildError, match="num_features"):
        nn.BatchNorm2d(8)(tg.Input(shape=(4, 5, 5)))
    with pytest.raises(tg.GraphBuildError, match="normalized_shape"):
        nn.LayerNorm(16)(tg.Input(shape=(10, 8)))
    with pytest.raises(tg.GraphBuildError, match="integer indices.*torch.long"):
        nn.Embedding(10, 4)(tg.Input(shape=(6,)))


def test_function_errors_cat_and_matmul():
    """torch.cat and @ with mismatched shapes name the function and the shapes."""
    a, b = tg.Input(shape=(3, 8)), tg.Input(shape=(4, 9))
    with pytest.raises(tg.GraphBuildError, match=r"'cat'.*\(None, 3, 8\).*\(None, 4, 9\)"):
        torch.cat([a, b], dim=1)
    with pytest.raises(tg.GraphBuildError, match="inner dims"):
        a @ torch.randn(5, 2)


def test_disconnected_graph_names_the_missing_input():
    """Outputs that need an input not given to Model: 'Graph disconnected' naming that input."""
    a, b = tg.Input(shape=(3,), name="image"), tg.Input(shape=(3,), name="meta")
    with pytest.raises(tg.GraphBuildError, match="Graph disconnected.*Input 'meta'"):
        tg.Model(a, a + b)


def test_non_symbolic_inputs_and_outputs():
    """Real tensors as model inputs or outputs are rejected with their index and type."""
    x = tg.Input(shape=(3,))
    with pytest.raises(tg.GraphBuildError, match=r"inputs\[0\].*real tensor"):
        tg.Model(torch.randn(2, 3), x)
    with pytest.raises(tg.GraphBuildError, match=r"outputs\[1\]"):
        tg.Model(x, [x * 2, 5])


def test_unused_input_warns():
    """An input no output depends on gives a warning naming it."""
    a, b = tg.Input(shape=(3,), name="used"), tg.Input(shape=(3,), name="spare")
    with pytest.warns(UserWarning, match="'spare' is not used"):
        tg.Model([a, b], a * 2)


def test_duplicate_layer_names():
    """Two different layers given the same name cannot be in one model."""
    x = tg.Input(shape=(3,))
    y = tg.name(nn.Linear(3, 3), "dense")(tg.name(nn.Linear(3, 3), "dense")(x))
    with pytest.raises(tg.GraphBuildError, match="'dense' is used 2 times"):
        tg.Model(x, y)


def test_reserved_layer_name():
    """A name that would shadow a Module attribute (forward, training...) is refused."""
    x = tg.Input(shape=(3,))
    with pytest.raises(tg.GraphBuildError, match="reserved"):
        tg.Model(x, tg.name(nn.ReLU(), "forward")(x))


def test_failing_module_is_named_with_its_error():
    """A module that fails on meta and on real probes names itself and torch's reason."""
    class Broken(nn.Module):
        def forward(self, x):
            return x.view(7, 11, 13)

    with pytest.raises(tg.GraphBuildError, match=r"Layer Broken\(\).*torch reported"):
        Broken()(tg.Input(shape=(5,)))


def test_call_time_input_checks():
    """The emitted model checks count, rank, static dims and dtype of its inputs, naming the input."""
    img, ids = tg.Input(shape=(3, 8, 8), name="image"), tg.Input(shape=(None,), dtype=torch.long, name="ids")
    model = tg.Model({"image": img, "ids": ids}, img.mean() + ids.float().mean())
    good = dict(image=torch.randn(2, 3, 8, 8), ids=torch.zeros(2, 5, dtype=torch.long))
    model(**good)
    with pytest.raises(ValueError, match=r"input 'image' expects shape \(None, 3, 8, 8\); received \(2, 4, 8, 8\)"):
        model(image=torch.randn(2, 4, 8, 8), ids=good["ids"])
    with pytest.raises(ValueError, match="input 'image' expects shape"):
        model(image=torch.randn(3, 8, 8), ids=good["ids"])
    with pytest.raises(ValueError, match="input 'ids' expects dtype int64; received float32"):
        model(image=good["image"], ids=torch.zeros(2, 5))
    with pytest.raises(TypeError, match=r"takes 2 input\(s\)"):
        model(good["image"])


def test_cast_of_a_model_without_parameters_sets_its_input_dtype():
    """model.half() / .to(bf16) of a parameterless model takes inputs of that dtype, as its code run eagerly does."""
    x = tg.Input(shape=(4,))
    model = tg.Model(x, torch.relu(x) * 2)
    data = torch.randn(2, 4)
    model.to(torch.bfloat16).cpu()                     # the device move keeps the cast
    out = model(data.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.relu(data.bfloat16()) * 2)
    assert model.half()(data.half()).dtype == torch.float16
    model.float()
    with pytest.raises(ValueError, match="input 'input_1' expects dtype float32; received float16"):
        model(data.half())


# ------------------------------------------------------------------ issue 11: errors that point at the mistake

class _Block(nn.Module):
    """A torchvision-style basic block: the mistake is inside it."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv1(x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer3 = nn.Sequential(_Block(3, 16), _Block(32, 16))  # layer3[1] expects 32 channels

    def forward(self, x):
        return self.layer3(x)


def test_failure_inside_a_container_names_the_innermost_layer_by_path():
    """A wrong layer deep inside a subclassed model is named by path, with its shapes and the fix."""
    x = tg.Input(shape=(3, None, None))
    with pytest.raises(tg.GraphBuildError) as info:
        _Net()(x)
    msg = str(info.value)
    assert "Layer _Net()" in msg and "layer3[1].conv1: Conv2d(32, 16" in msg
    assert "(None, 16, None, None) float32" in msg
    assert "Expected 32 input channels (in_channels); received 16" in msg and "nn.Conv2d(16, 16" in msg
    assert "test_messages.py" in msg


def test_failure_inside_sequential_names_the_index():
    """nn.Sequential: the failing step is shown as [i] with the shape it received."""
    x = tg.Input(shape=(3, 8, 8))
    with pytest.raises(tg.GraphBuildError, match=r"\[2\]: Conv2d\(16, 4.*\(None, 8, 6, 6\).*Expected 16 input"):
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))(x)


def test_linear_on_an_unflattened_input_suggests_flatten():
    """Linear(512, 10) on (None, 512, 1, 1) suggests flattening, not nn.Linear(1, 10)."""
    x = tg.Input(shape=(512, 1, 1))
    with pytest.raises(tg.GraphBuildError, match=r"flatten the input first \(x.flatten\(1\).*\(None, 512\)") as info:
        nn.Linear(512, 10)(x)
    assert "nn.Linear(1, 10)" not in str(info.value)
    with pytest.raises(tg.GraphBuildError, match=r"x.flatten\(1\) gives 96 features: nn.Linear\(96, 10\)"):
        nn.Linear(512, 10)(tg.Input(shape=(6, 4, 4)))


@pytest.mark.parametrize("layer", [nn.LSTM(8, 4, batch_first=True), nn.GRU(8, 4, batch_first=True)])
def test_rnn_with_wrong_input_size_is_a_graph_build_error(layer):
    """LSTM/GRU with the wrong input_size: the usual layer/shape/fix message, not a raw RuntimeError."""
    with pytest.raises(tg.GraphBuildError, match=rf"input_size=8; received 6. Fix: nn.{type(layer).__name__}\(6, 4\)"):
        layer(tg.Input(shape=(5, 6)))


def test_numpy_round_trip_says_what_happened_and_as_tensor_works():
    """torch.from_numpy is invisible to torchgraph: the error says so; torch.as_tensor is recorded."""
    import numpy as np

    class FromNumpy(nn.Module):
        def forward(self, x):
            return torch.from_numpy(np.tanh(x.detach().numpy()))

    class AsTensor(nn.Module):
        def forward(self, x):
            return torch.as_tensor(np.tanh(x.detach().numpy()))

    x = tg.Input(shape=(5,))
    with pytest.raises(tg.GraphBuildError, match=r"left torch.*torch.from_numpy.*torch.as_tensor\(array\)"):
        FromNumpy()(x)
    layer = AsTensor()
    model = tg.Model(x, layer(x) * 2)
    inp = torch.randn(3, 5)
    torch.testing.assert_close(model(inp), torch.tanh(inp) * 2)


def test_input_dtype_that_does_not_match_the_layer_is_named():
    """A float32 input into a bfloat16 layer: the message says which dtype the layer expects and the fix."""
    conv = nn.Conv2d(3, 4, 3).to(torch.bfloat16)
    with pytest.raises(tg.GraphBuildError, match=r"Expected a bfloat16 input \(the layer's weights are bfloat16\); "
                                                 r"received float32\. Fix: cast the input"):
        conv(tg.Input(shape=(3, 8, 8)))
