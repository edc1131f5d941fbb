"""Metrics from torchmetrics: metric names mapped to it, and its metric objects accepted as they are.

A torchmetrics metric keeps state over the epoch (``update`` per batch, ``compute`` at the end,
``reset`` before the next), which is what metrics that are not batch means need (precision, recall,
F1, AUROC). torchmetrics is an optional extra: ``pip install 'torchgraph-fx[train]'``.

Design constraints:
  - Under torch.distributed, ``compute`` gathers every rank's state (torchmetrics' own sync), so
    the epoch value covers all ranks' samples; every rank calls it at the same point, once per epoch.
  - Running values for batch hooks and the progress bar must never communicate (rank 0 alone
    draws the bar): they come from the metric class's unwrapped ``compute`` on the local state.
  - A metric named by a string is built on the first batch, when the task is known: multiclass
    with ``num_classes`` from the output after a classification loss, binary or multilabel after a
    binary one (from the output's shape otherwise). Scores are turned into probabilities first
    (softmax after ``cross_entropy``, sigmoid after ``bce_with_logits``), so torchmetrics never has
    to guess from the values whether they are logits.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable

import torch

__all__ = ["LIBRARY_METRICS", "StatefulMetric", "is_library_metric", "library_metric_for", "require_torchmetrics"]


def require_torchmetrics(what: str):
    """The torchmetrics module, or an ImportError that says how to install it."""
    try:
        import torchmetrics
    except ImportError:
        raise ImportError(f"compile: the metric {what} comes from torchmetrics, which is not installed. "
                          "Install it with pip install 'torchgraph-fx[train]' (or pip install torchmetrics).") from None
    return torchmetrics


def is_library_metric(obj: Any) -> bool:
    """True for a torchmetrics ``Metric`` object (checked without importing torchmetrics)."""
    return any(c.__module__.startswith("torchmetrics") and c.__name__ == "Metric" for c in type(obj).__mro__)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class StatefulMetric:
    """One metric with state over an epoch: ``update`` per batch, ``compute`` / ``reset`` per epoch.

    Wraps a torchmetrics ``Metric`` (given by the user, or built on the first batch by ``build``
    for a metric named by a string). ``transform`` turns (prediction, target) into what the metric
    expects.
    """

    def __init__(self, name: str, metric=None, build: Callable | None = None):
        self.name, self.metric, self.build = name, metric, build
        self.transform: Callable | None = None

    def clone(self) -> "StatefulMetric":
        """An independent copy (for another output): the same metric with fresh state."""
        return StatefulMetric(self.name, None if self.metric is None else copy.deepcopy(self.metric), self.build)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if self.metric is None:
            self.metric, self.transform = self.build(pred, target)
        if self.metric.device != pred.device:
            self.metric.to(pred.device)
        if self.transform is not None:
            pred, target = self.transform(pred, target)
        self.metric.update(pred.detach(), target)

    def _check(self, value) -> float:
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"metric '{self.name}': compute() returned {shape}; expected one number. Pass "
                             "an averaged metric (e.g. average='macro' or 'micro' in torchmetrics).")
        return float(value)

    def compute(self) -> float:
        """The epoch value over every rank's samples (NaN when no batch was seen)."""
        if self.metric is None or not self.metric.update_called:
            return float("nan")
        return self._check(self.metric.compute())

    def local(self) -> torch.Tensor:
        """The running value on this rank's samples so far, without any communication."""
        if self.metric is None or not self.metric.update_called:
            return torch.tensor(float("nan"))
        # NOTE: [Local compute] Metric.__init__ wraps the instance's compute with a sync over ranks and
        # a cache; the class's own compute reads the local state only, and caches nothing.
        value = type(self.metric).compute(self.metric)
        return value.reshape(()) if isinstance(value, torch.Tensor) and value.numel() == 1 else value

    def reset(self) -> None:
        if self.metric is not None:
            self.metric.reset()


def _probabilities(loss_kind: str, loss_name: str | None) -> Callable | None:
    if loss_kind == "classes":
        if loss_name in ("nll", "nll_loss"):  # log-probabilities
            return lambda p, t: (p.exp(), t)
        return lambda p, t: (p.softmax(1), t)
    if loss_kind == "binary_logits":
        return lambda p, t: (p.sigmoid(), t)
    return None


def _classification_task(pred: torch.Tensor, target: torch.Tensor, loss_kind: str) -> tuple[str, int]:
    """``("multiclass", num_classes)``, ``("multilabel", num_labels)`` or ``("binary", 1)``."""
    if loss_kind == "classes" or pred.dim() == target.dim() + 1:
        return "multiclass", pred.shape[1]
    if loss_kind in ("binary_logits", "binary_probs") or pred.shape == target.shape:
        if pred.dim() >= 2 and pred.shape[1] > 1:
            return "multilabel", pred.shape[1]
        return "binary", 1
    raise ValueError(f"cannot tell the classification task from an output of shape {tuple(pred.shape)} and "
                     f"targets of shape {tuple(target.shape)}")


def _classification(name: str, make: Callable, top_k: int | None = None) -> Callable:
    """A builder for a torchmetrics classification metric named ``name``."""

    def build_for(loss_kind: str, loss_name: str | None):
        def build(pred, target):
            tm = require_torchmetrics(repr(name))
            try:
                task, num = _classification_task(pred, target, loss_kind)
            except ValueError as e:
                raise ValueError(f"metric '{name}': {e}. Pass a torchmetrics metric object with its task "
                                 "instead.") from None
            if top_k is not None and (task != "multiclass" or num <= top_k):
                raise ValueError(f"metric '{name}': top-{top_k} accuracy needs more than {top_k} classes; the "
                                 f"output has {num} ({task}). Pass e.g. torchmetrics.classification."
                                 f"MulticlassAccuracy(num_classes={num}, top_k=2, average='micro').")
            probs = _probabilities(loss_kind, loss_name)
            fix_target = _target_format(task)

            def transform(p, t):
                if probs is not None:
                    p, t = probs(p, t)
                return p, fix_target(p, t)

            kwargs = {"num_classes": num} if task == "multiclass" else {"num_labels": num} \
                if task == "multilabel" else {}
            return make(tm, task, kwargs).to(pred.device), transform
        return build

    return build_for


def _target_format(task: str) -> Callable:
    def fix(p, t):
        if task == "multiclass":
            return t.argmax(1) if t.is_floating_point() and t.dim() == p.dim() else t.long()
        return t.round().long() if t.is_floating_point() else t
    return fix


def _regression(make: Callable) -> Callable:
    def build_for(loss_kind: str, loss_name: str | None):
        def build(pred, target):
            tm = require_torchmetrics("a regression metric")
            return make(tm).to(pred.device), None
        return build
    return build_for


def _cls(task: str, suffix: str, tm, kwargs: dict, **more):
    prefix = {"binary": "Binary", "multiclass": "Multiclass", "multilabel": "Multilabel"}[task]
    cls = getattr(tm.classification, prefix + suffix)
    return cls(validate_args=False, **kwargs, **more)


# name -> builder(loss_kind, loss_name) -> build(pred, target) -> (torchmetrics Metric, transform)
LIBRARY_METRICS: dict[str, Callable] = {
    "precision": _classification("precision", lambda tm, task, kw: _cls(task, "Precision", tm, kw)),
    "recall": _classification("recall", lambda tm, task, kw: _cls(task, "Recall", tm, kw)),
    "f1_score": _classification("f1_score", lambda tm, task, kw: _cls(task, "F1Score", tm, kw)),
    "specificity": _classification("specificity", lambda tm, task, kw: _cls(task, "Specificity", tm, kw)),
    "auroc": _classification("auroc", lambda tm, task, kw: _cls(task, "AUROC", tm, kw)),
    "average_precision": _classification("average_precision",
                                         lambda tm, task, kw: _cls(task, "AveragePrecision", tm, kw)),
    "matthews_corrcoef": _classification("matthews_corrcoef",
                                         lambda tm, task, kw: _cls(task, "MatthewsCorrCoef", tm, kw)),
    "r2_score": _regression(lambda tm: tm.regression.R2Score()),
    "root_mean_squared_error": _regression(lambda tm: tm.regression.MeanSquaredError(squared=False)),
    "mean_absolute_percentage_error": _regression(lambda tm: tm.regression.MeanAbsolutePercentageError()),
    "explained_variance": _regression(lambda tm: tm.regression.ExplainedVariance()),
}
_ALIASES = {"f1": "f1_score", "auc": "auroc", "r2": "r2_score", "rmse": "root_mean_squared_error",
            "mape": "mean_absolute_percentage_error", "top_k_categorical_accuracy": "top_5_accuracy",
            "sparse_top_k_categorical_accuracy": "top_5_accuracy", "top_k_accuracy": "top_5_accuracy"}


def library_metric_for(spec: Any, loss_kind: str, loss_name: str | None) -> StatefulMetric | None:
    """A ``StatefulMetric`` for a torchmetrics object or a library metric name; None otherwise."""
    if is_library_metric(spec):
        return StatefulMetric(_snake(type(spec).__name__), metric=spec)
    if not isinstance(spec, str):
        return None
    key = _ALIASES.get(spec.lower(), spec.lower())
    top = re.fullmatch(r"top_(\d+)_accuracy", key)
    if top:
        k = int(top.group(1))
        make = _classification(key, lambda tm, task, kw, k=k: _cls(task, "Accuracy", tm, kw, top_k=k,
                                                                    average="micro"), top_k=k)
        return StatefulMetric(key, build=make(loss_kind, loss_name))
    if key in LIBRARY_METRICS:
        return StatefulMetric(key, build=LIBRARY_METRICS[key](loss_kind, loss_name))
    return None
