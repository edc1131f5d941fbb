"""Training state kept outside the model: the ``compile`` configuration and the running ``fit``.

Design constraints:
  - The state lives in a module-level ``WeakKeyDictionary`` keyed by the model, never in the
    model's ``__dict__``: pickling, ``torch.save``, ``copy.deepcopy``, ``torch.jit.script`` and
    ``torch.compile`` see a plain GraphModule, and the state dies with the model. A copy or a
    loaded model is therefore not compiled: call ``compile`` again.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..data import IOInfo
from ..losses import LossEntry
from ..metrics import MetricEntry

__all__ = ["TrainingConfig", "TrainingState", "state_of", "config_of", "optimizer_state_size"]


@dataclass
class TrainingConfig:
    """What ``compile`` decided: optimizer, losses, metrics, device, precision, gradient handling."""

    optimizer: torch.optim.Optimizer
    losses: list[LossEntry]
    metrics: list[MetricEntry]
    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: Any  # torch.amp.GradScaler for float16 on CUDA, else None
    info: IOInfo
    clipnorm: float | None = None
    clipvalue: float | None = None
    global_clipnorm: float | None = None
    accumulation_steps: int = 1

    @property
    def plain_step(self) -> bool:
        """True when an optimizer step is exactly ``backward(); step()`` (nothing in between)."""
        return (self.scaler is None and self.accumulation_steps == 1 and self.clipnorm is None
                and self.clipvalue is None and self.global_clipnorm is None)


@dataclass
class TrainingState:
    """Per-model state: the configuration, ``stop_training``, the running fit loop (if any), and
    what the batch-level API keeps between calls."""

    config: TrainingConfig | None = None
    stop_training: bool = False
    loop: Any = None  # fit_loop.FitLoop while fit runs
    # train_on_batch / test_on_batch: running sums, the gradient stepper, whether the first batch was
    # checked. Emptied by compile.
    batch: dict = field(default_factory=dict)
    # compile()'s arguments by name, as given: tg.clone_model configures its clone alike (Keras
    # recompiles a clone). Set by compile, with the configuration.
    compile_arguments: dict | None = None


# model -> TrainingState. Weak keys: the state dies with the model and never travels with it.
_STATES: "weakref.WeakKeyDictionary[nn.Module, TrainingState]" = weakref.WeakKeyDictionary()


def state_of(model: nn.Module) -> TrainingState:
    """The training state of ``model`` (created empty on first use)."""
    st = _STATES.get(model)
    if st is None:
        st = _STATES[model] = TrainingState()
    return st


def config_of(model: nn.Module, where: str) -> TrainingConfig:
    """The ``compile`` configuration of ``model``, or a RuntimeError saying to call compile."""
    cfg = state_of(model).config
    if cfg is None:
        raise RuntimeError(f"{model._get_name()}.{where}: the model is not configured for training. Call "
                           "model.compile(optimizer='adam', loss='cross_entropy', metrics=['accuracy']) "
                           f"first (a copied or loaded model needs compile() again).")
    return cfg


def optimizer_state_size(model: nn.Module) -> tuple[int, int] | None:
    """``(numbers, bytes)`` held in the state of ``model``'s optimizer (Keras' "Optimizer params");
    None when the model is not compiled. The state appears at the first step (0 before)."""
    cfg = _STATES.get(model)
    if cfg is None or cfg.config is None:
        return None
    count = size = 0
    for per_param in cfg.config.optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                count += value.numel()
                size += value.numel() * value.element_size()
    return count, size
