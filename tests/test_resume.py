"""Training checkpoints and BackupAndRestore: a training process killed mid-fit resumes to the same weights."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph.training import load_checkpoint, save_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(HERE, "resume_worker.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("data", ["tensors", "loader"])
def test_killed_fit_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, data):
    """SIGKILL in the middle of epoch 3, run again: epochs 3.. run once more and every weight, the
    optimizer state and the later losses equal those of a run never interrupted (dropout, shuffling,
    Adam, an LR scheduler, ReduceLROnPlateau and EarlyStopping's best weights all restored)."""
    killed = _run(tmp_path / "backup", tmp_path / "never.pt", data, 3)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert os.listdir(tmp_path / "backup") == ["latest.safetensors"]
    resumed = _run(tmp_path / "backup", tmp_path / "resumed.pt", data, -1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert os.listdir(tmp_path / "backup") == []  # a completed fit deletes its backup
    straight = _run(tmp_path / "other", tmp_path / "straight.pt", data, -1)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "straight.pt")
    assert a["epochs"] == [3, 4, 5] and b["epochs"] == list(range(6))
    assert a["loss"] == b["loss"][3:]
    for k in b["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for i in b["optimizer"]:
        for k, v in b["optimizer"][i].items():
            assert torch.equal(a["optimizer"][i][k], v), (i, k)


def _model(seed=0):
    torch.manual_seed(seed)
    x = tg.Input(shape=(4,))
    return tg.Model(x, nn.Linear(8, 2)(F.relu(nn.Linear(4, 8)(x))))


def test_checkpoint_round_trip_restores_optimizer_scheduler_and_rng(tmp_path):
    """save_checkpoint/load_checkpoint: weights, Adam's state, a scheduler's state, the epoch and RNG."""
    model = _model()
    model.compile(optimizer="adam", loss="cross_entropy")
    sched = tg.callbacks.LearningRateScheduler(torch.optim.lr_scheduler.StepLR(model.optimizer, 1, gamma=0.5))
    x = torch.randn(32, 4)
    model.fit(x, (x[:, 0] > 0).long(), epochs=3, callbacks=[sched], verbose=0)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(model, path, epoch=2, callbacks=[sched])
    expected_draw = torch.rand(3)
    other = _model(1)
    other.compile(optimizer="adam", loss="cross_entropy")
    sched2 = tg.callbacks.LearningRateScheduler(torch.optim.lr_scheduler.StepLR(other.optimizer, 1, gamma=0.5))
    assert load_checkpoint(other, path, callbacks=[sched2]) == {"epoch": 2}
    assert torch.equal(torch.rand(3), expected_draw)  # the generator continues from the save
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(model.optimizer.param_groups[0]["lr"])
    assert sched2.schedule.state_dict() == sched.schedule.state_dict()
    state, state2 = model.optimizer.state_dict()["state"], other.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg_sq"], state2[i]["exp_avg_sq"]) for i in state)
    fresh = _model(2)
    fresh.load_weights(path)  # a checkpoint also serves as a weights file
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_model_checkpoint_include_optimizer_and_errors(tmp_path):
    """ModelCheckpoint(include_optimizer=True) writes training checkpoints; wrong files are refused."""
    model = _model()
    model.compile(optimizer="adam", loss="cross_entropy")
    x = torch.randn(32, 4)
    y = (x[:, 0] > 0).long()
    pattern = str(tmp_path / "ckpt-{epoch}.safetensors")
    model.fit(x, y, epochs=2, callbacks=[tg.callbacks.ModelCheckpoint(pattern, include_optimizer=True)], verbose=0)
    info = load_checkpoint(model, tmp_path / "ckpt-2.safetensors")
    assert info == {"epoch": 1}
    model.save_weights(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="is not a torchgraph training checkpoint"):
        load_checkpoint(model, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="Expected one of them"):
        tg.callbacks.ModelCheckpoint(pattern, include_optimizer=True, save_weights_only=True)
    x2 = tg.Input(shape=(4,))
    other = tg.Model(x2, nn.Linear(4, 2)(x2))
    other.compile(optimizer="adam", loss="cross_entropy")
    with pytest.raises(ValueError, match="do not fit this model.*unchanged"):
        load_checkpoint(other, tmp_path / "ckpt-2.safetensors")
    with pytest.raises(ValueError, match="save_freq must be 'epoch'"):
        tg.callbacks.BackupAndRestore(tmp_path, save_freq=10)
