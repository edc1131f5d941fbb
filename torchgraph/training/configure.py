"""``compile``'s training arguments resolved: optimizer, device, mixed precision, gradient handling."""

from __future__ import annotations

import contextlib
import inspect
import math
import os

import torch
import torch.nn as nn

from ..data import io_info
from ..losses import resolve_losses
from ..metrics import resolve_metrics
from .state import TrainingConfig

__all__ = ["OPTIMIZERS", "TRAINING_KWARGS", "configure", "compile_arguments", "resolve_device", "autocast"]

# NOTE: [compile dispatch] nn.Module.compile(**kw) is torch.compile in place. tg.Model.compile
# configures training (Keras style) when it gets a positional argument or any of these keywords;
# otherwise every argument goes to nn.Module.compile (torch.compile's fullgraph/dynamic/backend/...).
TRAINING_KWARGS = frozenset({"optimizer", "loss", "metrics", "loss_weights", "device", "amp", "clipnorm",
                             "clipvalue", "global_clipnorm", "gradient_accumulation_steps"})

OPTIMIZERS: dict[str, tuple[type, float]] = {
    "adam": (torch.optim.Adam, 1e-3),
    "adamw": (torch.optim.AdamW, 1e-3),
    "sgd": (torch.optim.SGD, 1e-2),
    "rmsprop": (torch.optim.RMSprop, 1e-3),
    "adagrad": (torch.optim.Adagrad, 1e-2),
    "adamax": (torch.optim.Adamax, 2e-3),
    "nadam": (torch.optim.NAdam, 2e-3),
    "radam": (torch.optim.RAdam, 1e-3),
}


def configure(model: nn.Module, optimizer="adam", loss=None, metrics=None, loss_weights=None, device="auto",
              amp=False, clipnorm=None, clipvalue=None, global_clipnorm=None,
              gradient_accumulation_steps=None) -> TrainingConfig:
    """The ``TrainingConfig`` for ``model.compile(...)``; moves the model to the device."""
    info = io_info(model)
    losses = resolve_losses(loss, info, loss_weights)
    metric_entries = resolve_metrics(metrics, info, losses)
    clip = _resolve_clipping(clipnorm, clipvalue, global_clipnorm)
    steps = _resolve_accumulation(gradient_accumulation_steps)
    dev = resolve_device(device)
    model.to(dev)
    opt = _make_optimizer(model, optimizer)
    amp_dtype = _resolve_amp(amp, dev)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and dev.type == "cuda" else None
    for e in losses:
        if isinstance(e.fn, nn.Module):
            e.fn.to(dev)
    return TrainingConfig(opt, losses, metric_entries, dev, amp_dtype, scaler, info, *clip,
                          accumulation_steps=steps)


def compile_arguments(model: nn.Module, *args, **kwargs) -> dict:
    """``compile``'s training arguments by name (positional ones too), as the user gave them."""
    bound = inspect.signature(configure).bind(model, *args, **kwargs)
    return {k: v for k, v in bound.arguments.items() if k != "model"}


def _positive(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"compile: {name} must be a positive number or None; received {value!r}.")
    return float(value)


def _resolve_clipping(clipnorm, clipvalue, global_clipnorm) -> tuple:
    values = (_positive("clipnorm", clipnorm), _positive("clipvalue", clipvalue),
              _positive("global_clipnorm", global_clipnorm))
    given = [n for n, v in zip(("clipnorm", "clipvalue", "global_clipnorm"), values) if v is not None]
    if len(given) > 1:
        raise ValueError(f"compile: got {given}. Expected at most one of clipnorm (each gradient tensor's norm), "
                         "global_clipnorm (the norm of all gradients together, torch's clip_grad_norm_) and "
                         "clipvalue (each element), as in Keras.")
    return values


def _resolve_accumulation(steps) -> int:
    if steps is None:
        return 1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"compile: gradient_accumulation_steps must be a positive int or None; received "
                         f"{steps!r}.")
    return steps


def resolve_device(device) -> torch.device:
    """``"auto"`` (CUDA when available, ``cuda:$LOCAL_RANK`` under torchrun, else CPU) or a device."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            local = os.environ.get("LOCAL_RANK")
            return torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"compile: device must be 'auto' or a torch device; received {device!r}.") from None


def _resolve_amp(amp, device: torch.device) -> torch.dtype | None:
    if amp is False or amp is None:
        return None
    if amp is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, torch.float16: torch.float16}
    if amp not in names:
        raise ValueError(f"compile: amp must be False, True, 'bf16' or 'fp16'; received {amp!r}.")
    return names[amp]


def autocast(cfg: TrainingConfig | None):
    """``torch.autocast`` for the configured precision, or a context that does nothing."""
    if cfg is None or cfg.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(cfg.device.type, dtype=cfg.amp_dtype)


def _make_optimizer(model: nn.Module, spec) -> torch.optim.Optimizer:
    if isinstance(spec, str):
        key = spec.lower()
        if key not in OPTIMIZERS:
            raise ValueError(f"compile: unknown optimizer {spec!r}. Expected one of {sorted(OPTIMIZERS)}, a "
                             "torch.optim.Optimizer, or a callable params -> Optimizer.")
        cls, lr = OPTIMIZERS[key]
        return cls(model.parameters(), lr=lr)
    if isinstance(spec, torch.optim.Optimizer):
        own = {id(p) for p in model.parameters()}
        theirs = [p for g in spec.param_groups for p in g["params"]]
        if own and not any(id(p) in own for p in theirs):
            raise ValueError("compile: the optimizer holds none of this model's parameters (was it built "
                             "for another model, or before a copy?). Expected torch.optim.X(model.parameters()).")
        return spec
    if callable(spec):
        opt = spec(model.parameters())
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"compile: the optimizer factory returned {type(opt).__name__}; expected a "
                            "torch.optim.Optimizer.")
        return opt
    raise TypeError(f"compile: optimizer must be a name, a torch.optim.Optimizer or a callable; received "
                    f"{type(spec).__name__}.")
