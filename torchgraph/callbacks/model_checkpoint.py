"""``ModelCheckpoint``: save the model (or its weights, or a training checkpoint) at epoch ends."""

from __future__ import annotations

import math
import os

from ..distributed import is_chief
from .base import Callback
from .monitor import Monitor

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(Callback):
    """Save the model at the end of epochs (on rank 0 only), atomically.

    ``filepath`` may hold format fields from the epoch (counted from 1) and the logs:
    ``"ckpt/{epoch:02d}-{val_loss:.3f}.safetensors"``. What is saved:

    - default: the whole model with ``tg.save`` (load it with ``tg.load(path)``);
    - ``save_weights_only=True``: the weights as safetensors (``model.load_weights(path)``);
    - ``include_optimizer=True``: a training checkpoint: weights, optimizer state, callbacks'
      states (LR schedulers...), the epoch and the RNG states; ``model.load_weights(path)`` takes
      the weights from it, ``torchgraph.training.load_checkpoint(model, path)`` everything.

    Either way the file is written to a temporary name and renamed, so a crash never leaves half a
    checkpoint. Epochs whose loss (or monitored value) is NaN or infinite are never saved: the last
    good checkpoint stays.

    Args:
        filepath: where to save. monitor / mode: the quantity that decides what is "best".
        save_best_only: save only when ``monitor`` improved. save_weights_only: weights, not the model.
        save_freq: ``"epoch"`` (the only choice). include_optimizer: a training checkpoint.

    Example:
        >>> import torchgraph as tg
        >>> ckpt = tg.callbacks.ModelCheckpoint("best.safetensors", monitor="val_loss",
        ...                                     save_best_only=True, save_weights_only=True)
    """

    def __init__(self, filepath: str | os.PathLike, monitor: str = "val_loss", verbose: int = 0,
                 save_best_only: bool = False, save_weights_only: bool = False, mode: str = "auto",
                 save_freq: str = "epoch", include_optimizer: bool = False):
        super().__init__()
        if save_freq != "epoch":
            raise ValueError(f"ModelCheckpoint: save_freq must be 'epoch'; received {save_freq!r}.")
        if include_optimizer and save_weights_only:
            raise ValueError("ModelCheckpoint: include_optimizer=True saves a training checkpoint (weights and "
                             "optimizer); save_weights_only=True saves weights alone. Expected one of them.")
        self.filepath, self.monitor, self.verbose = os.fspath(filepath), monitor, verbose
        self.save_best_only, self.save_weights_only = save_best_only, save_weights_only
        self.include_optimizer = include_optimizer
        self._m = Monitor("ModelCheckpoint", monitor, mode, 0.0)
        self.best = None
        self._epoch = None

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]

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
        self._epoch = epoch
        self.save(path)
        if self.verbose:
            print(f"Epoch {epoch + 1}: saved the model to {path}", flush=True)

    def save(self, path: str) -> None:
        """Write one checkpoint to ``path``: ``tg.save`` (whole model), weights, or training state."""
        if self.include_optimizer:
            from ..training.checkpoint import save_checkpoint

            save_checkpoint(self.model, path, epoch=self._epoch)
            return
        if self.save_weights_only:
            from ..training.weights import save_weights

            save_weights(self.model, path)
            return
        from ..saving import save

        try:
            save(self.model, path)
        except ValueError as e:
            raise ValueError(f"ModelCheckpoint: cannot save the whole model: {e} Pass "
                             "save_weights_only=True to save only the weights.") from None
