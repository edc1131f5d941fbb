"""``TensorBoard``: losses, metrics, learning rate and weight histograms as TensorBoard event files.

Written with ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package:
``pip install 'torchgraph-fx[train]'``). The layout is Keras': ``log_dir/train`` and
``log_dir/validation`` hold the scalars ``epoch_loss``, ``epoch_<metric>`` (validation values
without their ``val_`` prefix, so both runs share one chart), ``epoch_learning_rate`` when a
callback logs it, and with ``update_freq`` a number of batches, ``batch_<name>`` every that many
steps (counted over the whole run). Only rank 0 writes.
"""

from __future__ import annotations

import os

from ..distributed import is_chief
from .base import Callback

__all__ = ["TensorBoard"]


class TensorBoard(Callback):
    """Write TensorBoard logs under ``log_dir`` (view them with ``tensorboard --logdir log_dir``).

    Args:
        log_dir: the directory for the event files (``train/`` and ``validation/`` below it).
        histogram_freq: every how many epochs to write a histogram of each parameter (0: never).
        update_freq: ``"epoch"``, or a number of batches between ``batch_*`` scalars (reading the
            running values waits for the device, so not every step unless asked).

    Example:
        >>> import os, tempfile, torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(3,))
        >>> model = tg.Model(x, nn.Linear(3, 1)(x))
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> log_dir = tempfile.mkdtemp()
        >>> _ = model.fit(torch.randn(32, 3), torch.randn(32, 1), epochs=2, verbose=0,
        ...               callbacks=[tg.callbacks.TensorBoard(log_dir)])
        >>> sorted(os.listdir(log_dir))
        ['train']
    """

    def __init__(self, log_dir: str | os.PathLike = "logs", histogram_freq: int = 0, update_freq="epoch"):
        super().__init__()
        if not (update_freq == "epoch" or update_freq == "batch"
                or (isinstance(update_freq, int) and not isinstance(update_freq, bool) and update_freq >= 1)):
            raise ValueError(f"TensorBoard: update_freq must be 'epoch', 'batch' or a positive int; received "
                             f"{update_freq!r}.")
        if not isinstance(histogram_freq, int) or isinstance(histogram_freq, bool) or histogram_freq < 0:
            raise ValueError(f"TensorBoard: histogram_freq must be an int >= 0; received {histogram_freq!r}.")
        self.log_dir, self.histogram_freq = os.fspath(log_dir), histogram_freq
        self.update_freq = 1 if update_freq == "batch" else update_freq
        self._writers: dict = {}
        self._step = 0

    def _writer(self, run: str):
        if run not in self._writers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("TensorBoard needs the tensorboard package: pip install 'torchgraph-fx[train]' (or "
                                  "pip install tensorboard).") from None
            self._writers[run] = SummaryWriter(os.path.join(self.log_dir, run))
        return self._writers[run]

    def on_train_begin(self, logs=None):
        if is_chief():
            self._writer("train")  # fail now, not after the first epoch, when tensorboard is missing

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.update_freq == "epoch" or not is_chief() or self._step % self.update_freq:
            return
        writer = self._writer("train")
        for name, value in (logs or {}).items():
            writer.add_scalar(f"batch_{name}", float(value), self._step)

    def on_epoch_end(self, epoch, logs=None):
        if not is_chief():
            return
        train, val = self._writer("train"), None
        for name, value in (logs or {}).items():
            if name.startswith("val_"):
                val = val or self._writer("validation")
                val.add_scalar(f"epoch_{name[4:]}", float(value), epoch)
            else:
                train.add_scalar(f"epoch_{name}", float(value), epoch)
        if self.histogram_freq and (epoch + 1) % self.histogram_freq == 0:
            for name, p in self.model.named_parameters():
                train.add_histogram(name, p.detach().float().cpu(), epoch)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
