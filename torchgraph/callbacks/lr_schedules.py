"""Learning-rate callbacks: ``LearningRateScheduler`` and ``ReduceLROnPlateau``."""

from __future__ import annotations

import math

from ..distributed import is_chief
from .base import Callback
from .monitor import Monitor

__all__ = ["LearningRateScheduler", "ReduceLROnPlateau"]


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
    the end of each epoch (PyTorch style; its state is part of training checkpoints). The epoch
    logs get ``learning_rate``.

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

    def state_dict(self) -> dict:
        """The torch scheduler's state (a function schedule has none)."""
        return {"scheduler": self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scheduler") is not None and hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(state["scheduler"])

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
        self._m = Monitor("ReduceLROnPlateau", monitor, mode, min_delta)
        self.monitor, self.factor, self.patience, self.verbose = monitor, factor, patience, verbose
        self.cooldown, self.min_lr = cooldown, min_lr

    def on_train_begin(self, logs=None):
        self.best, self.wait, self.cooldown_counter = None, 0, 0

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait, self.cooldown_counter = state["best"], state["wait"], state["cooldown_counter"]

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
