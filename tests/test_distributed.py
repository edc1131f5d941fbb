"""fit under torchrun: 2 CPU processes, gloo on 127.0.0.1, checked end to end (bounded in time)."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import torchgraph as tg

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Runs tests/ddp_worker.py under torchrun with 2 processes; returns (out_dir, stdout, results)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(HERE, "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    return out, proc.stdout, results


def test_ranks_end_with_identical_weights(ddp_run):
    """DDP broadcasts rank 0's initial weights and averages gradients: final weights agree exactly."""
    _, _, (r0, r1) = ddp_run
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


def test_loss_falls_and_metrics_are_reduced(ddp_run):
    """The loss falls; every rank sees the same (all-reduced) history and evaluate results."""
    _, _, (r0, r1) = ddp_run
    h = r0["h1"]
    assert h["loss"][-1] < 0.8 * h["loss"][0]
    assert set(h) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert r0["h1"] == r1["h1"] and r0["h2"] == r1["h2"]
    assert r0["eval"] == r1["eval"]


def test_distributed_evaluate_equals_single_process(ddp_run):
    """Sharded evaluation without padding counts every sample once: it matches one process."""
    import torch.nn as nn
    import torch.nn.functional as F

    _, _, (r0, _) = ddp_run
    x = tg.Input(shape=(4,))
    model = tg.Model(x, nn.Linear(16, 3)(F.relu(nn.Linear(4, 16)(x))))
    model.load_state_dict(r0["state"])
    model.compile(loss="cross_entropy", metrics=["accuracy"])
    g = torch.Generator().manual_seed(0)
    X = torch.randn(203, 4, generator=g)
    local = model.evaluate(X, X[:, :3].argmax(1), verbose=0)
    assert local["loss"] == pytest.approx(r0["eval"]["loss"], rel=1e-5)
    assert local["accuracy"] == pytest.approx(r0["eval"]["accuracy"])


def test_torchmetrics_metrics_are_reduced_over_ranks(ddp_run):
    """Library metrics (F1 by name, an AUROC object) computed on 2 shards equal one process on all the data,
    on both ranks (evaluate shards without padding: each sample counts once)."""
    import torch.nn as nn
    import torch.nn.functional as F
    from sklearn.metrics import f1_score, roc_auc_score

    _, _, (r0, r1) = ddp_run
    assert r0["eval_lib"] == r1["eval_lib"] and r0["h4"] == r1["h4"]
    x = tg.Input(shape=(4,))
    model = tg.Model(x, nn.Linear(16, 3)(F.relu(nn.Linear(4, 16)(x))))
    model.load_state_dict(r0["state"])
    g = torch.Generator().manual_seed(0)
    X = torch.randn(203, 4, generator=g)
    Y = X[:, :3].argmax(1)
    with torch.no_grad():
        probs = model(X).softmax(1)
    got = r0["eval_lib"]
    assert got["f1_score"] == pytest.approx(f1_score(Y, probs.argmax(1), average="macro"), abs=1e-6)
    assert got["multiclass_auroc"] == pytest.approx(roc_auc_score(Y, probs, multi_class="ovr"), abs=1e-5)
    assert got["accuracy"] == pytest.approx((probs.argmax(1) == Y).float().mean().item(), abs=1e-6)
    assert set(r0["h4"]) == {"loss", "accuracy", "f1_score", "multiclass_auroc"}


def test_only_rank_zero_prints_logs_and_checkpoints(ddp_run):
    """One progress line per epoch (rank 0), one CSV, checkpoints written by rank 0 only."""
    out, stdout, _ = ddp_run
    assert sum(line.lstrip().startswith("Epoch 1/6") or "]:Epoch 1/6" in line
               for line in stdout.splitlines()) == 1
    assert (out / "saves_0.txt").exists() and not (out / "saves_1.txt").exists()
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 6
    assert (out / "best.safetensors").exists()


def test_a_stop_on_one_rank_stops_all(ddp_run):
    """stop_training set by a batch hook on rank 1 only ends fit on both ranks together."""
    _, _, (r0, r1) = ddp_run
    assert r0["h3_epochs"] == r1["h3_epochs"] == []
    assert r0["stopped"] and r1["stopped"]


def test_distributed_true_without_torchrun_is_a_clear_error(monkeypatch):
    """distributed=True outside torchrun names the missing environment variables."""
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    x = tg.Input(shape=(2,))
    model = tg.Model(x, torch.nn.Linear(2, 1)(x))
    model.compile(loss="mse")
    with pytest.raises(RuntimeError, match="launch by torchrun"):
        model.fit(torch.randn(4, 2), torch.randn(4, 1), distributed=True, verbose=0)
