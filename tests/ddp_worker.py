"""Worker for tests/test_distributed.py, launched as `torchrun --nproc_per_node 2 ddp_worker.py OUT_DIR`.

Each rank starts from different random weights (DDP must broadcast rank 0's), trains on the same full
data (fit must shard it), and writes what it ended with to OUT_DIR/rank<r>.pt.
"""

import functools
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import torchgraph as tg

out_dir = sys.argv[1]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
torch.manual_seed(100 + rank)

x = tg.Input(shape=(4,))
model = tg.Model(x, nn.Linear(16, 3)(F.relu(nn.Linear(4, 16)(x))))
model.compile(optimizer=functools.partial(torch.optim.Adam, lr=0.01), loss="cross_entropy",
              metrics=["accuracy"])
g = torch.Generator().manual_seed(0)
X = torch.randn(203, 4, generator=g)  # odd: the shards need padding to stay in step
Y = X[:, :3].argmax(1)


class RecordingCheckpoint(tg.callbacks.ModelCheckpoint):
    """A ModelCheckpoint that also notes which rank wrote."""

    def save(self, path):
        super().save(path)
        with open(os.path.join(out_dir, f"saves_{rank}.txt"), "a") as f:
            f.write(path + "\n")


callbacks = [RecordingCheckpoint(os.path.join(out_dir, "best.safetensors"), monitor="val_loss",
                                 save_best_only=True, save_weights_only=True),
             tg.callbacks.CSVLogger(os.path.join(out_dir, "log.csv"))]
# 1) No process group yet: distributed=True initialises it from torchrun's environment.
h1 = model.fit(X, Y, batch_size=16, epochs=6, validation_split=0.2, callbacks=callbacks, verbose=2,
               distributed=True)
assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2
# 2) The process group is now initialised: fit detects it (a Dataset goes through DistributedSampler).
h2 = model.fit(TensorDataset(X, Y), batch_size=16, epochs=2, verbose=0)
# 3) A batch hook that stops on rank 1 only: both ranks must stop together (no hang).
stopper = tg.callbacks.LambdaCallback(
    on_train_batch_end=lambda b, logs: setattr(model, "stop_training", rank == 1 and b == 2))
h3 = model.fit(X, Y, batch_size=16, epochs=2, callbacks=[stopper], verbose=0)
ev = model.evaluate(X, Y, verbose=0)
state = {k: v.clone() for k, v in model.state_dict().items()}
stopped = model.stop_training
# 4) Metrics from torchmetrics (a name and an object): each rank sees a shard; compute() gathers them all.
import torchmetrics  # noqa: E402

model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss="cross_entropy",
              metrics=["accuracy", "f1_score", torchmetrics.classification.MulticlassAUROC(num_classes=3)])
h4 = model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
ev_lib = model.evaluate(X, Y, batch_size=16, verbose=0)
torch.save({"state": state, "h1": h1.history, "h2": h2.history, "h3_epochs": h3.epoch,
            "stopped": stopped, "eval": ev, "h4": h4.history, "eval_lib": ev_lib},
           os.path.join(out_dir, f"rank{rank}.pt"))
