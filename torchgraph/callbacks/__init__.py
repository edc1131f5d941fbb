"""Callbacks for ``Model.fit``: hooks called at the start and end of training, epochs and batches.

Names and semantics follow Keras (``tg.callbacks.EarlyStopping(monitor="val_loss", patience=3)``):

  - ``epoch`` passed to hooks counts from 0; messages and ``ModelCheckpoint`` file names count from 1.
  - ``logs`` at epoch end map names to floats: ``loss``, metrics, ``val_*``, reduced over all ranks
    under torch.distributed, so every rank takes the same decisions (stop, lower the LR).
  - ``logs`` in batch hooks hold running means of the epoch so far as 0-dim *tensors*: reading one
    (``float(logs["loss"])``) waits for the device, so the loop never does unless a hook asks.
  - Only rank 0 prints, writes logs and checkpoints (``torchgraph.distributed.is_chief()``).
  - ``self.model`` is the user's model (never the DDP wrapper); setting ``self.model.stop_training
    = True`` ends training after the current batch or epoch. An epoch cut short from a batch hook is
    not recorded and its ``on_epoch_end`` is not called, so a checkpoint of it is never written.

One module per callback; ``base`` has ``Callback`` and ``CallbackList``.
"""

from .backup_and_restore import BackupAndRestore
from .base import Callback, CallbackList
from .csv_logger import CSVLogger
from .early_stopping import EarlyStopping
from .history import History
from .lambda_callback import LambdaCallback
from .lr_schedules import LearningRateScheduler, ReduceLROnPlateau
from .model_checkpoint import ModelCheckpoint
from .progbar import ProgbarLogger, in_notebook, progress_bar, resolve_verbose
from .tensorboard import TensorBoard
from .terminate_on_nan import TerminateOnNaN

__all__ = ["Callback", "CallbackList", "History", "ProgbarLogger", "EarlyStopping", "ModelCheckpoint",
           "BackupAndRestore", "LearningRateScheduler", "ReduceLROnPlateau", "TerminateOnNaN", "CSVLogger",
           "LambdaCallback", "TensorBoard", "resolve_verbose", "progress_bar", "in_notebook"]
