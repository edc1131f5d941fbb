"""train_on_batch / test_on_batch / predict_on_batch, save / save_weights / load_weights, count_params."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import torchgraph as tg

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    x = tg.Input(shape=(4,))
    return tg.Model(x, nn.Linear(16, 3)(F.relu(nn.Linear(4, 16)(x))))


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x[:, :3].argmax(1)


def test_train_on_batch_is_one_step_and_returns_keras_values():
    """One SGD step, as by hand; returns the loss, [loss, metrics] or a dict (return_dict=True)."""
    x, y = _data()
    model, reference = _mlp(), _mlp()
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.5), loss="cross_entropy")
    loss = model.train_on_batch(x, y)
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    expected = F.cross_entropy(reference(x), y)
    expected.backward()
    opt.step()
    assert isinstance(loss, float) and loss == pytest.approx(expected.item())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    model.compile(optimizer="sgd", loss="cross_entropy", metrics=["accuracy"])
    values = model.train_on_batch(x, y)
    assert isinstance(values, list) and len(values) == 2
    logs = model.test_on_batch(x, y, return_dict=True)
    assert sorted(logs) == ["accuracy", "loss"]


def test_test_on_batch_changes_nothing_and_matches_evaluate():
    """test_on_batch runs in eval mode without a step; it equals evaluate on the same batch."""
    model = _mlp()
    model.compile(optimizer="sgd", loss="cross_entropy", metrics=["accuracy"])
    x, y = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs = model.test_on_batch(x, y, return_dict=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert logs == pytest.approx(model.evaluate(x, y, batch_size=32, verbose=0))


def test_reset_metrics_false_keeps_running_means():
    """reset_metrics=False: values are running means over calls until model.reset_metrics()."""
    model = _mlp()
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss="cross_entropy")
    x, y = _data(32)
    first = model.test_on_batch(x[:16], y[:16])
    second = model.test_on_batch(x[16:], y[16:])
    running = [model.test_on_batch(x[:16], y[:16], reset_metrics=False)]
    running.append(model.test_on_batch(x[16:], y[16:], reset_metrics=False))
    assert running[1] == pytest.approx((first + second) / 2)
    model.reset_metrics()
    assert model.test_on_batch(x[16:], y[16:], reset_metrics=False) == pytest.approx(second)


def test_batch_api_checks_the_first_batch_and_needs_compile():
    """The first call checks targets like fit; without compile it says to call compile."""
    x, y = _data()
    with pytest.raises(RuntimeError, match="Call model.compile"):
        _mlp().train_on_batch(x, y)
    model = _mlp()
    model.compile(loss="cross_entropy")
    with pytest.raises(ValueError, match="class-index targets must be int64"):
        model.train_on_batch(x, y.int())
    with pytest.raises(ValueError, match="y is missing"):
        model.test_on_batch(x)


def test_predict_on_batch_equals_forward_in_eval_mode():
    """predict_on_batch: eval mode, no grad, CPU tensors; the previous mode comes back."""
    x = tg.Input(shape=(4,))
    model = tg.Model(x, nn.Dropout(0.5)(nn.Linear(4, 3)(x)))
    model.train()
    out = model.predict_on_batch(torch.ones(5, 4))
    assert model.training and not out.requires_grad
    model.eval()
    torch.testing.assert_close(out, model(torch.ones(5, 4)))


def test_save_weights_and_load_weights_round_trip(tmp_path):
    """save_weights writes safetensors (atomically); load_weights reads it, tg.save files and checkpoints."""
    model, other = _mlp(0), _mlp(1)
    path = tmp_path / "w.safetensors"
    model.save_weights(path)
    assert set(load_file(path)) == set(model.state_dict()) and os.listdir(tmp_path) == ["w.safetensors"]
    other.load_weights(path)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    with pytest.raises(FileExistsError, match="overwrite=False"):
        model.save_weights(path, overwrite=False)
    whole = tmp_path / "model.safetensors"
    model.save(whole)
    loaded = tg.load(whole)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))
    third = _mlp(2)
    third.load_weights(whole)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), third.parameters()))


def test_load_weights_mismatch_changes_nothing(tmp_path):
    """Weights of another architecture: a ValueError naming the keys and shapes; the model is unchanged."""
    x = tg.Input(shape=(4,))
    wider = tg.Model(x, nn.Linear(32, 3)(F.relu(nn.Linear(4, 32)(x))))
    path = tmp_path / "wider.safetensors"
    wider.save_weights(path)
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"shapes differ .*linear.weight: \(32, 4\) vs \(16, 4\).*unchanged"):
        model.load_weights(path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        model.load_weights(tmp_path / "junk.safetensors")


def test_tied_weights_save_once_and_load(tmp_path):
    """A layer used twice (shared weights) saves and loads through save_weights."""
    x = tg.Input(shape=(4,))
    shared = nn.Linear(4, 4)
    model = tg.Model(x, shared(torch.tanh(shared(x))))
    path = tmp_path / "tied.safetensors"
    model.save_weights(path)
    fresh = tg.clone_model(model)
    fresh.load_weights(path)
    torch.testing.assert_close(fresh(torch.ones(2, 4)), model(torch.ones(2, 4)))


def test_count_params():
    """count_params: parameters (not buffers), a shared layer once."""
    x = tg.Input(shape=(3, 8, 8))
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = tg.Model(x, nn.BatchNorm2d(3)(conv(conv(x))))
    assert model.count_params() == (3 * 3 * 9 + 3) + 2 * 3
