"""tg.callbacks with real training runs: stopping, checkpoints, LR schedules, NaN, CSV, lambdas."""

import csv
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph.callbacks import Callback, EarlyStopping, ModelCheckpoint



pytestmark = pytest.mark.usefixtures("one_thread")

def _model():
    x = tg.Input(shape=(4,))
    return tg.Model(x, nn.Linear(16, 3)(F.relu(nn.Linear(4, 16)(x))))


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x[:, :3].argmax(1)


def _frozen(model, **kw):
    """Compiled with lr=0: the weights never change, so the losses are constant."""
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss="cross_entropy", **kw)
    return model


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Noise(Callback):
    """From epoch ``start`` on, perturbs the weights at each epoch start (so later epochs are worse)."""

    def __init__(self, start):
        super().__init__()
        self.start = start

    def on_epoch_begin(self, epoch, logs=None):
        if epoch >= self.start:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(torch.randn_like(p) * 3)


def test_early_stopping_patience_and_restore_best_weights():
    """No improvement for `patience` epochs stops training; the best epoch's weights come back."""
    torch.manual_seed(0)
    model = _model()
    model.compile(optimizer=torch.optim.Adam(model.parameters(), lr=0.02), loss="cross_entropy")
    x, y = _data()
    model.fit(x, y, epochs=15, verbose=0)  # a good solution first
    best = _weights(model)
    _frozen(model)
    stop = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    h = model.fit(x, y, epochs=20, validation_data=(x, y), callbacks=[_Noise(start=1), stop], verbose=0)
    assert h.epoch == [0, 1, 2] and stop.stopped_epoch == 2 and stop.best_epoch == 0
    after = _weights(model)
    assert all(torch.equal(best[k], after[k]) for k in best)


def test_early_stopping_without_improvement_counts_patience():
    """With constant losses, training runs patience + 1 epochs (the first sets the best)."""
    model = _frozen(_model())
    x, y = _data()
    # NOTE: shuffle=False keeps the epoch loss bit-identical. Shuffled, lr=0 still changes the order
    # in which batch losses are summed, so the epoch mean moves in its last bits and
    # EarlyStopping(min_delta=0) rightly counts a 1e-8 drop as an improvement.
    h = model.fit(x, y, epochs=10, shuffle=False, callbacks=[EarlyStopping(monitor="loss", patience=3)],
                  verbose=0)
    assert len(h.epoch) == 4 and len(set(h.history["loss"])) == 1


def test_early_stopping_missing_monitor_warns_and_continues():
    """Monitoring a key not in the logs warns once and never stops."""
    model = _frozen(_model())
    x, y = _data(32)
    with pytest.warns(UserWarning, match="'val_accuracy' is not in the logs"):
        h = model.fit(x, y, epochs=3, callbacks=[EarlyStopping(monitor="val_accuracy")], verbose=0)
    assert len(h.epoch) == 3


def _load_checkpoint(model, path):
    """Loads weights that ModelCheckpoint(save_weights_only=True) wrote into ``model``."""
    from safetensors.torch import load_model
    load_model(model, path)
    return model


def test_model_checkpoint_saves_best_and_loads_back(tmp_path):
    """save_best_only writes only improving epochs, atomically; the file loads back into the model."""
    torch.manual_seed(0)
    model = _model()
    model.compile(optimizer=torch.optim.Adam(model.parameters(), lr=0.01), loss="cross_entropy",
                  metrics=["accuracy"])
    x, y = _data()
    path = str(tmp_path / "ckpt" / "best.safetensors")
    saved = []

    class Spy(Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved.append((epoch, os.path.getmtime(path) if os.path.exists(path) else None,
                          _weights(self.model)))

    ckpt = ModelCheckpoint(path, monitor="val_loss", save_best_only=True, save_weights_only=True)
    h = model.fit(x, y, epochs=4, validation_data=(x, y), callbacks=[ckpt, Spy()], verbose=0)
    best_epoch = min(range(4), key=lambda e: h.history["val_loss"][e])
    fresh = _load_checkpoint(_model(), path)
    expected = saved[best_epoch][2]
    assert all(torch.equal(fresh.state_dict()[k], expected[k]) for k in expected)
    assert ckpt.best == pytest.approx(h.history["val_loss"][best_epoch])
    assert os.listdir(tmp_path / "ckpt") == ["best.safetensors"]  # no temporary files left


def test_model_checkpoint_formats_epoch_and_logs(tmp_path):
    """filepath fields come from the epoch (from 1) and the logs; a bad field is a clear error."""
    model = _frozen(_model())
    x, y = _data(32)
    pattern = str(tmp_path / "m-{epoch:02d}-{loss:.2f}.safetensors")
    model.fit(x, y, epochs=2, callbacks=[ModelCheckpoint(pattern, save_weights_only=True)], verbose=0)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0].startswith("m-01-") and names[1].startswith("m-02-")
    with pytest.raises(ValueError, match="names 'val_acc', which is not in the logs"):
        model.fit(x, y, callbacks=[ModelCheckpoint(str(tmp_path / "{val_acc}.st"))], verbose=0)


def test_model_checkpoint_full_model(tmp_path):
    """save_weights_only=False saves the whole model with tg.save; tg.load brings it back."""
    model = _frozen(_model())
    x, y = _data(32)
    path = str(tmp_path / "model.safetensors")
    model.fit(x, y, callbacks=[ModelCheckpoint(path, monitor="loss")], verbose=0)
    loaded = tg.load(path)
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_model_checkpoint_unsavable_model_suggests_weights_only(tmp_path):
    """A layer tg.save cannot describe gives a clear error that points at save_weights_only."""
    class Scale(nn.Module):
        def forward(self, t):
            return t * 2

    x = tg.Input(shape=(4,))
    model = _frozen(tg.Model(x, nn.Linear(4, 3)(Scale()(x))))
    with pytest.raises(ValueError, match="cannot save the whole model.*save_weights_only=True"):
        model.fit(*_data(16), callbacks=[ModelCheckpoint(str(tmp_path / "m.safetensors"))], verbose=0)


def test_terminate_on_nan_keeps_last_good_checkpoint(tmp_path):
    """A NaN loss stops training mid-epoch; the NaN epoch is neither recorded nor checkpointed."""
    torch.manual_seed(0)
    model = _model()
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss="cross_entropy")
    x, y = _data(64)
    path = str(tmp_path / "last.safetensors")
    good = {}

    class Poison(Callback):
        def on_epoch_end(self, epoch, logs=None):
            good[epoch] = _weights(self.model)

        def on_train_batch_begin(self, batch, logs=None):
            if len(good) == 2 and batch == 1:  # third epoch, second batch: weights become NaN
                with torch.no_grad():
                    self.model.get_layer("linear").weight.fill_(float("nan"))

    h = model.fit(x, y, epochs=5, batch_size=16, verbose=0,
                  callbacks=[Poison(), tg.callbacks.TerminateOnNaN(),
                             ModelCheckpoint(path, monitor="loss", save_weights_only=True)])
    assert h.epoch == [0, 1] and all(math.isfinite(v) for v in h.history["loss"])
    assert model.stop_training
    restored = _load_checkpoint(_model(), path)
    assert all(torch.equal(restored.state_dict()[k], good[1][k]) for k in good[1])


def test_learning_rate_scheduler_function_and_torch_scheduler():
    """A Keras-style schedule(epoch, lr) and a torch lr_scheduler both drive the LR; logs record it."""
    model = _model()
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=1.0), loss="cross_entropy")
    x, y = _data(32)
    sched = tg.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1))
    h = model.fit(x, y, epochs=3, callbacks=[sched], verbose=0)
    assert h.history["learning_rate"] == pytest.approx([0.1, 0.05, 0.1 / 3])

    model.optimizer.param_groups[0]["lr"] = 1.0
    step = torch.optim.lr_scheduler.StepLR(model.optimizer, step_size=1, gamma=0.5)
    h = model.fit(x, y, epochs=3, callbacks=[tg.callbacks.LearningRateScheduler(step)], verbose=0)
    assert h.history["learning_rate"] == pytest.approx([1.0, 0.5, 0.25])
    assert model.optimizer.param_groups[0]["lr"] == pytest.approx(0.125)


def test_reduce_lr_on_plateau():
    """After `patience` epochs without improvement the LR is multiplied by `factor`."""
    model = _model()
    # lr 1e-12: the loss moves far less than min_delta, so every epoch after the first is a plateau.
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=1e-12), loss="cross_entropy")
    cb = tg.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=2)
    x, y = _data(32)
    h = model.fit(x, y, epochs=7, callbacks=[cb], verbose=0)
    # logs record the LR the epoch ran with; reductions happen at the end of epochs 2 and 5.
    assert h.history["learning_rate"] == pytest.approx([1e-12] * 3 + [5e-13] * 3 + [2.5e-13])


def test_csv_logger(tmp_path):
    """One header and one row per epoch, with the epoch and every logged value."""
    model = _frozen(_model(), metrics=["accuracy"])
    x, y = _data(32)
    path = tmp_path / "log.csv"
    model.fit(x, y, epochs=3, validation_split=0.25, callbacks=[tg.callbacks.CSVLogger(path)], verbose=0)
    rows = list(csv.DictReader(open(path)))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert set(rows[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    model.fit(x, y, epochs=1, callbacks=[tg.callbacks.CSVLogger(path, append=True)], verbose=0)
    assert len(list(csv.DictReader(open(path)))) == 4


def test_lambda_callback_batch_hooks_and_running_logs():
    """Batch hooks run once per step with running means as 0-dim tensors; epoch hooks get floats."""
    model = _frozen(_model())
    x, y = _data(50)
    seen = {"begin": 0, "end": [], "epoch": []}
    cb = tg.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: seen.__setitem__("begin", seen["begin"] + 1),
        on_train_batch_end=lambda b, logs: seen["end"].append(logs["loss"]),
        on_epoch_end=lambda e, logs: seen["epoch"].append(logs["loss"]))
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], shuffle=False, verbose=0)
    assert seen["begin"] == 8 and len(seen["end"]) == 8
    assert isinstance(seen["end"][0], torch.Tensor) and seen["end"][0].dim() == 0
    assert isinstance(seen["epoch"][0], float)
    assert float(seen["end"][3]) == pytest.approx(seen["epoch"][0], rel=1e-5)  # running mean at epoch end


def test_stop_training_from_a_batch_hook():
    """stop_training set in a batch hook ends fit at once; the cut epoch is not recorded."""
    model = _frozen(_model())
    x, y = _data(64)

    class StopAt(Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.model.stop_training = True

    h = model.fit(x, y, batch_size=8, epochs=3, callbacks=[StopAt()], verbose=0)
    assert h.epoch == [] and h.history == {}


def test_bad_callbacks_are_rejected():
    """A non-Callback object in callbacks, or a bad LambdaCallback hook, is a TypeError."""
    model = _frozen(_model())
    x, y = _data(16)
    with pytest.raises(TypeError, match="expected tg.callbacks.Callback instances; received function"):
        model.fit(x, y, callbacks=[lambda: None], verbose=0)
    with pytest.raises(TypeError, match="on_epoch_end must be callable"):
        tg.callbacks.LambdaCallback(on_epoch_end=3)
    with pytest.raises(ValueError, match="mode must be"):
        EarlyStopping(mode="up")
