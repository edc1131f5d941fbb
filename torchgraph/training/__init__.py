"""The built-in training loop: Keras' ``compile`` / ``fit`` / ``evaluate`` / ``predict`` on a tg.Model.

  - ``mixin``: ``TrainingMixin``, a base class of ``tg.Model`` with the public methods;
  - ``configure``: ``compile``'s arguments resolved (optimizer, device, precision, clipping);
  - ``state``: the configuration and the running fit, kept outside the model's ``__dict__``;
  - ``fit_loop``, ``evaluation``, ``batch_api``: the loops; ``step``: forward, loss, optimizer step;
  - ``running``: losses and metrics summed on the device over an epoch;
  - ``checkpoint``: training checkpoints for an exact resume; ``weights``: weights files.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .configure import OPTIMIZERS
from .mixin import TrainingMixin

__all__ = ["TrainingMixin", "OPTIMIZERS", "save_checkpoint", "load_checkpoint"]
