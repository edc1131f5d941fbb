"""tg.Input, SymbolicTensor and SymbolicInt: shapes, dynamic dims, and what cannot be done at build."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg


def test_input_shape_has_dynamic_batch():
    """The batch dim is dynamic (None); declared dims are kept."""
    x = tg.Input(shape=(3, 32, 32))
    assert x.static_shape == (None, 3, 32, 32)
    assert repr(x.shape) == "(None, 3, 32, 32)"
    assert x.dtype == torch.float32 and x.dim() == 4 and x.ndim == 4


def test_input_is_a_tensor_for_isinstance_checks():
    """Third-party code doing isinstance(x, torch.Tensor) accepts symbolic tensors."""
    assert isinstance(tg.Input(shape=(4,)), torch.Tensor)


def test_none_and_named_dims_are_dynamic():
    """None marks an independent dynamic dim; a string names one shared across inputs."""
    tokens = tg.Input(shape=(None,), dtype=torch.long)
    assert tokens.static_shape == (None, None) and tokens.dtype == torch.int64
    a = tg.Input(shape=("T", 8))
    b = tg.Input(shape=("T", 8))
    assert (a + b).static_shape == (None, "T", 8)


def test_independent_none_dims_cannot_be_mixed():
    """Two different None dims are not assumed equal: adding them fails at build time."""
    a = tg.Input(shape=(None, 8))
    b = tg.Input(shape=(None, 8))
    with pytest.raises(tg.GraphBuildError, match="add"):
        a + b


@pytest.mark.parametrize("shape", ["abc", (3, -1), (3, 2.5), [True]])
def test_bad_input_shape_is_rejected(shape):
    """Bad shapes get a GraphBuildError that echoes them."""
    with pytest.raises(tg.GraphBuildError, match="tg.Input"):
        tg.Input(shape=shape)


def test_bad_input_name_and_dtype_are_rejected():
    """Input names become forward() arguments: they must be identifiers."""
    with pytest.raises(tg.GraphBuildError, match="identifier"):
        tg.Input(shape=(3,), name="not valid")
    with pytest.raises(tg.GraphBuildError, match="dtype"):
        tg.Input(shape=(3,), dtype="float32")


def test_static_sizes_are_plain_ints():
    """x.shape[1] of a static dim is an int, usable to size layers."""
    x = tg.Input(shape=(16,))
    assert x.shape[1] == 16 and isinstance(x.shape[-1], int)
    y = nn.Linear(x.shape[-1], 4)(x)
    assert y.static_shape == (None, 4)


def test_dynamic_size_is_symbolic_and_recorded():
    """x.size(0) is a SymbolicInt; shape arithmetic on it is recorded in the model."""
    x = tg.Input(shape=(4, 6))
    b = x.size(0)
    assert isinstance(b, tg.SymbolicInt)
    y = x.view(b * 4, 6)
    model = tg.Model(x, y)
    assert "size" in model.code
    for batch in (1, 3, 9):
        assert model(torch.randn(batch, 4, 6)).shape == (batch * 4, 6)


@pytest.mark.parametrize("action, match", [
    (lambda x: bool(x), "__bool__"),
    (lambda x: len(x), "len"),
    (lambda x: int(x.size(0)), "int"),
    (lambda x: [t for t in x], "Iterating"),
    (lambda x: x.item(), "item"),
    (lambda x: bool(x.size(0) == 3), "different answer for different"),
    (lambda x: range(x.shape[0]), "Python int"),
    (lambda x: x.numpy(), "numpy"),
])
def test_data_dependent_use_raises_clearly(action, match):
    """bool/len/int/iteration over the batch/item/numpy raise a GraphBuildError, not a torch error."""
    x = tg.Input(shape=(4,))
    with pytest.raises(tg.GraphBuildError, match=match):
        action(x)


def test_iteration_over_a_static_dim_is_recorded():
    """Iterating over a static dim unbinds it (recorded)."""
    x = tg.Input(shape=(3, 5))
    parts = list(x.transpose(0, 1))
    assert len(parts) == 3 and parts[0].static_shape == (None, 5)
    model = tg.Model(x, torch.stack(parts, dim=1))
    inp = torch.randn(2, 3, 5)
    torch.testing.assert_close(model(inp), inp)


def test_symbolic_tensor_cannot_be_pickled():
    """A symbolic tensor only exists while building: pickling it is a clear TypeError."""
    import pickle

    with pytest.raises(TypeError, match="building"):
        pickle.dumps(tg.Input(shape=(2,)))
