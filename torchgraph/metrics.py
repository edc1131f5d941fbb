"""Metrics for ``compile(metrics=...)``: names, per-output resolution.

A metric is ``fn(prediction, target) -> 0-dim tensor``: the batch mean of a per-sample value. The
loop accumulates ``value * batch_size`` on the device, with no host sync per step, and divides once
per epoch (after summing over ranks under torch.distributed). So the epoch value is the exact mean
over samples for mean-decomposable metrics (accuracy, MAE, MSE); it is a batch-weighted mean for
others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .losses import LossEntry

__all__ = ["METRICS", "MetricEntry", "resolve_metrics", "categorical_accuracy", "binary_accuracy",
           "mean_absolute_error", "mean_squared_error"]


def categorical_accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of samples whose highest score (dim 1) is the target class (index, or argmax of one-hot).

    Example:
        >>> import torch
        >>> from torchgraph.metrics import categorical_accuracy
        >>> categorical_accuracy(torch.tensor([[2., 1.], [0., 3.]]), torch.tensor([0, 0]))
        tensor(0.5000)
    """
    if target.is_floating_point():
        target = target.argmax(1)
    return (pred.argmax(1) == target).float().mean()


def binary_accuracy(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Share of elements where ``pred > threshold`` agrees with ``target > 0.5``."""
    return ((pred > threshold) == (target > 0.5)).float().mean()


def _binary_accuracy_logits(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred > 0) == (target > 0.5)).float().mean()


def _accuracy_by_shape(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Without a known loss: class scores when the target lacks dim 1 or is one-hot over >1 classes.
    if pred.dim() == target.dim() + 1 or (pred.dim() >= 2 and pred.shape[1] > 1):
        return categorical_accuracy(pred, target)
    return binary_accuracy(pred, target)


def mean_absolute_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``|pred - target|``."""
    return (pred - target).abs().mean()


def mean_squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``(pred - target) ** 2``."""
    return (pred - target).square().mean()


METRICS: dict[str, Callable] = {
    "categorical_accuracy": categorical_accuracy,
    "sparse_categorical_accuracy": categorical_accuracy,
    "binary_accuracy": binary_accuracy,
    "mae": mean_absolute_error,
    "mean_absolute_error": mean_absolute_error,
    "mse": mean_squared_error,
    "mean_squared_error": mean_squared_error,
}
_ACCURACY_BY_LOSS = {"classes": categorical_accuracy, "binary_logits": _binary_accuracy_logits,
                     "binary_probs": binary_accuracy}


@dataclass
class MetricEntry:
    """One metric of one output: its history ``name``, the output's index, ``fn(pred, target)``."""

    name: str
    output_index: int
    fn: Callable


def _one(spec, output: str, loss: LossEntry | None) -> tuple[str, Callable]:
    if isinstance(spec, str):
        key = spec.lower()
        if key in ("accuracy", "acc"):
            kind = loss.kind if loss is not None else "custom"
            return "accuracy", _ACCURACY_BY_LOSS.get(kind, _accuracy_by_shape)
        if key not in METRICS:
            raise ValueError(f"compile: unknown metric {spec!r} for output '{output}'. Expected one of "
                             f"{sorted(METRICS) + ['accuracy']}, or a callable metric(prediction, target).")
        return key, METRICS[key]
    if callable(spec):
        return getattr(spec, "__name__", None) or type(spec).__name__, spec
    raise TypeError(f"compile: a metric must be a name or a callable; received {type(spec).__name__}.")


def resolve_metrics(metrics, output_names: list[str], losses: list[LossEntry]) -> list[MetricEntry]:
    """``MetricEntry`` list: a list of metrics applies to every output; a dict maps output -> metric(s).

    Names are the metric's name for a single-output model and ``<output>_<metric>`` otherwise.
    """
    if metrics is None:
        return []
    by_output = {e.output: e for e in losses}
    if isinstance(metrics, dict):
        unknown = [k for k in metrics if k not in output_names]
        if unknown:
            raise ValueError(f"compile: the metrics dict names {unknown}, which are not outputs of this "
                             f"model. Expected keys among {output_names}.")
        per_output = {o: metrics.get(o) or [] for o in output_names}
    elif isinstance(metrics, (list, tuple)):
        per_output = {o: list(metrics) for o in output_names}
    else:
        per_output = {o: [metrics] for o in output_names}
    entries, seen = [], set()
    for i, o in enumerate(output_names):
        specs = per_output[o] if isinstance(per_output[o], (list, tuple)) else [per_output[o]]
        for spec in specs:
            name, fn = _one(spec, o, by_output.get(o))
            full = name if len(output_names) == 1 else f"{o}_{name}"
            if full in seen:
                raise ValueError(f"compile: the metric name '{full}' appears twice. Expected distinct "
                                 "metrics (give callables distinct __name__s).")
            seen.add(full)
            entries.append(MetricEntry(full, i, fn))
    return entries
