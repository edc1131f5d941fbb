"""``TerminateOnNaN``: stop as soon as the loss is NaN or infinite."""

from __future__ import annotations

import math

from ..distributed import is_chief
from .base import Callback

__all__ = ["TerminateOnNaN"]


class TerminateOnNaN(Callback):
    """Stop training as soon as the loss becomes NaN or infinite.

    It reads the running loss after every batch, which waits for the device each step (free on CPU;
    a small stall per step on a GPU). The NaN epoch is not recorded and not checkpointed.

    Example:
        >>> import torchgraph as tg
        >>> stop_on_nan = tg.callbacks.TerminateOnNaN()
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            if is_chief():
                print(f"Batch {batch}: invalid loss {float(loss)}, terminating training", flush=True)
            self.model.stop_training = True
