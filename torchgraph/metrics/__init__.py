"""Metrics for ``compile(metrics=...)``.

  - ``functional``: the built-in batch means (accuracy, MAE, MSE), summed on the device;
  - ``library``: every other metric from torchmetrics (names mapped to it, its objects accepted);
  - ``resolve``: ``compile``'s metric forms turned into one entry per (output, metric).
"""

from .functional import (METRICS, binary_accuracy, categorical_accuracy, mean_absolute_error,
                         mean_squared_error)
from .library import LIBRARY_METRICS, StatefulMetric, is_library_metric
from .resolve import MetricEntry, resolve_metrics

__all__ = ["METRICS", "LIBRARY_METRICS", "MetricEntry", "StatefulMetric", "resolve_metrics", "is_library_metric",
           "categorical_accuracy", "binary_accuracy", "mean_absolute_error", "mean_squared_error"]
