"""``EarlyStopping``: stop when a monitored quantity stops improving."""

from __future__ import annotations

from ..distributed import is_chief
from .base import Callback
from .monitor import Monitor

__all__ = ["EarlyStopping"]


def _copy_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
        self._m = Monitor("EarlyStopping", monitor, mode, min_delta)
        self.monitor, self.patience, self.verbose = monitor, patience, verbose
        self.baseline, self.restore_best_weights = baseline, restore_best_weights
        self.start_from_epoch = start_from_epoch

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch, self.best_epoch = 0, 0, 0
        self.best, self.best_weights = None, None

    def state_dict(self) -> dict:
        """What ``BackupAndRestore`` keeps: the counters, the best value and (if kept) its weights."""
        return {"wait": self.wait, "stopped_epoch": self.stopped_epoch, "best_epoch": self.best_epoch,
                "best": self.best, "best_weights": self.best_weights}

    def load_state_dict(self, state: dict) -> None:
        self.wait, self.stopped_epoch = state["wait"], state["stopped_epoch"]
        self.best_epoch, self.best, self.best_weights = state["best_epoch"], state["best"], state["best_weights"]

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
