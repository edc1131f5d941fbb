"""Worker for tests/test_resume.py: `python resume_worker.py BACKUP_DIR OUT DATA KILL_EPOCH`.

Trains a seeded model with dropout, shuffling, Adam, a torch LR scheduler, ReduceLROnPlateau and
EarlyStopping under BackupAndRestore. With KILL_EPOCH >= 0 the process SIGKILLs itself in the middle
of that epoch (after two batches). DATA is "tensors" or "loader" (a shuffling DataLoader, whose order
comes from torch's global generator). At the end it saves the weights and the epochs it ran to OUT.
"""

import os
import signal
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchgraph as tg

backup_dir, out, data, kill_epoch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)

x = tg.Input(shape=(6,))
h = nn.Dropout(0.3)(F.relu(nn.BatchNorm1d(32)(nn.Linear(6, 32)(x))))
model = tg.Model(x, nn.Linear(32, 3)(h))
model.compile(optimizer="adam", loss="cross_entropy", metrics=["accuracy"])
g = torch.Generator().manual_seed(1)
X = torch.randn(160, 6, generator=g)
Y = (X[:, :3] + 0.5 * torch.randn(160, 3, generator=g)).argmax(1)


class KillMidEpoch(tg.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == kill_epoch and batch == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


callbacks = [
    KillMidEpoch(),
    tg.callbacks.LearningRateScheduler(torch.optim.lr_scheduler.StepLR(model.optimizer, step_size=2, gamma=0.5)),
    tg.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=1, factor=0.5),
    tg.callbacks.EarlyStopping(monitor="val_loss", patience=50, restore_best_weights=True),
    tg.callbacks.BackupAndRestore(backup_dir),
]
train = (X[:128], Y[:128]) if data == "tensors" else \
    (DataLoader(TensorDataset(X[:128], Y[:128]), batch_size=16, shuffle=True),)
history = model.fit(*train, batch_size=16, epochs=6, validation_data=(X[128:], Y[128:]), callbacks=callbacks,
                    verbose=0)
torch.save({"state": model.state_dict(), "epochs": history.epoch, "loss": history.history["loss"],
            "optimizer": model.optimizer.state_dict()["state"]}, out)
