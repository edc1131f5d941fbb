"""compile/fit/evaluate/predict on tg.Model: the dispatch rule, data forms, errors, serialization."""

import copy
import doctest
import io
import pathlib
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchgraph as tg



pytestmark = pytest.mark.usefixtures("one_thread")

def _mlp(in_features=4, classes=3, dropout=0.0):
    x = tg.Input(shape=(in_features,))
    h = nn.Dropout(dropout)(F.relu(nn.Linear(in_features, 32)(x)))
    return tg.Model(x, nn.Linear(32, classes)(h))


def _blobs(n=256, seed=0):
    """A linearly separable 3-class problem: the class is the argmax of the first 3 features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x[:, :3].argmax(1)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- compile dispatch

def test_compile_with_training_args_configures_training():
    """compile(optimizer=..., loss=...) sets up training instead of torch.compile."""
    model = _mlp()
    assert model.optimizer is None
    model.compile(optimizer="sgd", loss="cross_entropy", metrics=["accuracy"])
    assert isinstance(model.optimizer, torch.optim.SGD)
    assert model.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert "_compiled_call_impl" not in model.__dict__ or model.__dict__["_compiled_call_impl"] is None


def test_compile_without_training_args_is_torch_compile():
    """compile() with torch.compile arguments (or none) stays nn.Module.compile."""
    model = _mlp()
    model.compile(backend="eager")
    assert model._compiled_call_impl is not None
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), model.forward(x))
    assert model.optimizer is None


def test_torch_compiled_model_trains_with_fit():
    """The two compiles combine: fit runs the torch-compiled forward."""
    torch.manual_seed(0)
    model = _mlp()
    model.compile(backend="eager")
    model.compile(optimizer="adam", loss="cross_entropy")
    x, y = _blobs(128)
    h = model.fit(x, y, epochs=3, verbose=0)
    assert h.history["loss"][-1] < h.history["loss"][0]


def test_compile_mixing_styles_raises():
    """Training and torch.compile keywords in one call are a TypeError naming both sets."""
    with pytest.raises(TypeError, match=r"together with \['backend'\]"):
        _mlp().compile(optimizer="adam", loss="mse", backend="eager")


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="crossentropy"), "unknown loss 'crossentropy'"),
    (dict(loss="mse", metrics=["acuracy"]), "unknown metric 'acuracy'"),
    (dict(optimizer="adamm", loss="mse"), "unknown optimizer 'adamm'"),
    (dict(optimizer="adam"), "loss is missing"),
    (dict(loss={"nope": "mse"}), r"names 'nope', which is not an output.*Expected output names"),
    (dict(loss="mse", device="gpu-please"), "device must be"),
    (dict(loss="mse", amp="fp8"), "amp must be"),
])
def test_compile_bad_arguments_raise(kwargs, match):
    """Unknown names and mismatched output names fail at compile with the valid choices."""
    with pytest.raises(ValueError, match=match):
        _mlp().compile(**kwargs)


def test_compile_optimizer_for_other_model_raises():
    """An optimizer built on another model's parameters is rejected."""
    other = _mlp()
    with pytest.raises(ValueError, match="none of this model's parameters"):
        _mlp().compile(optimizer=torch.optim.Adam(other.parameters()), loss="cross_entropy")


def test_fit_before_compile_raises():
    """fit on a model that was never compiled says to call compile."""
    x, y = _blobs(8)
    with pytest.raises(RuntimeError, match="not configured for training. Call model.compile"):
        _mlp().fit(x, y, verbose=0)


# ---------------------------------------------------------------------- fit / evaluate / predict

def test_fit_learns_and_returns_history():
    """fit lowers the loss; History has loss, metrics and val_* per epoch."""
    torch.manual_seed(0)
    model = _mlp()
    model.compile(optimizer=torch.optim.Adam(model.parameters(), lr=0.01), loss="cross_entropy",
                  metrics=["accuracy"])
    x, y = _blobs(512)
    h = model.fit(x, y, batch_size=32, epochs=6, validation_split=0.25, verbose=0)
    assert sorted(h.history) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert all(len(v) == 6 for v in h.history.values())
    assert h.epoch == list(range(6))
    assert h.history["loss"][-1] < 0.5 * h.history["loss"][0]
    assert h.history["val_accuracy"][-1] > 0.85
    result = model.evaluate(x, y, verbose=0)
    assert set(result) == {"loss", "accuracy"} and result["accuracy"] > 0.85


def test_fit_loss_is_the_sample_mean():
    """Epoch loss equals the mean over samples, also with a partial last batch."""
    torch.manual_seed(0)
    model = _mlp()
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss="cross_entropy",
                  metrics=["accuracy"])
    x, y = _blobs(70)
    h = model.fit(x, y, batch_size=32, shuffle=False, verbose=0)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert h.history["loss"][0] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
    assert h.history["accuracy"][0] == pytest.approx((out.argmax(1) == y).float().mean().item())


def test_fit_accepts_dataset_dataloader_and_numpy():
    """The same data as tensors, NumPy arrays (float64), a Dataset and a DataLoader all train."""
    x, y = _blobs(96)
    for data in ({"x": x, "y": y}, {"x": x.double().numpy(), "y": y.numpy()},
                 {"x": TensorDataset(x, y)}, {"x": DataLoader(TensorDataset(x, y), batch_size=16)}):
        torch.manual_seed(0)
        model = _mlp()
        model.compile(optimizer="adam", loss="cross_entropy", metrics=["accuracy"])
        h = model.fit(**data, epochs=2, verbose=0, validation_data=(x[:32], y[:32]))
        assert len(h.history["val_loss"]) == 2 and np.isfinite(h.history["loss"]).all()
        assert model.evaluate(**data, verbose=0)["loss"] > 0


def test_multi_input_multi_output_dicts():
    """Dict inputs, dict outputs, a loss per output with weights, metrics per output."""
    torch.manual_seed(0)
    a, b = tg.Input(shape=(3,), name="a"), tg.Input(shape=(2,), name="b")
    h = F.relu(nn.Linear(5, 16)(torch.cat([a, b], dim=1)))
    model = tg.Model({"a": a, "b": b}, {"cls": nn.Linear(16, 2)(h), "reg": nn.Linear(16, 1)(h)})
    model.compile(optimizer="adam", loss={"cls": "cross_entropy", "reg": "mse"},
                  loss_weights={"reg": 0.5}, metrics={"cls": ["accuracy"], "reg": ["mae"]})
    xa, xb = torch.randn(64, 3), torch.randn(64, 2)
    y = {"cls": (xa[:, 0] > 0).long(), "reg": xb.sum(1, keepdim=True)}
    hist = model.fit({"a": xa, "b": xb}, y, epochs=3, verbose=0)
    assert sorted(hist.history) == ["cls_accuracy", "cls_loss", "loss", "reg_loss", "reg_mae"]
    h0 = {k: v[0] for k, v in hist.history.items()}
    assert h0["loss"] == pytest.approx(h0["cls_loss"] + 0.5 * h0["reg_loss"], rel=1e-4)
    out = model.predict({"a": xa, "b": xb}, batch_size=10)
    assert set(out) == {"cls", "reg"} and out["cls"].shape == (64, 2) and out["reg"].shape == (64, 1)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out["reg"], model(a=xa, b=xb)["reg"])


def test_list_outputs_and_list_targets():
    """List outputs take list targets; predict returns a list."""
    x = tg.Input(shape=(4,))
    h = nn.Linear(4, 8)(x)
    model = tg.Model(x, [nn.Linear(8, 3)(h), nn.Linear(8, 1)(h)])
    model.compile(loss=["cross_entropy", "mse"])
    xs, ys = _blobs(40)
    h = model.fit(xs, [ys, xs[:, :1]], epochs=1, verbose=0)
    assert {"output_0_loss", "output_1_loss"} <= set(h.history)
    out = model.predict(xs)
    assert isinstance(out, list) and [o.shape[0] for o in out] == [40, 40]


def test_custom_loss_module_and_metric_callable():
    """An nn.Module loss and a callable metric(prediction, target) are used as given."""
    torch.manual_seed(0)
    model = _mlp()

    def top2(pred, target):
        return (pred.topk(2, dim=1).indices == target[:, None]).any(1).float().mean()

    model.compile(optimizer="adam", loss=nn.CrossEntropyLoss(label_smoothing=0.1), metrics=[top2])
    x, y = _blobs(64)
    h = model.fit(x, y, epochs=2, verbose=0)
    assert 0.0 <= h.history["top2"][-1] <= 1.0


def test_predict_matches_forward_and_needs_no_compile():
    """predict concatenates batches in eval mode and equals the forward."""
    model = _mlp(dropout=0.5)
    x = torch.randn(50, 4)
    out = model.predict(x, batch_size=16)
    model.eval()
    torch.testing.assert_close(out, model(x))
    ds_out = model.predict(TensorDataset(x, torch.zeros(50)), batch_size=7)
    torch.testing.assert_close(ds_out, out)


def test_evaluate_and_predict_restore_modes():
    """evaluate/predict run in eval mode and restore each submodule's previous mode; so does fit."""
    model = _mlp(dropout=0.5)
    model.compile(loss="cross_entropy")
    x, y = _blobs(32)
    model.train()
    model.get_layer("dropout").eval()  # a user-frozen submodule keeps its mode
    before = [m.training for m in model.modules()]
    model.evaluate(x, y, verbose=0)
    model.predict(x)
    model.fit(x, y, verbose=0)
    assert [m.training for m in model.modules()] == before


def test_evaluate_is_deterministic_under_dropout():
    """evaluate uses eval mode: dropout is off, so two calls agree exactly."""
    model = _mlp(dropout=0.5)
    model.compile(loss="cross_entropy")
    x, y = _blobs(32)
    assert model.evaluate(x, y, verbose=0) == model.evaluate(x, y, verbose=0)


def test_initial_epoch_and_amp_bf16():
    """initial_epoch starts the epoch count; amp=True trains under bfloat16 autocast on CPU."""
    torch.manual_seed(0)
    model = _mlp()
    model.compile(optimizer="adam", loss="cross_entropy", amp=True)
    x, y = _blobs(128)
    h = model.fit(x, y, epochs=4, initial_epoch=2, verbose=0)
    assert h.epoch == [2, 3] and all(np.isfinite(h.history["loss"]))
    assert model.predict(x).dtype == torch.bfloat16


def test_custom_loop_with_the_same_model():
    """After compile, model.optimizer drives a handwritten loop on the same model."""
    torch.manual_seed(0)
    model = _mlp()
    model.compile(optimizer="adam", loss="cross_entropy")
    x, y = _blobs(128)
    first = model.evaluate(x, y, verbose=0)["loss"]
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        model.optimizer.zero_grad()
        loss.backward()
        model.optimizer.step()
    assert model.evaluate(x, y, verbose=0)["loss"] < first


# ---------------------------------------------------------------------- errors before the first step

@pytest.mark.parametrize("make, match", [
    (lambda x, y: (x, y[:-1]), r"different numbers of samples \(x has 64, y has 63\)"),
    (lambda x, y: (x, y.int()), "class-index targets must be int64.*received int32.*y.long()"),
    (lambda x, y: (x, y.float()), "float targets are class probabilities"),
    (lambda x, y: (x, y + 5), "target class 7 is out of range"),
    (lambda x, y: (x[:, :3], y), r"expects shape \(None, 4\); received \(32, 3\)"),
    (lambda x, y: ([x, x], y), "received 2 arrays"),
    (lambda x, y: (x, None), "y is missing"),
])
def test_bad_data_fails_before_the_first_step(make, match):
    """Mismatched lengths, wrong target dtypes/shapes: clear errors and untouched weights."""
    model = _mlp()
    model.compile(optimizer="sgd", loss="cross_entropy")
    before = _weights(model)
    x, y = _blobs(64)
    with pytest.raises((ValueError, TypeError), match=match):
        model.fit(*make(x, y), epochs=1, verbose=0)
    assert _same(before, _weights(model))


def test_regression_target_shape_mismatch_is_caught():
    """An (N, 1) output against an (N,) target would broadcast silently: it is an error with a hint."""
    x = tg.Input(shape=(4,))
    model = tg.Model(x, nn.Linear(4, 1)(x))
    model.compile(loss="mse")
    with pytest.raises(ValueError, match=r"Expected shape \(None, 1\).*received shape \(None,\).*unsqueeze"):
        model.fit(torch.randn(16, 4), torch.randn(16), verbose=0)
    with pytest.raises(ValueError, match="expected float targets; received int64"):
        model.fit(torch.randn(16, 4), torch.ones(16, 1, dtype=torch.long), verbose=0)


def test_custom_loss_failure_names_shapes():
    """A custom loss that raises on the first batch is reported with output and target shapes."""
    model = _mlp()
    model.compile(loss=lambda pred, target: (pred - target).pow(2).mean())
    x, y = _blobs(16)
    with pytest.raises(ValueError, match=r"loss failed on the first batch \(output 'output' \(16, 3\) "
                                         r"float32 vs target \(16, 2\) float32\)"):
        model.fit(x, y.float()[:, None].expand(16, 2).contiguous(), verbose=0)
    model.compile(loss=lambda pred, target: F.cross_entropy(pred, target, reduction="none"))
    with pytest.raises(ValueError, match="must be a float scalar tensor"):
        model.fit(x, y, verbose=0)


def test_bad_fit_arguments():
    """Bad batch_size, epochs, validation arguments are named."""
    model = _mlp()
    model.compile(loss="cross_entropy")
    x, y = _blobs(16)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.fit(x, y, batch_size=0, verbose=0)
    with pytest.raises(ValueError, match="epochs must be a non-negative int"):
        model.fit(x, y, epochs=1.5, verbose=0)
    with pytest.raises(ValueError, match="validation_split must be in"):
        model.fit(x, y, validation_split=1.5, verbose=0)
    with pytest.raises(ValueError, match="works with tensors only"):
        model.fit(TensorDataset(x, y), validation_split=0.5, verbose=0)
    with pytest.raises(ValueError, match="y must be None when x is a TensorDataset"):
        model.fit(TensorDataset(x, y), y, verbose=0)


# ---------------------------------------------------------------------- progress output

def test_verbose_modes(capsys):
    """verbose=0 prints nothing, 2 one line per epoch, 1 a tqdm bar; evaluate prints one line."""
    model = _mlp()
    model.compile(loss="cross_entropy", metrics=["accuracy"])
    x, y = _blobs(64)
    model.fit(x, y, epochs=2, verbose=0)
    assert capsys.readouterr().out == ""
    model.fit(x, y, epochs=2, verbose=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("Epoch 2/2 - ") and "accuracy: " in lines[1]
    model.fit(x, y, epochs=1, verbose="auto")  # captured stdout is not a terminal: one line per epoch
    assert capsys.readouterr().out.startswith("Epoch 1/1 - ")
    model.fit(x, y, epochs=1, verbose=1)
    out = capsys.readouterr()
    assert "Epoch 1/1" in out.out + out.err and "2/2" in out.out + out.err
    model.evaluate(x, y)
    assert capsys.readouterr().out.startswith("evaluate - loss: ")


# ---------------------------------------------------------------------- serialization & tracing

@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_compiled_model_pickles_copies_and_scripts():
    """After compile()+fit, torch.save/pickle/deepcopy/jit.script/torch.compile work; copies are not
    compiled for training."""
    model = _mlp()
    model.compile(optimizer="adam", loss="cross_entropy", metrics=["accuracy"])
    x, y = _blobs(32)
    model.fit(x, y, verbose=0)
    assert not any("optim" in k or "stop" in k for k in model.__dict__)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(model)
    unpickled = pickle.loads(pickle.dumps(model))
    scripted = torch.jit.script(model)
    compiled = torch.compile(model, backend="eager")
    model.eval()
    for other in (loaded, clone, unpickled, scripted, compiled):
        other.eval()
        torch.testing.assert_close(other(x), model(x))
    for other in (loaded, clone, unpickled):
        assert other.optimizer is None
        with pytest.raises(RuntimeError, match="compile"):
            other.fit(x, y, verbose=0)
    assert model.optimizer is not None


def test_training_method_names_are_reserved_layer_names():
    """A layer may not be named like a training method (it would shadow it in forward)."""
    x = tg.Input(shape=(4,))
    for name in ("fit", "optimizer", "stop_training"):
        with pytest.raises(tg.GraphBuildError, match=f"'{name}' is reserved"):
            tg.Model(x, tg.name(nn.Linear(4, 2), name)(x))


@pytest.mark.parametrize("package", ["training", "callbacks", "data", "metrics"])
def test_docstring_examples_run(package):
    """The Example: sections of every module of the training packages run as doctests."""
    import importlib
    import pkgutil

    root = importlib.import_module(f"torchgraph.{package}")
    names = [root.__name__] + [f"{root.__name__}.{m.name}" for m in pkgutil.iter_modules(root.__path__)]
    for name in names + ["torchgraph.distributed", "torchgraph.losses"]:
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, name


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_docs_training_page_runs(capsys):
    """Each ```python block of docs/training.md runs on its own, in a fresh namespace."""
    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "training.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) >= 15
    outputs = []
    for i, code in enumerate(blocks):
        torch.manual_seed(0)
        exec(compile(code, f"{page}:block{i}", "exec"), {"__name__": "__main__"})
        outputs.append(capsys.readouterr().out)
    text = "".join(outputs)
    assert "Reshape the targets with y.unsqueeze(-1)" in text
    assert "[3, 4, 5]" in text and "['latest.safetensors']" in text and "4 2" in text


def test_nested_outputs_train_and_predict_in_their_structure():
    """Nested outputs: targets and losses by flattened output name; predict rebuilds the nesting."""
    torch.manual_seed(0)
    x = tg.Input(shape=(4,))
    h = F.relu(nn.Linear(4, 8)(x))
    model = tg.Model(x, {"main": nn.Linear(8, 3)(h), "aux": [nn.Linear(8, 1)(h), nn.Linear(8, 2)(h)]})
    assert model.output_names == ["main", "aux_0", "aux_1"]
    model.compile(loss={"main": "cross_entropy", "aux_0": "mse"}, metrics={"main": "accuracy"})
    xs, ys = _blobs(48)
    by_name = {"main": ys, "aux_0": xs[:, :1]}
    nested = {"main": ys, "aux": [xs[:, :1], None]}
    for y in (by_name, nested):
        h = model.fit(xs, y, epochs=1, verbose=0)
        assert sorted(h.history) == ["aux_0_loss", "loss", "main_accuracy", "main_loss"]
    out = model.predict(xs, batch_size=20)
    assert isinstance(out["aux"], list) and [t.shape for t in out["aux"]] == [(48, 1), (48, 2)]
    with pytest.raises(ValueError, match=r"y does not match the model's 3 outputs .* received 2"):
        model.fit(xs, [ys, ys], verbose=0)


# ---------------------------------------------------------------------- regressions (issue 16)

@pytest.mark.parametrize("wrap", ["list", "dict"])
def test_one_output_in_a_list_or_dict_trains_like_a_bare_output(wrap):
    """tg.Model(x, [y]) / tg.Model(x, {"out": y}) train on the whole target, given bare, in a list or a dict
    (once the target was indexed as a tuple, comparing (None,) with (None, 1))."""
    x = tg.Input(shape=(4,))
    layer = nn.Linear(4, 1)
    out = layer(x)
    model = tg.Model(x, [out] if wrap == "list" else {"out": out})
    bare = tg.Model(x, out)
    xs, ys = torch.randn(32, 4), torch.randn(32, 1)
    name = model.output_names[0]
    for y in (ys, [ys], {name: ys}):
        model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss="mse")
        h = model.fit(xs, y, batch_size=8, shuffle=False, verbose=0)
        bare.compile(optimizer=torch.optim.SGD(bare.parameters(), lr=0.0), loss="mse")
        expected = bare.fit(xs, ys, batch_size=8, shuffle=False, verbose=0).history["loss"]
        assert h.history["loss"] == pytest.approx(expected)
        assert model.evaluate(xs, y, verbose=0)["loss"] == pytest.approx(F.mse_loss(bare(xs), ys).item())


def test_per_output_metric_lists():
    """metrics=["mse", ["mse", "accuracy"]] gives each output its own list (was refused)."""
    x = tg.Input(shape=(4,))
    h = nn.Linear(4, 8)(x)
    model = tg.Model(x, [nn.Linear(8, 1)(h), nn.Linear(8, 3)(h)])
    model.compile(loss=["mse", "cross_entropy"], metrics=["mse", ["mse", "accuracy"]])
    xs, ys = _blobs(32)
    hist = model.fit(xs, [xs[:, :1], F.one_hot(ys, 3).float()], verbose=0).history
    assert {"output_0_mse", "output_1_mse", "output_1_accuracy"} <= set(hist) and "output_0_accuracy" not in hist


def test_bad_metric_structure_mentions_the_dict_form():
    """A per-output list of the wrong length, or a non-metric, names the dict form that works."""
    x = tg.Input(shape=(4,))
    h = nn.Linear(4, 8)(x)
    model = tg.Model(x, [nn.Linear(8, 1)(h), nn.Linear(8, 3)(h)])
    with pytest.raises(ValueError, match=r"2 outputs .* or a dict by output name such as \{'output_0'"):
        model.compile(loss="mse", metrics=[["mse"], ["mse"], ["mse"]])
    with pytest.raises(TypeError, match="pass a dict by output name"):
        model.compile(loss="mse", metrics=[3])


def test_outputs_can_be_named_by_their_layers():
    """Keras style: losses, loss weights, metrics and targets may name the layer producing an output."""
    torch.manual_seed(0)
    x = tg.Input(shape=(4,))
    h = F.relu(nn.Linear(4, 8)(x))
    model = tg.Model(x, [nn.Linear(8, 3)(h), nn.Linear(8, 1)(h)])
    assert model.output_names == ["output_0", "output_1"]
    model.compile(loss={"linear_1": "cross_entropy", "linear_2": "mse"}, loss_weights={"linear_2": 0.5},
                  metrics={"linear_1": "accuracy"})
    xs, ys = _blobs(32)
    hist = model.fit(xs, {"linear_1": ys, "output_1": xs[:, :1]}, verbose=0).history
    assert sorted(hist) == ["loss", "output_0_accuracy", "output_0_loss", "output_1_loss"]
    assert hist["loss"][0] == pytest.approx(hist["output_0_loss"][0] + 0.5 * hist["output_1_loss"][0], rel=1e-5)
    with pytest.raises(ValueError, match=r"names 'linear_9'.*or the layers producing them \['linear_1', 'linear_2'\]"):
        model.compile(loss={"linear_9": "mse"})
    with pytest.raises(ValueError, match="names output 'output_0' twice"):
        model.compile(loss={"linear_1": "cross_entropy", "output_0": "cross_entropy"})


def test_extra_keyword_input_is_named():
    """An unexpected keyword input is named in the TypeError (and in fit's dict check)."""
    a, b = tg.Input(shape=(3,), name="a"), tg.Input(shape=(2,), name="b")
    model = tg.Model({"a": a, "b": b}, nn.Linear(5, 1)(torch.cat([a, b], 1)))
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['c'\]"):
        model(a=torch.randn(2, 3), b=torch.randn(2, 2), c=torch.randn(2, 2))
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['c'\]"):
        model(torch.randn(2, 3), b=torch.randn(2, 2), c=torch.randn(2, 2))
    with pytest.raises(TypeError, match=r"given twice \['a'\]"):
        model(torch.randn(2, 3), a=torch.randn(2, 3))
    model.compile(loss="mse")
    with pytest.raises(ValueError, match=r"unexpected \['c'\]"):
        model.fit({"a": torch.randn(8, 3), "b": torch.randn(8, 2), "c": torch.randn(8, 1)}, torch.randn(8, 1),
                  verbose=0)


def test_summary_shows_optimizer_params_after_fit():
    """summary() adds Keras' "Optimizer params" line once compiled: Adam keeps 2 tensors per parameter."""
    model = _mlp()
    lines = []
    model.summary(print_fn=lines.append)
    assert "Optimizer params" not in lines[0]
    model.compile(optimizer="adam", loss="cross_entropy")
    model.fit(*_blobs(16), verbose=0)
    lines.clear()
    model.summary(print_fn=lines.append)
    n = model.count_params()
    row = [line for line in lines[0].splitlines() if line.startswith("Optimizer params")]
    assert row and row[0].startswith(f"Optimizer params: {2 * n + 4:,} (")  # exp_avg, exp_avg_sq, step


def test_training_needs_no_optional_package():
    """import torchgraph and a fit with built-in metrics work without tqdm, torchmetrics, tensorboard and
    safetensors; a torchmetrics metric name then says what to install."""
    import subprocess
    import sys

    code = """
import sys
for name in ("tqdm", "torchmetrics", "tensorboard", "safetensors"):
    sys.modules[name] = None
import torch, torch.nn as nn, torchgraph as tg
x = tg.Input(shape=(4,))
model = tg.Model(x, nn.Linear(4, 3)(x))
model.compile(loss="cross_entropy", metrics=["accuracy"])
print(sorted(model.fit(torch.randn(16, 4), torch.randint(0, 3, (16,)), verbose="auto").history))
try:
    model.compile(loss="cross_entropy", metrics=["f1_score"])
except ImportError as e:
    print(e)
"""
    root = pathlib.Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Epoch 1/1 - ") and lines[1] == "['accuracy', 'loss']"
    assert "pip install 'torchgraph-fx[train]'" in lines[2]
