"""``BackupAndRestore``: an interrupted ``fit`` resumes where it stopped, with the same result."""

from __future__ import annotations

import os

from .. import distributed as tgdist
from .base import Callback

__all__ = ["BackupAndRestore"]


class BackupAndRestore(Callback):
    """Back up the training state at every epoch end; a new ``fit`` resumes from the last backup.

    Keras semantics: when ``fit`` starts and ``backup_dir`` holds a backup, the weights, the
    optimizer's state, the other callbacks' states (LR schedulers, ``EarlyStopping``...), the
    random generators and the data order are restored, and training continues at the epoch after
    the last completed one. When ``fit`` ends normally the backup is deleted
    (``delete_checkpoint=True``), so the next ``fit`` starts afresh.

    An interrupted run resumed this way ends with the same weights as one never interrupted, bit
    for bit on the same machine, when its data is tensors, a Dataset or a DataLoader (their order
    is restored) and ``steps_per_epoch`` is not set (a generator's position cannot be restored).

    The backup is one file per process (``latest.safetensors``, or ``latest-rank{r}.safetensors``
    under torch.distributed), written to a temporary name and renamed: a kill while writing
    leaves the previous backup.

    Args:
        backup_dir: the directory for the backup (created if needed).
        save_freq: ``"epoch"`` (the only choice: resuming mid-epoch would need the data's position).
        delete_checkpoint: delete the backup when ``fit`` ends normally.

    Example:
        >>> import os, tempfile, torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(3,))
        >>> model = tg.Model(x, nn.Linear(3, 1)(x))
        >>> model.compile(optimizer="adam", loss="mse")
        >>> backup = tg.callbacks.BackupAndRestore(os.path.join(tempfile.mkdtemp(), "backup"))
        >>> history = model.fit(torch.randn(32, 3), torch.randn(32, 1), epochs=2, callbacks=[backup], verbose=0)
        >>> history.epoch, os.listdir(backup.backup_dir)  # done: the backup is deleted
        ([0, 1], [])
    """

    def __init__(self, backup_dir: str | os.PathLike, save_freq: str = "epoch", delete_checkpoint: bool = True):
        super().__init__()
        if save_freq != "epoch":
            raise ValueError(f"BackupAndRestore: save_freq must be 'epoch'; received {save_freq!r}. (Resuming "
                             "inside an epoch would need the position in the data, which a generator cannot "
                             "give back.)")
        self.backup_dir, self.delete_checkpoint = os.fspath(backup_dir), delete_checkpoint
        self.restored_epoch: int | None = None

    @property
    def path(self) -> str:
        """The backup file of this process."""
        name = "latest.safetensors" if tgdist.world_size() == 1 else f"latest-rank{tgdist.rank()}.safetensors"
        return os.path.join(self.backup_dir, name)

    def restore(self, loop) -> None:
        """Called by ``fit`` after ``on_train_begin``: load the backup, if any, into the running fit."""
        from ..training.checkpoint import load_checkpoint

        self.restored_epoch = None
        if not os.path.exists(self.path):
            return
        info = load_checkpoint(self.model, self.path, callbacks=[cb for cb in loop.callbacks.callbacks
                                                                  if cb is not self])
        if info["epoch"] is not None:
            self.restored_epoch = info["epoch"]
            loop.initial_epoch = info["epoch"] + 1
            loop.epoch = info["epoch"]

    def on_epoch_end(self, epoch, logs=None):
        from ..training.checkpoint import save_checkpoint

        os.makedirs(self.backup_dir, exist_ok=True)
        save_checkpoint(self.model, self.path, epoch=epoch)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and os.path.exists(self.path):
            os.remove(self.path)
