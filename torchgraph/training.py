"""The built-in training loop: ``compile`` / ``fit`` / ``evaluate`` / ``predict`` on a tg.Model.

``TrainingMixin`` is a base class of ``tg.Model``. The loop is the one you would write by hand
(forward, loss, ``zero_grad``, ``backward``, ``step``) plus bookkeeping that stays on the device:
losses and metrics are summed as tensors and read once per epoch, so ``fit`` costs about what a
handwritten loop costs (see ``benchmarks/bench_fit.py``).

Design constraints:
  - Training state (optimizer, losses, metrics, device, ``stop_training``) lives in a module-level
    ``WeakKeyDictionary`` keyed by the model, never in the model's ``__dict__``: pickling,
    ``torch.save``, ``copy.deepcopy``, ``torch.jit.script`` and ``torch.compile`` see a plain
    GraphModule. A copy or a loaded model is therefore not compiled: call ``compile`` again.
  - Under torch.distributed the same code runs on every rank; only DDP's gradient all-reduce runs
    per step, plus one all-reduce of the epoch's sums (see ``torchgraph.distributed``).
  - Bad data is rejected before the first optimizer step: lengths and structure when the data is
    normalised (``torchgraph.data``), loss/target fit on the first batch (``losses.check_loss_inputs``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from . import distributed as tgdist
from .callbacks import CallbackList, History, ProgbarLogger
from .data import (IOInfo, TensorBatches, flatten_outputs, io_info, make_batches, pack_outputs,
                   split_validation)
from .losses import LossEntry, check_loss_inputs, resolve_losses
from .metrics import MetricEntry, resolve_metrics

__all__ = ["TrainingMixin", "OPTIMIZERS"]

# NOTE: [compile dispatch] nn.Module.compile(**kw) is torch.compile in place. compile() configures
# training (Keras style) when it gets a positional argument or any of these keywords; otherwise
# every argument goes to nn.Module.compile (torch.compile's fullgraph/dynamic/backend/mode/...).
_TRAINING_KWARGS = frozenset({"optimizer", "loss", "metrics", "loss_weights", "device", "amp"})

OPTIMIZERS: dict[str, tuple[type, float]] = {
    "adam": (torch.optim.Adam, 1e-3),
    "adamw": (torch.optim.AdamW, 1e-3),
    "sgd": (torch.optim.SGD, 1e-2),
    "rmsprop": (torch.optim.RMSprop, 1e-3),
    "adagrad": (torch.optim.Adagrad, 1e-2),
    "adamax": (torch.optim.Adamax, 2e-3),
    "nadam": (torch.optim.NAdam, 2e-3),
    "radam": (torch.optim.RAdam, 1e-3),
}


@dataclass
class _Config:
    optimizer: torch.optim.Optimizer
    losses: list[LossEntry]
    metrics: list[MetricEntry]
    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: Any
    info: IOInfo


@dataclass
class _State:
    config: _Config | None = None
    stop_training: bool = False


# model -> _State. Weak keys: the state dies with the model and never travels with it.
_STATES: "weakref.WeakKeyDictionary[nn.Module, _State]" = weakref.WeakKeyDictionary()


def _state(model: nn.Module) -> _State:
    st = _STATES.get(model)
    if st is None:
        st = _STATES[model] = _State()
    return st


def _config(model: nn.Module, where: str) -> _Config:
    cfg = _state(model).config
    if cfg is None:
        raise RuntimeError(f"{model._get_name()}.{where}: the model is not configured for training. Call "
                           "model.compile(optimizer='adam', loss='cross_entropy', metrics=['accuracy']) "
                           f"first (a copied or loaded model needs compile() again).")
    return cfg


class TrainingMixin:
    """Keras-style ``compile``/``fit``/``evaluate``/``predict`` for an ``nn.Module`` (a base of tg.Model).

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(4,))
        >>> model = tg.Model(x, nn.Linear(4, 3)(x))
        >>> model.compile(optimizer="adam", loss="cross_entropy", metrics=["accuracy"])
        >>> history = model.fit(torch.randn(64, 4), torch.randint(0, 3, (64,)), epochs=2, verbose=0)
        >>> sorted(history.history)
        ['accuracy', 'loss']
        >>> sorted(model.evaluate(torch.randn(16, 4), torch.randint(0, 3, (16,)), verbose=0))
        ['accuracy', 'loss']
        >>> model.predict(torch.randn(5, 4)).shape
        torch.Size([5, 3])
    """

    # ------------------------------------------------------------------ state kept outside __dict__
    @property
    @torch.jit.unused
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer set by ``compile`` (None before): use it in custom loops and LR schedulers."""
        cfg = _state(self).config
        return None if cfg is None else cfg.optimizer

    @property
    @torch.jit.unused
    def stop_training(self) -> bool:
        """Set to True (e.g. from a callback) to end ``fit`` after the current batch or epoch."""
        return _state(self).stop_training

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        _state(self).stop_training = bool(value)

    # ------------------------------------------------------------------ compile
    def compile(self, *args, **kwargs):
        """Configure training (Keras style), or torch.compile the model in place (PyTorch style).

        The rule: with a positional argument or any of ``optimizer``, ``loss``, ``metrics``,
        ``loss_weights``, ``device``, ``amp`` it configures training; otherwise (no arguments, or
        only torch.compile's ``backend``/``mode``/``fullgraph``/``dynamic``/``options``/...) it is
        ``nn.Module.compile``. The two combine: ``model.compile(mode="max-autotune")`` then
        ``model.compile(optimizer="adam", loss="mse")`` trains the torch-compiled forward.

        Args:
            optimizer: ``"adam"`` (default), ``"adamw"``, ``"sgd"``, ``"rmsprop"``, ``"adagrad"``,
                ``"adamax"``, ``"nadam"``, ``"radam"`` (default learning rates as in Keras), a
                ``torch.optim.Optimizer`` built on this model's parameters, or a callable
                ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``).
            loss: a name (``"cross_entropy"``, ``"mse"``, ``"mae"``, ``"bce_with_logits"``, ``"bce"``,
                ``"nll"``, ``"huber"``, ``"smooth_l1"``...), an ``nn.Module`` or a callable
                ``loss(prediction, target)`` (PyTorch argument order), or for several outputs a dict
                (or list) of those by output name.
            metrics: names (``"accuracy"``, ``"binary_accuracy"``, ``"categorical_accuracy"``,
                ``"mae"``, ``"mse"``) or callables ``metric(prediction, target) -> batch mean``; a
                list applies to every output, a dict maps output names to metrics.
            loss_weights: a dict (or list) of weights per output for the total loss.
            device: ``"auto"`` (CUDA when available, else CPU), or any torch device. The model
                moves there now; batches move there one at a time.
            amp: mixed precision with ``torch.autocast``: ``False`` (default), ``True`` (bfloat16 on
                CPU, float16 with a GradScaler on CUDA), ``"bf16"`` or ``"fp16"``.

        Raises:
            TypeError: training and torch.compile keywords mixed, or a bad optimizer.
            ValueError: an unknown loss or metric name, or names that are not outputs.
        """
        if not args and not (kwargs.keys() & _TRAINING_KWARGS):
            return super().compile(**kwargs)
        other = sorted(kwargs.keys() - _TRAINING_KWARGS)
        if other:
            raise TypeError(
                f"{self._get_name()}.compile: got training arguments together with {other}. Expected "
                f"either training arguments {sorted(_TRAINING_KWARGS)} (Keras style) or torch.compile "
                "arguments (PyTorch style). Call compile twice to do both."
            )
        self._configure_training(*args, **kwargs)

    def _configure_training(self, optimizer="adam", loss=None, metrics=None, loss_weights=None,
                            device="auto", amp=False) -> None:
        info = io_info(self)
        outputs = list(info.output_names)
        losses = resolve_losses(loss, outputs, loss_weights)
        metric_entries = resolve_metrics(metrics, outputs, losses)
        dev = _resolve_device(device)
        self.to(dev)
        opt = _make_optimizer(self, optimizer)
        amp_dtype = _resolve_amp(amp, dev)
        scaler = None
        if amp_dtype == torch.float16 and dev.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
        for e in losses:
            if isinstance(e.fn, nn.Module):
                e.fn.to(dev)
        _state(self).config = _Config(opt, losses, metric_entries, dev, amp_dtype, scaler, info)

    # ------------------------------------------------------------------ fit
    def fit(self, x=None, y=None, batch_size: int = 32, epochs: int = 1, validation_split: float = 0.0,
            validation_data=None, shuffle: bool = True, callbacks=None, verbose="auto",
            initial_epoch: int = 0, *, distributed: bool | None = None) -> History:
        """Train for ``epochs`` epochs; return a ``History`` (``history.history["loss"]``, ...).

        Args:
            x: inputs: a tensor (or NumPy array); a list/tuple or dict of them for several inputs;
                or a ``Dataset``/``DataLoader`` yielding ``(x, y)`` pairs (then ``y`` is None).
            y: targets: a tensor, or a list/dict by output name for several outputs.
            batch_size: samples per step (ignored for a DataLoader). epochs: the epoch to stop at.
            validation_split: the fraction of the tensors (taken from the end, before shuffling)
                held out for validation. validation_data: ``(x_val, y_val)``, a Dataset or a
                DataLoader; its loss and metrics appear as ``val_*``.
            shuffle: reshuffle the training samples every epoch.
            callbacks: ``tg.callbacks.Callback`` instances.
            verbose: ``"auto"`` (a progress bar on a terminal, else one line per epoch), 0, 1, 2.
            initial_epoch: the epoch to start from (to resume a run).
            distributed: use DistributedDataParallel. None (default): when a process group with
                more than one process is initialised (e.g. under torchrun). True: also initialise one
                from torchrun's environment when needed.

        Returns:
            History: ``.history`` maps ``loss``, metric names and ``val_*`` to per-epoch lists.

        Raises:
            RuntimeError: the model is not compiled for training.
            ValueError / TypeError: data of the wrong structure, lengths or dtypes, or targets that do
                not fit the loss; raised before the first optimizer step.
        """
        cfg = _config(self, "fit")
        _check_epochs(epochs, initial_epoch)
        ddp = _use_distributed(distributed)
        device = _place(self, cfg)
        seed = tgdist.broadcast_int(int(torch.randint(0, 2 ** 31 - 1, ()).item()), device)
        train, val = _fit_data(self, x, y, batch_size, shuffle, validation_split, validation_data,
                               device, seed, ddp)
        verbose = _resolve_verbose(verbose) if tgdist.is_chief() else 0
        net: nn.Module = self
        if ddp:
            from torch.nn.parallel import DistributedDataParallel
            net = DistributedDataParallel(self, device_ids=[device.index] if device.type == "cuda" else None)
        history = History()
        extra = [ProgbarLogger(verbose)] if verbose else []
        params = {"epochs": epochs, "steps": _safe_len(train), "verbose": verbose,
                  "rank": tgdist.rank(), "world_size": tgdist.world_size()}
        callbacks = list(callbacks or [])
        cbs = CallbackList(callbacks + [history] + extra, model=self, params=params)
        # Progress bars run on rank 0 only; user callbacks run everywhere, so only theirs may sync.
        sync_stop = ddp and CallbackList(callbacks).has("on_train_batch_end")
        state = _state(self)
        state.stop_training = False
        modes = _modes(self)
        logs: dict = {}
        try:
            cbs.call("on_train_begin", logs)
            for epoch in range(initial_epoch, epochs):
                net.train()
                cbs.call("on_epoch_begin", epoch, {})
                running = _Running(cfg, device)
                completed = _train_epoch(net, cfg, train, epoch, running, cbs, state,
                                         check=epoch == initial_epoch, sync_stop=sync_stop)
                if not completed:
                    break  # stopped from a batch hook: the epoch is not recorded
                logs = running.result()
                if val is not None:
                    vlogs = _evaluate(self, cfg, val, "fit (validation data)", check=epoch == initial_epoch)
                    logs.update({f"val_{k}": v for k, v in vlogs.items()})
                cbs.call("on_epoch_end", epoch, logs)
                if state.stop_training:
                    break
            cbs.call("on_train_end", logs)
        finally:
            _restore_modes(modes)
        return history

    # ------------------------------------------------------------------ evaluate / predict
    def evaluate(self, x=None, y=None, batch_size: int = 32, verbose="auto", callbacks=None, *,
                 distributed: bool | None = None) -> dict:
        """Loss and metrics over ``x``/``y`` in eval mode under ``no_grad``: ``{"loss": ..., ...}``.

        Accepts the same data as ``fit``. Under torch.distributed each rank evaluates its share and
        the results are combined. The model's previous train/eval modes are restored.
        """
        cfg = _config(self, "evaluate")
        ddp = _use_distributed(distributed)
        device = _place(self, cfg)
        batches = make_batches(self, x, y, batch_size=batch_size, shuffle=False, device=device,
                               shard=ddp, pad=False, where="evaluate")
        cbs = CallbackList(callbacks, model=self, params={"verbose": verbose})
        cbs.call("on_test_begin", {})
        logs = _evaluate(self, cfg, batches, "evaluate", check=True)
        cbs.call("on_test_end", logs)
        if tgdist.is_chief() and _resolve_verbose(verbose):
            print("evaluate - " + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), flush=True)
        return logs

    def predict(self, x, batch_size: int = 32, verbose=0, callbacks=None):
        """The model's outputs for ``x``, batch by batch in eval mode under ``no_grad``, on the CPU.

        Returns the model's output structure (a tensor, a list/tuple or a dict of tensors) with all
        batches concatenated. ``x`` is like ``fit``'s; a Dataset/DataLoader may yield ``x`` or ``(x, y)``.
        Needs no ``compile``: it runs on the device of the model's parameters.
        """
        cfg = _state(self).config
        device = cfg.device if cfg is not None else _param_device(self)
        info = io_info(self)
        batches = make_batches(self, x, None, batch_size=batch_size, shuffle=False, device=device,
                               targets=False, where="predict")
        cbs = CallbackList(callbacks, model=self, params={"verbose": verbose})
        cbs.call("on_predict_begin", {})
        amp = _autocast(cfg)
        modes = _modes(self)
        chunks: list[list[torch.Tensor]] = []
        try:
            self.eval()
            bar = _predict_bar(verbose, batches)
            with torch.no_grad():
                for xs, _, _ in batches.epoch(0):
                    with amp:
                        out = self(*xs)
                    chunks.append([o.detach().to("cpu") for o in flatten_outputs(info, out)])
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                bar.close()
        finally:
            _restore_modes(modes)
        if not chunks:
            raise ValueError("predict: x holds no samples.")
        result = pack_outputs(info, [torch.cat(parts) for parts in zip(*chunks)])
        cbs.call("on_predict_end", {})
        return result


# ---------------------------------------------------------------------- the loops

class _Running(Mapping):
    """Epoch sums on the device. As a Mapping it gives running means (0-dim tensors) to batch hooks."""

    def __init__(self, cfg: _Config, device: torch.device):
        names = ["loss"]
        if len(cfg.info.output_names) > 1:
            names += [f"{e.output}_loss" for e in cfg.losses]
        names += [m.name for m in cfg.metrics]
        self.names = names
        self.sums = [torch.zeros((), device=device) for _ in names]
        self.count = 0
        self._index = {n: i for i, n in enumerate(names)}

    def __getitem__(self, key):
        return self.sums[self._index[key]] / max(self.count, 1)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def result(self) -> dict[str, float]:
        """Epoch means as floats: one host sync (and one all-reduce under torch.distributed)."""
        dev = self.sums[0].device
        t = torch.stack(self.sums + [torch.tensor(float(self.count), device=dev)])
        values = tgdist.all_reduce_sum(t).tolist()
        count = values[-1]
        return {n: (v / count if count else math.nan) for n, v in zip(self.names, values[:-1])}


def _compute(net: nn.Module, cfg: _Config, xs: tuple, ys):
    """Forward, the (weighted) total loss, and per-output losses for several outputs (else None)."""
    out = net(*xs)
    return (out,) + _loss(cfg, out, ys)


def _loss(cfg: _Config, out, ys):
    losses = cfg.losses
    if cfg.info.output_kind == "single":
        e = losses[0]
        loss = e.fn(out, ys)
        return (loss if e.weight == 1.0 else loss * e.weight), None
    flat = flatten_outputs(cfg.info, out)
    names = cfg.info.output_names
    parts = [e.fn(flat[names.index(e.output)], ys[names.index(e.output)]) for e in losses]
    total = parts[0] * losses[0].weight
    for e, p in zip(losses[1:], parts[1:]):
        total = total + p * e.weight
    return total, parts


def _checked_compute(net: nn.Module, cfg: _Config, xs: tuple, ys, where: str):
    """``_compute`` on the first batch, with every loss/target mismatch reported clearly."""
    out = net(*xs)
    info = cfg.info
    flat = flatten_outputs(info, out)
    ys_flat = (ys,) if info.output_kind == "single" else ys
    names = list(info.output_names)
    for e in cfg.losses:
        i = names.index(e.output)
        check_loss_inputs(e, flat[i], ys_flat[i], where)
    try:
        loss, parts = _loss(cfg, out, ys)
    except Exception as err:
        desc = "; ".join(f"output '{n}' {_describe(p)} vs target {_describe(t)}"
                         for n, p, t in zip(names, flat, ys_flat))
        raise ValueError(f"{where}: the loss failed on the first batch ({desc}): {err}") from err
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        got = _describe(loss) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{where}: the loss must be a float scalar tensor (the batch mean); received {got}. "
                         "Use reduction='mean' (or return loss.mean()).")
    with torch.no_grad():
        for m in cfg.metrics:
            try:
                v = m.fn(flat[m.output_index], ys_flat[m.output_index])
            except Exception as err:
                raise ValueError(f"{where}: metric '{m.name}' failed on the first batch (output "
                                 f"{_describe(flat[m.output_index])} vs target "
                                 f"{_describe(ys_flat[m.output_index])}): {err}") from err
            if not isinstance(v, torch.Tensor) or v.numel() != 1:
                raise ValueError(f"{where}: metric '{m.name}' must return a scalar tensor (the batch mean); "
                                 f"received {_describe(v) if isinstance(v, torch.Tensor) else type(v).__name__}.")
    return out, loss, parts


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def _accumulate_parts(running: _Running, cfg: _Config, out, ys, parts, n: int) -> None:
    """Adds per-output losses and metrics (times the batch size) to the epoch sums, on the device."""
    sums = running.sums
    k = 1
    if parts is not None:
        for p in parts:
            sums[k].add_(p.detach(), alpha=n)
            k += 1
    if cfg.metrics:
        with torch.no_grad():
            if cfg.info.output_kind == "single":
                for m in cfg.metrics:
                    sums[k].add_(m.fn(out, ys), alpha=n)
                    k += 1
                return
            flat = flatten_outputs(cfg.info, out)
            for m in cfg.metrics:
                sums[k].add_(m.fn(flat[m.output_index], ys[m.output_index]), alpha=n)
                k += 1


def _train_epoch(net, cfg: _Config, batches, epoch: int, running: _Running, cbs: CallbackList,
                 state: _State, check: bool, sync_stop: bool) -> bool:
    """One epoch of optimizer steps; False when a batch hook set ``stop_training``.

    ``sync_stop``: under DDP with user batch hooks, the ranks agree on stopping after every batch
    (one tiny all-reduce), since a rank that stops alone would hang the others' next step.
    """
    opt, scaler = cfg.optimizer, cfg.scaler
    amp = _autocast(cfg) if cfg.amp_dtype is not None else None
    begin, end = cbs.has("on_train_batch_begin"), cbs.has("on_train_batch_end")
    # NOTE: [Fast path] One output, one unweighted loss, no autocast: the step is the handwritten
    # one, inlined (each avoided Python call is ~0.1-0.5 us per step on small models).
    single = (cfg.info.output_kind == "single" and cfg.losses[0].weight == 1.0 and amp is None)
    loss_fn = cfg.losses[0].fn
    loss_sum = running.sums[0]
    for step, (xs, ys, n) in enumerate(batches.epoch(epoch)):
        if begin:
            cbs.call("on_train_batch_begin", step, running)
        if check:
            with amp or contextlib.nullcontext():
                out, loss, parts = _checked_compute(net, cfg, xs, ys, "fit")
            check = False
        elif single:
            out = net(*xs)
            loss, parts = loss_fn(out, ys), None
        else:
            with amp or contextlib.nullcontext():
                out, loss, parts = _compute(net, cfg, xs, ys)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        loss_sum.add_(loss.detach(), alpha=n)
        if parts is not None or cfg.metrics:
            _accumulate_parts(running, cfg, out, ys, parts, n)
        running.count += n
        if end:
            cbs.call("on_train_batch_end", step, running)
            stop = tgdist.any_rank(state.stop_training, loss_sum.device) if sync_stop \
                else state.stop_training
            if stop:
                state.stop_training = True
                return False
    if running.count == 0 and tgdist.world_size() == 1:
        raise ValueError("fit: the training data holds no samples.")
    return True


def _evaluate(model: nn.Module, cfg: _Config, batches, where: str, check: bool) -> dict[str, float]:
    running = _Running(cfg, _param_device(model))
    amp = _autocast(cfg)
    modes = _modes(model)
    try:
        model.eval()
        with torch.no_grad():
            for xs, ys, n in batches.epoch(0):
                with amp:
                    if check:
                        out, loss, parts = _checked_compute(model, cfg, xs, ys, where)
                        check = False
                    else:
                        out, loss, parts = _compute(model, cfg, xs, ys)
                running.sums[0].add_(loss.detach(), alpha=n)
                if parts is not None or cfg.metrics:
                    _accumulate_parts(running, cfg, out, ys, parts, n)
                running.count += n
    finally:
        _restore_modes(modes)
    return running.result()


# ---------------------------------------------------------------------- helpers

def _fit_data(model, x, y, batch_size, shuffle, validation_split, validation_data, device, seed, ddp):
    if validation_split and validation_data is not None:
        raise ValueError("fit: got both validation_split and validation_data. Expected one of them.")
    if validation_split:
        (xs, ys), (vxs, vys) = split_validation(model, x, y, validation_split)
        _check_batch_size(batch_size)
        train = TensorBatches(xs, ys, batch_size, shuffle, device, seed=seed, shard=ddp, where="fit")
        val = TensorBatches(vxs, vys, batch_size, False, device, shard=ddp, pad=False,
                            where="fit (validation_split)")
        return train, val
    train = make_batches(model, x, y, batch_size=batch_size, shuffle=shuffle, device=device, seed=seed,
                         shard=ddp, where="fit")
    val = None
    if validation_data is not None:
        vx, vy = validation_data, None
        if isinstance(validation_data, tuple):
            if len(validation_data) != 2:
                raise ValueError(f"fit: validation_data must be (x_val, y_val), a Dataset or a DataLoader; "
                                 f"received a tuple of {len(validation_data)} items.")
            vx, vy = validation_data
        val = make_batches(model, vx, vy, batch_size=batch_size, shuffle=False, device=device,
                           shard=ddp, pad=False, where="fit (validation_data)")
    return train, val


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"fit: batch_size must be a positive int; received {batch_size!r}.")


def _check_epochs(epochs, initial_epoch) -> None:
    for name, v in (("epochs", epochs), ("initial_epoch", initial_epoch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"fit: {name} must be a non-negative int; received {v!r}.")


def _safe_len(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        if torch.cuda.is_available():
            local = os.environ.get("LOCAL_RANK")
            return torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"compile: device must be 'auto' or a torch device; received {device!r}.") from None


def _resolve_amp(amp, device: torch.device) -> torch.dtype | None:
    if amp is False or amp is None:
        return None
    if amp is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, torch.float16: torch.float16}
    if amp not in names:
        raise ValueError(f"compile: amp must be False, True, 'bf16' or 'fp16'; received {amp!r}.")
    return names[amp]


def _autocast(cfg: _Config | None):
    if cfg is None or cfg.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(cfg.device.type, dtype=cfg.amp_dtype)


def _make_optimizer(model: nn.Module, spec) -> torch.optim.Optimizer:
    if isinstance(spec, str):
        key = spec.lower()
        if key not in OPTIMIZERS:
            raise ValueError(f"compile: unknown optimizer {spec!r}. Expected one of {sorted(OPTIMIZERS)}, a "
                             "torch.optim.Optimizer, or a callable params -> Optimizer.")
        cls, lr = OPTIMIZERS[key]
        return cls(model.parameters(), lr=lr)
    if isinstance(spec, torch.optim.Optimizer):
        own = {id(p) for p in model.parameters()}
        theirs = [p for g in spec.param_groups for p in g["params"]]
        if own and not any(id(p) in own for p in theirs):
            raise ValueError("compile: the optimizer holds none of this model's parameters (was it built "
                             "for another model, or before a copy?). Expected torch.optim.X(model.parameters()).")
        return spec
    if callable(spec):
        opt = spec(model.parameters())
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"compile: the optimizer factory returned {type(opt).__name__}; expected a "
                            "torch.optim.Optimizer.")
        return opt
    raise TypeError(f"compile: optimizer must be a name, a torch.optim.Optimizer or a callable; received "
                    f"{type(spec).__name__}.")


def _param_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


def _place(model: nn.Module, cfg: _Config) -> torch.device:
    if _param_device(model) != cfg.device:
        model.to(cfg.device)
    return cfg.device


def _use_distributed(distributed: bool | None) -> bool:
    if distributed is None:
        return tgdist.is_distributed()
    if distributed:
        tgdist.init_from_env()
        return tgdist.world_size() > 1
    return False


def _resolve_verbose(verbose) -> int:
    if verbose == "auto":
        if not sys.stdout.isatty():
            return 2
        try:
            import tqdm  # noqa: F401
        except ImportError:
            return 2
        return 1
    if verbose not in (0, 1, 2, False, True):
        raise ValueError(f"verbose must be 'auto', 0, 1 or 2; received {verbose!r}.")
    verbose = int(verbose)
    if verbose == 1:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            raise ImportError("verbose=1 shows a tqdm progress bar: pip install 'torchgraph-fx[train]' "
                              "(or use verbose=2 for one line per epoch).") from None
    return verbose


def _predict_bar(verbose, batches):
    if verbose != 1 or not tgdist.is_chief():
        return None
    _resolve_verbose(1)
    from tqdm.auto import tqdm
    return tqdm(total=_safe_len(batches), desc="predict", unit="step", file=sys.stdout)


def _modes(model: nn.Module) -> list:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list) -> None:
    for m, training in modes:
        m.training = training
