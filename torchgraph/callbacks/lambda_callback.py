"""``LambdaCallback``: a callback made of plain functions."""

from __future__ import annotations

from typing import Callable

from .base import Callback

__all__ = ["LambdaCallback"]


class LambdaCallback(Callback):
    """A callback from plain functions, e.g. ``LambdaCallback(on_epoch_end=lambda epoch, logs: ...)``.

    Accepts ``on_train_begin(logs)``, ``on_train_end(logs)``, ``on_epoch_begin(epoch, logs)``,
    ``on_epoch_end(epoch, logs)``, ``on_train_batch_begin(batch, logs)``, ``on_train_batch_end(batch,
    logs)`` and ``on_before_optimizer_step(optimizer)``.

    Example:
        >>> import torchgraph as tg
        >>> losses = []
        >>> cb = tg.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: losses.append(logs["loss"]))
    """

    def __init__(self, on_train_begin: Callable | None = None, on_train_end: Callable | None = None,
                 on_epoch_begin: Callable | None = None, on_epoch_end: Callable | None = None,
                 on_train_batch_begin: Callable | None = None, on_train_batch_end: Callable | None = None,
                 on_before_optimizer_step: Callable | None = None):
        super().__init__()
        given = dict(on_train_begin=on_train_begin, on_train_end=on_train_end, on_epoch_begin=on_epoch_begin,
                     on_epoch_end=on_epoch_end, on_train_batch_begin=on_train_batch_begin,
                     on_train_batch_end=on_train_batch_end, on_before_optimizer_step=on_before_optimizer_step)
        for hook, fn in given.items():
            if fn is not None:
                if not callable(fn):
                    raise TypeError(f"LambdaCallback: {hook} must be callable; received {type(fn).__name__}.")
                setattr(self, hook, fn)
