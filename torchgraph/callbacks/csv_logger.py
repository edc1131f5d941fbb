"""``CSVLogger``: the epoch logs as rows of a CSV file."""

from __future__ import annotations

import csv
import os

from ..distributed import is_chief
from .base import Callback

__all__ = ["CSVLogger"]


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
