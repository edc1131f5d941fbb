"""``evaluate`` and ``predict``: the model in eval mode under ``no_grad``, batch by batch.

Both restore every submodule's previous train/eval mode afterwards (a submodule the user put in
eval mode stays so). Under torch.distributed ``evaluate`` shards without padding, so each sample
counts exactly once; ``predict`` does not shard: each rank predicts all of ``x``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import distributed as tgdist
from ..callbacks import CallbackList, progress_bar, resolve_verbose
from ..data import (LimitedBatches, flatten_outputs, io_info, make_batches,
                    pack_outputs)
from .arguments import check_steps, param_device, place, use_distributed
from .configure import autocast
from .running import Running
from .state import TrainingConfig, config_of, state_of
from .step import checked_compute, compute

__all__ = ["evaluate", "evaluate_batches", "predict", "modes", "restore_modes"]


def modes(model: nn.Module) -> list:
    return [(m, m.training) for m in model.modules()]


def restore_modes(saved: list) -> None:
    for m, training in saved:
        m.training = training


def evaluate_batches(model: nn.Module, cfg: TrainingConfig, batches, where: str, check: bool) -> dict[str, float]:
    """Loss and metrics over ``batches`` in eval mode: ``{"loss": ..., metric: ...}``."""
    running = Running(cfg, param_device(model))
    amp = autocast(cfg)
    saved = modes(model)
    try:
        model.eval()
        with torch.no_grad():
            for xs, ys, sw, n in batches.epoch(0):
                with amp:
                    if check:
                        out, loss, parts = checked_compute(model, cfg, xs, ys, sw, where)
                        check = False
                    else:
                        out, loss, parts = compute(model, cfg, xs, ys, sw)
                running.sums[0].add_(loss.detach(), alpha=n)
                running.add(cfg, out, ys, parts, n)
                running.count += n
    finally:
        restore_modes(saved)
    return running.result()


def evaluate(model, x=None, y=None, batch_size=32, verbose="auto", sample_weight=None, steps=None,
             callbacks=None, distributed=None) -> dict:
    """``model.evaluate``: see ``TrainingMixin.evaluate``."""
    cfg = config_of(model, "evaluate")
    ddp = use_distributed(distributed)
    device = place(model, cfg)
    batches = make_batches(model, x, y, batch_size=batch_size, shuffle=False, device=device, shard=ddp, pad=False,
                           sample_weight=sample_weight, where="evaluate")
    steps = check_steps("steps", steps, "evaluate")
    if steps is not None:
        batches = LimitedBatches(batches, steps, persistent=False)
    cbs = CallbackList(callbacks, model=model, params={"verbose": verbose})
    cbs.call("on_test_begin", {})
    logs = evaluate_batches(model, cfg, batches, "evaluate", check=True)
    cbs.call("on_test_end", logs)
    if tgdist.is_chief() and resolve_verbose(verbose):
        print("evaluate - " + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), flush=True)
    return logs


def predict(model, x, batch_size=32, verbose=0, steps=None, callbacks=None):
    """``model.predict``: see ``TrainingMixin.predict``."""
    cfg = state_of(model).config
    device = cfg.device if cfg is not None else param_device(model)
    info = io_info(model)
    batches = make_batches(model, x, None, batch_size=batch_size, shuffle=False, device=device, targets=False,
                           where="predict")
    steps = check_steps("steps", steps, "predict")
    if steps is not None:
        batches = LimitedBatches(batches, steps, persistent=False)
    cbs = CallbackList(callbacks, model=model, params={"verbose": verbose})
    cbs.call("on_predict_begin", {})
    amp = autocast(cfg)
    saved = modes(model)
    chunks: list[list[torch.Tensor]] = []
    bar = None
    try:
        model.eval()
        if resolve_verbose(verbose) == 1 and tgdist.is_chief():
            bar = progress_bar(_length(batches), "predict")
        with torch.no_grad():
            for xs, _, _, _ in batches.epoch(0):
                with amp:
                    out = model(*xs)
                chunks.append([o.detach().to("cpu") for o in flatten_outputs(info, out)])
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        restore_modes(saved)
    if not chunks:
        raise ValueError("predict: x holds no samples.")
    result = pack_outputs(info, [torch.cat(parts) for parts in zip(*chunks)])
    cbs.call("on_predict_end", {})
    return result


def _length(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None

