"""Callbacks for ``Model.fit``: hooks called at the start and end of training, epochs and batches.

Names and semantics follow Keras (``tg.callbacks.EarlyStopping(monitor="val_loss", patience=3)``):

  - ``epoch`` passed to hooks counts from 0; messages and ``ModelCheckpoint`` file names count from 1.
  - ``logs`` at epoch end map names to floats: ``loss``, metrics, ``val_*``, reduced over all ranks
    under torch.distributed, so every rank takes the same decisions (stop, lower the LR).
  - ``logs`` in batch hooks hold running means of the epoch so far as 0-dim *tensors*: reading one
    (``float(logs["loss"])``) waits for the device, so the loop never does unless a hook asks.
  - Only rank 0 prints, writes logs and checkpoints (``torchgraph.distributed.is_chief()``).
  - ``self.model`` is the user's model (never the DDP wrapper); setting ``self.model.stop_training
    = True`` ends training after the current batch or epoch. An epoch cut short from a batch hook is
    not recorded and its ``on_epoch_end`` is not called, so a checkpoint of it is never written.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
import warnings
from typing import Callable

from .distributed import is_chief

__all__ = ["Callback", "CallbackList", "History", "ProgbarLogger", "EarlyStopping", "ModelCheckpoint",
           "LearningRateScheduler", "ReduceLROnPlateau", "TerminateOnNaN", "CSVLogger", "LambdaCallback"]

_HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
          "on_train_batch_end", "on_test_begin", "on_test_end", "on_predict_begin", "on_predict_end")


class Callback:
    """Base class: override the hooks you need. ``self.model`` and ``self.params`` are set by fit.

    ``params`` holds ``epochs``, ``steps`` (per epoch, None when unknown), ``verbose``, ``rank``
    and ``world_size``.

    Example:
        >>> import torchgraph as tg
        >>> class PrintLoss(tg.callbacks.Callback):
        ...     def on_epoch_end(self, epoch, logs=None):
        ...         print(f"epoch {epoch + 1}: loss {logs['loss']:.3f}")
    """

    def __init__(self):
        self.model = None
        self.params: dict = {}

    def set_model(self, model) -> None:
        self.model = model

    def set_params(self, params: dict) -> None:
        self.params = params

    def on_train_begin(self, logs=None): pass
    def on_train_end(self, logs=None): pass
    def on_epoch_begin(self, epoch, logs=None): pass
    def on_epoch_end(self, epoch, logs=None): pass
    def on_train_batch_begin(self, batch, logs=None): pass
    def on_train_batch_end(self, batch, logs=None): pass
    def on_test_begin(self, logs=None): pass
    def on_test_end(self, logs=None): pass
    def on_predict_begin(self, logs=None): pass
    def on_predict_end(self, logs=None): pass


def _overrides(cb: Callback, hook: str) -> bool:
    return getattr(getattr(cb, hook), "__func__", None) is not getattr(Callback, hook)


class CallbackList:
    """Calls each hook on every callback that overrides it (so unused batch hooks cost nothing)."""

    def __init__(self, callbacks, model=None, params: dict | None = None):
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks: expected tg.callbacks.Callback instances; received "
                                f"{type(cb).__name__}. Subclass tg.callbacks.Callback or use LambdaCallback.")
            if model is not None:
                cb.set_model(model)
            if params is not None:
                cb.set_params(params)
        self._by_hook = {h: [getattr(cb, h) for cb in self.callbacks if _overrides(cb, h)] for h in _HOOKS}

    def has(self, hook: str) -> bool:
        return bool(self._by_hook[hook])

    def call(self, hook: str, *args) -> None:
        for fn in self._by_hook[hook]:
            fn(*args)


class History(Callback):
    """Records epoch logs: ``history.history["loss"]`` is the list of per-epoch losses.

    ``fit`` returns one. ``history.epoch`` lists the epochs run (from 0).
    """

    def __init__(self):
        super().__init__()
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)


def _format_logs(logs) -> str:
    return " - ".join(f"{k}: {float(v):.4f}" for k, v in logs.items())


class ProgbarLogger(Callback):
    """Progress output on rank 0: a tqdm bar per epoch (``verbose=1``) or one line per epoch (2).

    The bar shows steps, rate, ETA and the running loss and metrics, refreshed every
    ``refresh_seconds`` (reading them waits for the device, so not on every step).
    """

    def __init__(self, verbose: int = 1, refresh_seconds: float = 0.5, file=None):
        super().__init__()
        self.verbose, self.refresh_seconds, self.file = verbose, refresh_seconds, file
        self._bar = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._last = self._start
        if self.verbose == 1:
            from tqdm.auto import tqdm
            epochs = self.params.get("epochs")
            self._bar = tqdm(total=self.params.get("steps"), desc=f"Epoch {epoch + 1}/{epochs}",
                             unit="step", file=self.file or sys.stdout, dynamic_ncols=True, leave=True)

    def on_train_batch_end(self, batch, logs=None):
        bar = self._bar
        if bar is None:
            return
        bar.update(1)
        now = time.perf_counter()
        if now - self._last >= self.refresh_seconds:
            self._last = now
            bar.set_postfix_str(_format_logs(logs), refresh=False)

    def on_epoch_end(self, epoch, logs=None):
        if self._bar is not None:
            self._bar.set_postfix_str(_format_logs(logs), refresh=True)
            self._bar.close()
            self._bar = None
        elif self.verbose == 2:
            took = time.perf_counter() - self._start
            print(f"Epoch {epoch + 1}/{self.params.get('epochs')} - {took:.1f}s - {_format_logs(logs)}",
                  file=self.file or sys.stdout, flush=True)

    def on_train_end(self, logs=None):
        if self._bar is not None:  # stopped mid-epoch
            self._bar.close()
            self._bar = None


class _Monitor:
    """Which way is better for a monitored quantity, and by how much it must change."""

    def __init__(self, who: str, monitor: str, mode: str, min_delta: float):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"{who}: mode must be 'auto', 'min' or 'max'; received {mode!r}.")
        if mode == "auto":
            mode = "max" if ("acc" in monitor or monitor.endswith("auc")) else "min"
        self.who, self.monitor, self.mode, self.min_delta = who, monitor, mode, abs(min_delta)
        self._warned = False

    def value(self, logs) -> float | None:
        v = (logs or {}).get(self.monitor)
        if v is None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"{self.who}: the monitored quantity '{self.monitor}' is not in the logs "
                              f"(available: {sorted(logs or {})}). Expected one of those; the callback "
                              "does nothing.", UserWarning, stacklevel=3)
            return None
        return float(v)

    def improved(self, current: float, best: float | None) -> bool:
        if best is None:
            return math.isfinite(current)
        if self.mode == "min":
            return current < best - self.min_delta
        return current > best + self.min_delta


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs.

    Args:
        monitor: a logs key (``"val_loss"``, ``"accuracy"``...). mode: ``"min"``, ``"max"`` or
            ``"auto"`` (max for accuracies). min_delta: the smallest change that counts.
        patience: epochs without improvement before stopping. baseline: a value to beat first.
        restore_best_weights: when stopping, load the weights of the best epoch.
        start_from_epoch: epochs to wait before counting.

    Example:
        >>> import torchgraph as tg
        >>> stop = tg.callbacks.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0,
                 verbose: int = 0, mode: str = "auto", baseline: float | None = None,
                 restore_best_weights: bool = False, start_from_epoch: int = 0):
        super().__init__()
        self._m = _Monitor("EarlyStopping", monitor, mode, min_delta)
        self.monitor, self.patience, self.verbose = monitor, patience, verbose
        self.baseline, self.restore_best_weights = baseline, restore_best_weights
        self.start_from_epoch = start_from_epoch

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch, self.best_epoch = 0, 0, 0
        self.best, self.best_weights = None, None

    def on_epoch_end(self, epoch, logs=None):
        current = self._m.value(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = _copy_weights(self.model)
        self.wait += 1
        if self._m.improved(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = _copy_weights(self.model)
            if self.baseline is None or self._m.improved(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            if self.restore_best_weights and self.best_weights is not None:
                self.model.load_state_dict(self.best_weights)
            if self.verbose and is_chief():
                print(f"Epoch {epoch + 1}: early stopping"
                      + (f"; restored the weights of epoch {self.best_epoch + 1}"
                         if self.restore_best_weights else ""), flush=True)


def _copy_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_weights_atomic(model, path: str) -> None:
    """``model``'s weights as a safetensors file, written to a temporary file and renamed."""
    try:
        from safetensors.torch import save_model
    except ImportError:
        raise ImportError("ModelCheckpoint needs safetensors to save weights: pip install "
                          "'torchgraph-fx[io]'") from None
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_model(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ModelCheckpoint(Callback):
    """Save the model at the end of epochs (on rank 0 only), atomically.

    ``filepath`` may hold format fields from the epoch (counted from 1) and the logs:
    ``"ckpt/{epoch:02d}-{val_loss:.3f}.safetensors"``. The whole model is saved with ``tg.save``
    (load it with ``tg.load(path)``); with ``save_weights_only=True`` only the weights go to a
    safetensors file, loaded back with ``safetensors.torch.load_model(model, path)``. Either way the
    file is written to a temporary name and renamed, so a crash never leaves half a checkpoint. Epochs whose
    loss (or monitored value) is NaN or infinite are never saved: the last good checkpoint stays.

    Args:
        filepath: where to save. monitor / mode: the quantity that decides what is "best".
        save_best_only: save only when ``monitor`` improved. save_weights_only: weights, not the model.
        save_freq: ``"epoch"`` (the only choice).

    Example:
        >>> import torchgraph as tg
        >>> ckpt = tg.callbacks.ModelCheckpoint("best.safetensors", monitor="val_loss",
        ...                                     save_best_only=True, save_weights_only=True)
    """

    def __init__(self, filepath: str | os.PathLike, monitor: str = "val_loss", verbose: int = 0,
                 save_best_only: bool = False, save_weights_only: bool = False, mode: str = "auto",
                 save_freq: str = "epoch"):
        super().__init__()
        if save_freq != "epoch":
            raise ValueError(f"ModelCheckpoint: save_freq must be 'epoch'; received {save_freq!r}.")
        self.filepath, self.monitor, self.verbose = os.fspath(filepath), monitor, verbose
        self.save_best_only, self.save_weights_only = save_best_only, save_weights_only
        self._m = _Monitor("ModelCheckpoint", monitor, mode, 0.0)
        self.best = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            return
        if self.save_best_only:
            current = self._m.value(logs)
            if current is None or not self._m.improved(current, self.best):
                return
            self.best = current
        if not is_chief():
            return
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except KeyError as e:
            raise ValueError(f"ModelCheckpoint: the filepath {self.filepath!r} names {e}, which is not in "
                             f"the logs. Expected fields among {['epoch'] + sorted(logs)}.") from None
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.save(path)
        if self.verbose:
            print(f"Epoch {epoch + 1}: saved the model to {path}", flush=True)

    def save(self, path: str) -> None:
        """Write one checkpoint to ``path``: ``tg.save`` (whole model) or safetensors weights."""
        if self.save_weights_only:
            _save_weights_atomic(self.model, path)
            return
        from .saving import save

        try:
            save(self.model, path)
        except ValueError as e:
            raise ValueError(f"ModelCheckpoint: cannot save the whole model: {e} Pass "
                             "save_weights_only=True to save only the weights.") from None


def _learning_rates(optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def _optimizer_of(cb: Callback, who: str):
    opt = getattr(cb.model, "optimizer", None)
    if opt is None:
        raise RuntimeError(f"{who}: the model has no optimizer. Call model.compile(optimizer=..., loss=...) "
                           "before fit.")
    return opt


class LearningRateScheduler(Callback):
    """Set the learning rate each epoch from ``schedule``.

    ``schedule`` is either a function ``schedule(epoch, lr) -> new_lr`` called at the start of each
    epoch (Keras style), or a ``torch.optim.lr_scheduler`` built on ``model.optimizer``, stepped at
    the end of each epoch (PyTorch style). The epoch logs get ``learning_rate``.

    Example:
        >>> import torchgraph as tg
        >>> halve = tg.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5)
    """

    def __init__(self, schedule, verbose: int = 0):
        super().__init__()
        if not (callable(schedule) or hasattr(schedule, "step")):
            raise TypeError(f"LearningRateScheduler: schedule must be a function (epoch, lr) -> lr or a "
                            f"torch lr_scheduler; received {type(schedule).__name__}.")
        self.schedule, self.verbose = schedule, verbose

    def on_epoch_begin(self, epoch, logs=None):
        if hasattr(self.schedule, "step"):
            return
        opt = _optimizer_of(self, "LearningRateScheduler")
        for g in opt.param_groups:
            lr = self.schedule(epoch, float(g["lr"]))
            if not isinstance(lr, (float, int)) or not math.isfinite(lr):
                raise ValueError(f"LearningRateScheduler: the schedule returned {lr!r} at epoch {epoch}. "
                                 "Expected a finite float.")
            g["lr"] = float(lr)
        if self.verbose and is_chief():
            print(f"Epoch {epoch + 1}: learning rate {_learning_rates(opt)[0]:.6g}", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        opt = _optimizer_of(self, "LearningRateScheduler")
        if logs is not None:
            logs["learning_rate"] = _learning_rates(opt)[0]
        if hasattr(self.schedule, "step"):
            self.schedule.step()


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` stops improving for ``patience`` epochs.

    Example:
        >>> import torchgraph as tg
        >>> plateau = tg.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2)
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10,
                 verbose: int = 0, mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0,
                 min_lr: float = 0.0):
        super().__init__()
        if not 0.0 < factor < 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor must be in (0, 1); received {factor!r}.")
        self._m = _Monitor("ReduceLROnPlateau", monitor, mode, min_delta)
        self.monitor, self.factor, self.patience, self.verbose = monitor, factor, patience, verbose
        self.cooldown, self.min_lr = cooldown, min_lr

    def on_train_begin(self, logs=None):
        self.best, self.wait, self.cooldown_counter = None, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        opt = _optimizer_of(self, "ReduceLROnPlateau")
        if logs is not None:
            logs["learning_rate"] = _learning_rates(opt)[0]
        current = self._m.value(logs)
        if current is None:
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._m.improved(current, self.best):
            self.best, self.wait = current, 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            if self.wait >= self.patience:
                for g in opt.param_groups:
                    g["lr"] = max(float(g["lr"]) * self.factor, self.min_lr)
                self.cooldown_counter, self.wait = self.cooldown, 0
                if self.verbose and is_chief():
                    print(f"Epoch {epoch + 1}: ReduceLROnPlateau set the learning rate to "
                          f"{_learning_rates(opt)[0]:.6g}", flush=True)


class TerminateOnNaN(Callback):
    """Stop training as soon as the loss becomes NaN or infinite.

    It reads the running loss after every batch, which waits for the device each step (free on CPU;
    a small stall per step on a GPU). The NaN epoch is not recorded and not checkpointed.
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            if is_chief():
                print(f"Batch {batch}: invalid loss {float(loss)}, terminating training", flush=True)
            self.model.stop_training = True


class CSVLogger(Callback):
    """Write the epoch logs to a CSV file (rank 0 only), one row per epoch, flushed as it goes.

    Example:
        >>> import torchgraph as tg
        >>> logger = tg.callbacks.CSVLogger("training.csv")
    """

    def __init__(self, filename: str | os.PathLike, separator: str = ",", append: bool = False):
        super().__init__()
        self.filename, self.separator, self.append = os.fspath(filename), separator, append
        self._file = self._writer = None

    def on_train_begin(self, logs=None):
        if not is_chief():
            return
        has_header = self.append and os.path.exists(self.filename) and os.path.getsize(self.filename) > 0
        self._file = open(self.filename, "a" if self.append else "w", newline="")
        self._writer, self._keys, self._has_header = None, None, has_header

    def on_epoch_end(self, epoch, logs=None):
        if self._file is None:
            return
        logs = logs or {}
        if self._writer is None:
            self._keys = ["epoch"] + list(logs)
            self._writer = csv.DictWriter(self._file, fieldnames=self._keys, delimiter=self.separator,
                                          extrasaction="ignore")
            if not self._has_header:
                self._writer.writeheader()
        self._writer.writerow({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


class LambdaCallback(Callback):
    """A callback from plain functions, e.g. ``LambdaCallback(on_epoch_end=lambda epoch, logs: ...)``.

    Accepts ``on_train_begin(logs)``, ``on_train_end(logs)``, ``on_epoch_begin(epoch, logs)``,
    ``on_epoch_end(epoch, logs)``, ``on_train_batch_begin(batch, logs)``, ``on_train_batch_end(batch,
    logs)``.

    Example:
        >>> import torchgraph as tg
        >>> losses = []
        >>> cb = tg.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: losses.append(logs["loss"]))
    """

    def __init__(self, on_train_begin: Callable | None = None, on_train_end: Callable | None = None,
                 on_epoch_begin: Callable | None = None, on_epoch_end: Callable | None = None,
                 on_train_batch_begin: Callable | None = None, on_train_batch_end: Callable | None = None):
        super().__init__()
        given = dict(on_train_begin=on_train_begin, on_train_end=on_train_end, on_epoch_begin=on_epoch_begin,
                     on_epoch_end=on_epoch_end, on_train_batch_begin=on_train_batch_begin,
                     on_train_batch_end=on_train_batch_end)
        for hook, fn in given.items():
            if fn is not None:
                if not callable(fn):
                    raise TypeError(f"LambdaCallback: {hook} must be callable; received {type(fn).__name__}.")
                setattr(self, hook, fn)

