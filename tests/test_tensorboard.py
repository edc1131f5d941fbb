"""tg.callbacks.TensorBoard writes real event files: read back with TensorBoard's EventAccumulator."""

import os

import pytest
import torch
import torch.nn as nn

import torchgraph as tg

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _scalars(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_epoch_scalars_per_run_match_the_history(tmp_path):
    """train/ and validation/ hold epoch_<name> per epoch (Keras layout), equal to History's values;
    the learning rate logged by a scheduler and weight histograms are there too."""
    torch.manual_seed(0)
    x = tg.Input(shape=(4,))
    model = tg.Model(x, nn.Linear(4, 3)(x))
    model.compile(optimizer="sgd", loss="cross_entropy", metrics=["accuracy"])
    xs = torch.randn(64, 4)
    ys = xs[:, :3].argmax(1)
    board = tg.callbacks.TensorBoard(tmp_path, histogram_freq=1)
    sched = tg.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 * (epoch + 1))
    h = model.fit(xs, ys, epochs=3, validation_split=0.25, callbacks=[sched, board], verbose=0).history
    assert sorted(os.listdir(tmp_path)) == ["train", "validation"]
    acc, train = _scalars(tmp_path / "train")
    _, val = _scalars(tmp_path / "validation")
    assert set(train) == {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"}
    assert set(val) == {"epoch_loss", "epoch_accuracy"}
    assert [s for s, _ in train["epoch_loss"]] == [0, 1, 2]
    assert [v for _, v in train["epoch_loss"]] == pytest.approx(h["loss"])
    assert [v for _, v in val["epoch_accuracy"]] == pytest.approx(h["val_accuracy"])
    assert [v for _, v in train["epoch_learning_rate"]] == pytest.approx([0.1, 0.2, 0.3])
    assert set(acc.Tags()["histograms"]) == {"linear.weight", "linear.bias"}


def test_batch_scalars_every_n_steps(tmp_path):
    """update_freq=N writes batch_<name> every N steps of the whole run (running means)."""
    x = tg.Input(shape=(4,))
    model = tg.Model(x, nn.Linear(4, 1)(x))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(torch.randn(80, 4), torch.randn(80, 1), batch_size=16, epochs=2, verbose=0,
              callbacks=[tg.callbacks.TensorBoard(tmp_path, update_freq=3)])
    _, train = _scalars(tmp_path / "train")
    assert [s for s, _ in train["batch_loss"]] == [3, 6, 9]
    with pytest.raises(ValueError, match="update_freq must be"):
        tg.callbacks.TensorBoard(tmp_path, update_freq=0)
