"""Metrics from torchmetrics: names mapped to it, objects accepted as they are, values over whole epochs."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import torchgraph as tg

torchmetrics = pytest.importorskip("torchmetrics")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

pytestmark = pytest.mark.usefixtures("one_thread")


def _frozen_classifier(classes=4, seed=0):
    torch.manual_seed(seed)
    x = tg.Input(shape=(6,))
    return tg.Model(x, nn.Linear(6, classes)(x))


def _data(n=96, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.randint(0, classes, (n,), generator=g)


def _compile_frozen(model, loss, metrics):
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=loss, metrics=metrics)


def test_multiclass_names_match_sklearn_over_the_whole_epoch():
    """precision/recall/f1 (macro), AUROC and top-k over all samples, not a mean of batch values."""
    model = _frozen_classifier()
    _compile_frozen(model, "cross_entropy", ["precision", "recall", "f1_score", "auroc", "top_2_accuracy"])
    x, y = _data()
    logs = model.fit(x, y, batch_size=16, shuffle=False, validation_data=(x, y), verbose=0).history
    with torch.no_grad():
        probs = model(x).softmax(1)
    pred = probs.argmax(1).numpy()
    expected = {
        "precision": sklearn_metrics.precision_score(y, pred, average="macro", zero_division=0),
        "recall": sklearn_metrics.recall_score(y, pred, average="macro", zero_division=0),
        "f1_score": sklearn_metrics.f1_score(y, pred, average="macro", zero_division=0),
        "auroc": sklearn_metrics.roc_auc_score(y, probs.numpy(), multi_class="ovr", average="macro"),
        "top_2_accuracy": sklearn_metrics.top_k_accuracy_score(y, probs.numpy(), k=2),
    }
    for name, value in expected.items():
        assert logs[name][0] == pytest.approx(value, abs=1e-5), name
        assert logs[f"val_{name}"][0] == pytest.approx(value, abs=1e-5), name
    assert model.evaluate(x, y, batch_size=7, verbose=0)["auroc"] == pytest.approx(expected["auroc"], abs=1e-5)


def test_binary_logits_are_turned_into_probabilities():
    """After bce_with_logits, outputs are logits even when they all lie in [0, 1]: precision and
    AUROC threshold sigmoid(logit) at 0.5 (logit > 0), never the raw value."""
    x = tg.Input(shape=(6,))
    model = tg.Model(x, torch.sigmoid(nn.Linear(6, 1)(x)) * 0.9)  # logits in (0, 0.9): all positive
    _compile_frozen(model, "bce_with_logits", ["precision", "recall", "binary_accuracy", "auroc"])
    xs, ys = _data(64, classes=2)
    target = ys.float()[:, None]
    logs = model.fit(xs, target, batch_size=16, verbose=0).history
    with torch.no_grad():
        logits = model(xs)[:, 0]
    pred = (logits > 0).long().numpy()  # every sample predicted positive
    assert logs["precision"][0] == pytest.approx(sklearn_metrics.precision_score(ys, pred), abs=1e-6)
    assert logs["recall"][0] == pytest.approx(1.0)
    assert logs["auroc"][0] == pytest.approx(sklearn_metrics.roc_auc_score(ys, logits.numpy()), abs=1e-5)


def test_metric_objects_are_used_as_given_with_state_per_output():
    """A torchmetrics object is used as is; given for two outputs, each output gets its own copy."""
    torch.manual_seed(0)
    x = tg.Input(shape=(6,))
    model = tg.Model(x, [nn.Linear(6, 3)(x), nn.Linear(6, 3)(x)])
    f1 = torchmetrics.classification.MulticlassF1Score(num_classes=3, average="micro")
    _compile_frozen(model, "cross_entropy", [f1])
    xs, y1 = _data(48, classes=3)
    y2 = (y1 + 1) % 3
    logs = model.fit(xs, [y1, y2], batch_size=16, verbose=0).history
    with torch.no_grad():
        out = model(xs)
    for i, y in enumerate((y1, y2)):
        expected = sklearn_metrics.f1_score(y, out[i].argmax(1), average="micro")
        assert logs[f"output_{i}_multiclass_f1_score"][0] == pytest.approx(expected, abs=1e-6)


def test_regression_names():
    """r2_score and rmse from torchmetrics after an mse loss."""
    torch.manual_seed(0)
    x = tg.Input(shape=(6,))
    model = tg.Model(x, nn.Linear(6, 1)(x))
    _compile_frozen(model, "mse", ["r2_score", "rmse", "mae"])
    xs, _ = _data(64)
    target = xs[:, :1] * 2 + 0.1
    logs = model.fit(xs, target, batch_size=16, verbose=0).history
    with torch.no_grad():
        pred = model(xs)
    assert logs["r2_score"][0] == pytest.approx(sklearn_metrics.r2_score(target, pred), abs=1e-5)
    assert logs["root_mean_squared_error"][0] == pytest.approx(
        np.sqrt(sklearn_metrics.mean_squared_error(target, pred)), rel=1e-5)


def test_running_values_reach_batch_hooks_without_sync():
    """Batch hooks see torchmetrics metrics as running 0-dim tensors, like the built-in ones."""
    model = _frozen_classifier()
    _compile_frozen(model, "cross_entropy", ["accuracy", "precision"])
    seen = []
    cb = tg.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(dict(logs)))
    x, y = _data(32)
    logs = model.fit(x, y, batch_size=16, shuffle=False, callbacks=[cb], verbose=0).history
    assert set(seen[0]) == {"loss", "accuracy", "precision"} and seen[0]["precision"].dim() == 0
    assert float(seen[-1]["precision"]) == pytest.approx(logs["precision"][0], abs=1e-6)


def test_library_metric_errors():
    """Unknown names list the choices; a vector result and an impossible top-k are explained."""
    model = _frozen_classifier(classes=3)
    with pytest.raises(ValueError, match=r"unknown metric 'precison'.*'precision'"):
        model.compile(loss="cross_entropy", metrics=["precison"])
    x, y = _data(16, classes=3)
    _compile_frozen(model, "cross_entropy", [torchmetrics.classification.MulticlassRecall(3, average=None)])
    with pytest.raises(ValueError, match=r"compute\(\) returned \(3,\); expected one number.*average="):
        model.fit(x, y, verbose=0)
    _compile_frozen(model, "cross_entropy", ["top_k_accuracy"])
    with pytest.raises(ValueError, match="top-5 accuracy needs more than 5 classes; the output has 3"):
        model.fit(x, y, verbose=0)
