"""``compile(metrics=...)`` resolved into one ``MetricEntry`` per (output, metric).

Forms: a list applies to every output; a dict maps output names (or the names of the layers that
produce them) to a metric or a list; for several outputs, a list with one entry per output where
an entry is itself a list (or None) gives per-output metrics: ``["mse", ["mse", "accuracy"]]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..losses import LossEntry
from .functional import ACCURACY_BY_LOSS, METRICS, accuracy_by_shape
from .library import LIBRARY_METRICS, StatefulMetric, library_metric_for, require_torchmetrics

__all__ = ["MetricEntry", "resolve_metrics"]


@dataclass
class MetricEntry:
    """One metric of one output: its history ``name``, the output's index, and either a batch-mean
    ``fn(pred, target)`` (summed on the device) or a ``state`` with update/compute/reset."""

    name: str
    output_index: int
    fn: Callable | None = None
    state: StatefulMetric | None = None


def _one(spec, output: str, loss: LossEntry | None) -> tuple[str, Callable | None, StatefulMetric | None]:
    kind = loss.kind if loss is not None else "custom"
    if isinstance(spec, str):
        key = spec.lower()
        if key in ("accuracy", "acc"):
            return "accuracy", ACCURACY_BY_LOSS.get(kind, accuracy_by_shape), None
        if key in METRICS:
            return key, METRICS[key], None
    state = library_metric_for(spec, kind, loss.name if loss is not None else None)
    if state is not None:
        if isinstance(spec, str):
            require_torchmetrics(repr(spec))
        return state.name, None, state
    if isinstance(spec, str):
        names = sorted(set(METRICS) | set(LIBRARY_METRICS) | {"accuracy", "top_k_accuracy"})
        raise ValueError(f"compile: unknown metric {spec!r} for output '{output}'. Expected one of {names}, a "
                         "torchmetrics metric object, or a callable metric(prediction, target).")
    if callable(spec):
        return getattr(spec, "__name__", None) or type(spec).__name__, spec, None
    raise TypeError(f"compile: a metric must be a name, a torchmetrics metric or a callable; received "
                    f"{type(spec).__name__} for output '{output}'. For several outputs pass a dict by output "
                    "name ({'out_a': ['mse'], 'out_b': ['accuracy']}) or a list of lists in output order.")


def _per_output(metrics, info) -> dict[str, list]:
    output_names = list(info.output_names)
    if isinstance(metrics, dict):
        per_output = {o: [] for o in output_names}
        for key, value in metrics.items():
            per_output[info.output_key(key, "compile: the metrics dict")] = value
    elif isinstance(metrics, (list, tuple)) and any(isinstance(m, (list, tuple)) or m is None for m in metrics):
        if len(metrics) != len(output_names):
            raise ValueError(f"compile: metrics is a list of {len(metrics)} per-output entries for "
                             f"{len(output_names)} outputs {output_names}. Expected one entry (a metric, a "
                             "list of metrics or None) per output, or a dict by output name such as "
                             f"{{{output_names[0]!r}: ['accuracy']}}.")
        per_output = dict(zip(output_names, metrics))
    elif isinstance(metrics, (list, tuple)):
        per_output = {o: list(metrics) for o in output_names}
    else:
        per_output = {o: [metrics] for o in output_names}
    return {o: [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v] for o, v in per_output.items()}


def resolve_metrics(metrics, info, losses: list[LossEntry]) -> list[MetricEntry]:
    """``MetricEntry`` list for ``compile(metrics=...)``; ``info`` is the model's ``IOInfo``.

    Names are the metric's name for a single-output model and ``<output>_<metric>`` otherwise. A
    torchmetrics object used for several outputs is copied, so each output keeps its own state.
    """
    if metrics is None:
        return []
    output_names = list(info.output_names)
    by_output = {e.output: e for e in losses}
    entries, seen, used = [], set(), set()
    for i, (o, specs) in enumerate(_per_output(metrics, info).items()):
        for spec in specs:
            name, fn, state = _one(spec, o, by_output.get(o))
            if state is not None and state.metric is not None:
                if id(state.metric) in used:
                    state = state.clone()
                used.add(id(state.metric))
            full = name if len(output_names) == 1 else f"{o}_{name}"
            if full in seen:
                raise ValueError(f"compile: the metric name '{full}' appears twice. Expected distinct "
                                 "metrics (give callables distinct __name__s).")
            seen.add(full)
            entries.append(MetricEntry(full, i, fn, state))
    return entries
