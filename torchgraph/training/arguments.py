"""Checks of the loops' plain arguments, and where the model runs (device, torch.distributed)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import distributed as tgdist
from .state import TrainingConfig

__all__ = ["check_steps", "check_epochs", "check_validation_freq", "use_distributed", "param_device", "place"]


def check_steps(name: str, steps, where: str = "fit") -> int | None:
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}: {name} must be a positive int or None; received {steps!r}.")
    return steps


def check_epochs(epochs, initial_epoch) -> None:
    for name, v in (("epochs", epochs), ("initial_epoch", initial_epoch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"fit: {name} must be a non-negative int; received {v!r}.")


def check_validation_freq(freq):
    """An int N (validate every N epochs) or a frozenset of epochs counted from 1."""
    if isinstance(freq, int) and not isinstance(freq, bool) and freq >= 1:
        return freq
    try:
        epochs = frozenset(freq)
    except TypeError:
        epochs = None
    if epochs and all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in epochs):
        return epochs
    raise ValueError(f"fit: validation_freq must be a positive int (validate every N epochs) or a collection of "
                     f"epochs counted from 1; received {freq!r}.")


def use_distributed(distributed: bool | None) -> bool:
    """Whether to run data-parallel: ``None`` follows an initialised process group of > 1 process."""
    if distributed is None:
        return tgdist.is_distributed()
    if distributed:
        tgdist.init_from_env()
        return tgdist.world_size() > 1
    return False


def param_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


def place(model: nn.Module, cfg: TrainingConfig) -> torch.device:
    """Moves ``model`` to the configured device when it is elsewhere; returns the device."""
    if param_device(model) != cfg.device:
        model.to(cfg.device)
    return cfg.device
