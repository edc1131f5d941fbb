"""Progress output: a live bar in a real Jupyter kernel (widget, or text without ipywidgets), and
clean per-epoch lines when stdout is a file."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TRAIN = """
import time, torch, torch.nn as nn, torchgraph as tg
from torchgraph.callbacks import resolve_verbose
torch.manual_seed(0)
x = tg.Input(shape=(4,))
model = tg.Model(x, nn.Linear(4, 3)(x))
model.compile(loss="cross_entropy")
slow = tg.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: time.sleep(0.06))
print("VERBOSE", resolve_verbose("auto"))
model.fit(torch.randn(20 * 8, 4), torch.randint(0, 3, (20 * 8,)), batch_size=8, epochs=2, callbacks=[slow])
"""


def _run_in_kernel(code: str) -> list:
    """Runs ``code`` in a fresh IPython kernel; returns its iopub messages until it is idle again."""
    manager = pytest.importorskip("jupyter_client.manager")
    pytest.importorskip("ipykernel")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    km, kc = manager.start_new_kernel(kernel_name="python3", startup_timeout=120, env=env, cwd=ROOT)
    try:
        msg_id = kc.execute(code)
        messages = []
        while True:
            msg = kc.get_iopub_msg(timeout=120)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            messages.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return messages
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _text(messages, name=None) -> str:
    return "".join(m["content"]["text"] for m in messages
                   if m["msg_type"] == "stream" and (name is None or m["content"]["name"] == name))


def test_jupyter_draws_a_live_widget_bar():
    """In a notebook verbose="auto" is a bar (not per-epoch lines): tqdm's widget, updated during the
    epoch, ending at 20/20 steps, with no IProgress warning."""
    pytest.importorskip("ipywidgets")
    messages = _run_in_kernel(TRAIN)
    errors = [m["content"] for m in messages if m["msg_type"] == "error"]
    assert not errors, errors
    text = _text(messages)
    assert "VERBOSE 1" in text and "IProgress" not in text and "Epoch 1/2 - " not in text
    values = [m["content"]["data"]["state"]["value"] for m in messages if m["msg_type"] == "comm_msg"
              and isinstance(m["content"]["data"].get("state", {}).get("value"), (int, float))]
    bars = [m for m in messages if m["msg_type"] == "comm_open"
            and m["content"]["data"]["state"].get("_model_name") == "FloatProgressModel"]
    assert len(bars) == 2  # one bar per epoch
    assert values.count(20) >= 2 and len({v for v in values if 0 < v < 20}) >= 3  # live, per step


def test_jupyter_without_ipywidgets_draws_a_text_bar():
    """Without ipywidgets the bar is tqdm's text bar, redrawn in place with carriage returns."""
    messages = _run_in_kernel("import sys; sys.modules['ipywidgets'] = None\n" + TRAIN)
    assert not [m for m in messages if m["msg_type"] == "error"]
    text = _text(messages)
    assert "IProgress" not in text and "Epoch 1/2 - " not in text
    assert "\r" in text and "20/20" in text and "Epoch 2/2" in text
    assert len({part.split("|")[-1].split("/")[0].strip() for part in text.split("\r") if "/20" in part}) >= 3


def test_piped_output_is_one_clean_line_per_epoch(tmp_path):
    """stdout to a file: verbose="auto" prints exactly one line per epoch, no carriage returns."""
    log = tmp_path / "log.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", TRAIN.replace("time.sleep(0.06)", "None")], stdout=f,
                       stderr=subprocess.PIPE, env=env, check=True, timeout=300)
    lines = log.read_text().splitlines()
    assert lines[0] == "VERBOSE 2" and len(lines) == 3 and "\r" not in log.read_text()
    assert lines[1].startswith("Epoch 1/2 - ") and "loss: " in lines[1] and lines[2].startswith("Epoch 2/2 - ")
