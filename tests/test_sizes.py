"""Shape arithmetic at the top level: dynamic sizes, conditions on them (guards), device and dtype."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg


def test_arange_with_the_input_device_is_recorded():
    """torch.arange(0, T, device=x.device), as nanoGPT writes it, follows T at every call."""
    x = tg.Input(shape=(None, 4))
    b, t, _ = x.size()
    pos = torch.arange(0, t, dtype=torch.long, device=x.device)
    model = tg.Model(x, nn.Embedding(300, 4)(pos) + x)
    assert "arange" in model.code and "device" in model.code
    for length in (1, 7, 200):
        inp = torch.randn(2, length, 4)
        assert model(inp).shape == (2, length, 4)


def test_factories_follow_the_model_device_and_dtype():
    """torch.zeros(B, 1, W, dtype=x.dtype, device=x.device) follows model.to(meta) and .to(float64)."""
    x = tg.Input(shape=(3, None))
    b, w = x.size(0), x.size(2)
    padded = torch.cat([torch.zeros(b, 1, w, dtype=x.dtype, device=x.device), x], dim=1)
    model = tg.Model(x, nn.Linear(4, 2)(padded.transpose(1, 2)))
    inp = torch.randn(2, 3, 5)
    assert model(inp).shape == (2, 5, 2)
    out64 = model.to(torch.float64)(inp.double())
    assert out64.dtype == torch.float64
    meta = model.to("meta")(torch.empty(4, 3, 6, dtype=torch.float64, device="meta"))
    assert meta.device.type == "meta" and meta.shape == (4, 6, 2)


def test_device_and_dtype_compare_like_the_real_ones():
    """x.device / x.dtype at the top level compare equal to cpu / float32 and forward attributes."""
    x = tg.Input(shape=(4,))
    assert x.dtype == torch.float32 and torch.float32 == x.dtype and x.dtype in {torch.float32}
    assert x.dtype.is_floating_point and str(x.dtype) == "torch.float32" and repr(x.dtype) == "torch.float32"
    assert x.device == torch.device("cpu") and x.device.type == "cpu" and str(x.device) == "cpu"
    layer = nn.Linear(4, 2, device=x.device, dtype=x.dtype)  # torch's own code gets real values
    assert layer.weight.device.type == "cpu" and not isinstance(layer.weight, tg.SymbolicTensor)
    assert torch.finfo(x.dtype.value).bits == 32


def test_real_tensor_cast_to_the_input_dtype_follows_it():
    """table.to(x.dtype) at the top level is recorded, so it follows model.to(torch.float64)."""
    table = torch.randn(4)
    x = tg.Input(shape=(4,))
    model = tg.Model(x, x * table.to(x.dtype))
    out = model.to(torch.float64)(torch.ones(2, 4, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_narrow_and_slices_of_symbolic_tensors_by_dynamic_sizes():
    """x.narrow(1, 0, T - 1) and x[:, :T // 2] record the arithmetic and follow T."""
    x = tg.Input(shape=(None, 3))
    t = x.size(1)
    model = tg.Model(x, [x.narrow(1, 0, t - 1), x[:, : t // 2], x.view(x.size(0), t * 3)])
    for length in (2, 5, 9):
        inp = torch.randn(2, length, 3)
        a, b, c = model(inp)
        torch.testing.assert_close(a, inp[:, : length - 1])
        torch.testing.assert_close(b, inp[:, : length // 2])
        torch.testing.assert_close(c, inp.reshape(2, -1))


@pytest.mark.parametrize("code", [
    lambda t, x, table: torch.arange(t),
    lambda t, x, table: table.narrow(0, 0, t),
    lambda t, x, table: table[:t],
])
def test_sizes_torch_converts_to_numbers_are_clear_errors(code):
    """A dynamic size where torch only takes a plain number: a GraphBuildError with the recordable form."""
    x = tg.Input(shape=(None,))
    with pytest.raises(tg.GraphBuildError, match=r"device=x.device.*nn.Module's forward") as info:
        code(x.size(1), x, torch.randn(64, 4))
    assert "test_sizes.py" in str(info.value)


def test_assert_on_a_dynamic_size_records_a_runtime_check():
    """`assert T >= 2` holds at both probe sizes: it is recorded and checked when the model runs."""
    x = tg.Input(shape=(None,))
    t = x.size(1)
    assert t >= 2
    model = tg.Model(x, x * 2)
    assert "_assert" in model.code
    assert model(torch.ones(1, 3)).shape == (1, 3)
    with pytest.raises(AssertionError, match=r"`assert t >= 2` \(test_sizes.py:\d+\) was True"):
        model(torch.ones(1, 1))


def test_branch_on_a_dynamic_size_follows_the_build_and_is_checked():
    """`if T > 1000:` is False at both probes: the False branch is recorded with a check."""
    x = tg.Input(shape=(None,))
    y = x * 3 if x.size(1) > 1000 else x * 2
    model = tg.Model(x, y)
    torch.testing.assert_close(model(torch.ones(1, 5)), torch.full((1, 5), 2.0))
    with pytest.raises(AssertionError, match="these inputs give the other answer"):
        model(torch.ones(1, 1001))


def test_condition_with_different_answers_names_the_line():
    """A condition that is True for some sizes and False for others cannot be one recorded program."""
    x = tg.Input(shape=(None,))
    with pytest.raises(tg.GraphBuildError, match=r"`if x.size\(1\) > 64:` \(at test_sizes.py:\d+\).*tg.Dim"):
        if x.size(1) > 64:
            pass


def test_bounded_dim_makes_the_block_size_assert_hold():
    """nanoGPT's `assert t <= block_size` builds once T is bounded by block_size."""
    block_size = 16
    idx = tg.Input(shape=(tg.Dim("T", max=block_size),), dtype=torch.long)
    b, t = idx.size()
    assert t <= block_size
    model = tg.Model(idx, nn.Embedding(10, 4)(idx))
    assert model(torch.zeros(2, block_size, dtype=torch.long)).shape == (2, block_size, 4)
    with pytest.raises(ValueError, match="must satisfy"):
        model(torch.zeros(2, block_size + 1, dtype=torch.long))


def test_guard_survives_save_and_reload_of_the_graph():
    """Guards are kept by deepcopy/pickle and by models rebuilt from a model's symbolic handles."""
    import copy

    x = tg.Input(shape=(None,))
    assert x.size(1) >= 2
    model = tg.Model(x, x + 1)
    again = tg.Model(model.inputs, model.outputs)
    for m in (copy.deepcopy(model), again):
        with pytest.raises(AssertionError):
            m(torch.ones(1, 1))


def test_assert_failing_at_the_probe_sizes_says_to_bound_the_dim():
    """An unbounded T probed at 34..127 fails `assert t <= 32`: a GraphBuildError with the fix, not the
    user's AssertionError about sizes the model was never given."""
    x = tg.Input(shape=(None,))
    t = x.size(1)
    with pytest.raises(tg.GraphBuildError, match=r"`assert t <= 32` \(at test_sizes.py:\d+\) fails at the sizes "
                                                 r"torchgraph probes with.*tg.Dim\('T', max="):
        assert t <= 32
