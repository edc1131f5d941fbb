"""``train_on_batch`` / ``test_on_batch`` / ``predict_on_batch``: one step on one given batch (Keras).

The whole of ``x`` is one batch. The first call after ``compile`` checks the targets against the
loss like ``fit`` does. With ``reset_metrics=False`` the returned loss and metrics are running
values over all calls since the last reset (as Keras 3 always does); by default they are this
batch's (Keras 2's default). With ``gradient_accumulation_steps=N`` the weights change every N
calls of ``train_on_batch``.
"""

from __future__ import annotations

import torch

from ..data import (class_weight_table, class_weights_for, flatten_inputs, flatten_outputs, flatten_targets,
                    io_info, pack_outputs)
from ..data.batches import move, num_samples
from .arguments import param_device, place
from .configure import autocast
from .evaluation import modes, restore_modes
from .running import Running
from .state import config_of, state_of
from .step import GradientStep, checked_compute, compute

__all__ = ["train_on_batch", "test_on_batch", "predict_on_batch"]


def _batch(model, cfg, x, y, sample_weight, where: str):
    info = cfg.info
    xs, ys = flatten_inputs(info, x, where), flatten_targets(info, y, where)
    sw = flatten_targets(info, sample_weight, where, "sample_weight")
    if ys is None:
        raise ValueError(f"{where}: y is missing. Pass the targets of this batch.")
    n = num_samples(xs, ys, sw, where)
    dev = cfg.device
    return tuple(t.to(dev) for t in xs), move(ys, dev), move(sw, dev), n


def _result(running: Running, return_dict: bool, reset: bool):
    logs = running.result(reset=reset)
    if return_dict:
        return logs
    values = list(logs.values())
    return values[0] if len(values) == 1 else values


def _one_step(model, cfg, x, y, sample_weight, class_weight, where: str, train: bool, return_dict: bool,
              reset_metrics: bool):
    place(model, cfg)
    xs, ys, sw, n = _batch(model, cfg, x, y, sample_weight, where)
    table = class_weight_table(class_weight, cfg.info, sw is not None, where) if train else None
    if table is not None:
        w = class_weights_for(table, ys if cfg.info.single else ys[0])
        sw = w if cfg.info.single else (w,)
    kept = state_of(model).batch
    key = "train" if train else "test"
    if key not in kept:
        kept[key] = Running(cfg, cfg.device)
    running = kept.pop(key) if reset_metrics else kept[key]  # Keras 2: a reset after this batch
    check = "checked" not in kept
    saved = modes(model)
    try:
        model.train(train)
        with torch.set_grad_enabled(train), autocast(cfg):
            if check:
                out, loss, parts = checked_compute(model, cfg, xs, ys, sw, where)
                kept["checked"] = True
            else:
                out, loss, parts = compute(model, cfg, xs, ys, sw)
        if train:
            if "stepper" not in kept:
                kept["stepper"] = GradientStep(cfg, model)
            kept["stepper"].backward(loss, last=False)
    finally:
        restore_modes(saved)
    running.sums[0].add_(loss.detach(), alpha=n)
    running.add(cfg, out, ys, parts, n)
    running.count += n
    return _result(running, return_dict, reset_metrics)


def train_on_batch(model, x, y=None, sample_weight=None, class_weight=None, return_dict=False,
                   reset_metrics=True):
    """``model.train_on_batch``: see ``TrainingMixin.train_on_batch``."""
    cfg = config_of(model, "train_on_batch")
    return _one_step(model, cfg, x, y, sample_weight, class_weight, "train_on_batch", True, return_dict,
                     reset_metrics)


def test_on_batch(model, x, y=None, sample_weight=None, return_dict=False, reset_metrics=True):
    """``model.test_on_batch``: see ``TrainingMixin.test_on_batch``."""
    cfg = config_of(model, "test_on_batch")
    return _one_step(model, cfg, x, y, sample_weight, None, "test_on_batch", False, return_dict, reset_metrics)


def predict_on_batch(model, x):
    """``model.predict_on_batch``: see ``TrainingMixin.predict_on_batch``."""
    st = state_of(model)
    cfg = st.config
    device = cfg.device if cfg is not None else param_device(model)
    info = io_info(model)
    xs = tuple(t.to(device) for t in flatten_inputs(info, x, "predict_on_batch"))
    saved = modes(model)
    try:
        model.eval()
        with torch.no_grad(), autocast(cfg):
            out = model(*xs)
    finally:
        restore_modes(saved)
    return pack_outputs(info, [o.detach().to("cpu") for o in flatten_outputs(info, out)])
