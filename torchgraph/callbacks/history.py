"""``History``: the epoch logs of a ``fit``, which ``fit`` returns."""

from __future__ import annotations

from .base import Callback

__all__ = ["History"]


class History(Callback):
    """Records epoch logs: ``history.history["loss"]`` is the list of per-epoch losses.

    ``fit`` returns one. ``history.epoch`` lists the epochs run (from 0).

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(2,))
        >>> model = tg.Model(x, nn.Linear(2, 1)(x))
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> history = model.fit(torch.randn(8, 2), torch.randn(8, 1), epochs=2, verbose=0)
        >>> history.epoch, len(history.history["loss"])
        ([0, 1], 2)
    """

    def __init__(self):
        super().__init__()
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)
