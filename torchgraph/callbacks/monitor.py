"""``Monitor``: which way is better for a monitored quantity, and by how much it must change."""

from __future__ import annotations

import math
import warnings

__all__ = ["Monitor"]

_HIGHER_IS_BETTER = ("auc", "auroc", "precision", "recall", "f1", "f1_score", "r2", "r2_score",
                     "specificity", "corrcoef", "explained_variance")


class Monitor:
    """Reads ``monitor`` from epoch logs and compares it with the best value so far.

    ``mode="auto"`` means "max" for accuracies and AUCs, "min" otherwise (losses, errors).
    """

    def __init__(self, who: str, monitor: str, mode: str, min_delta: float):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"{who}: mode must be 'auto', 'min' or 'max'; received {mode!r}.")
        if mode == "auto":
            higher = monitor.endswith(_HIGHER_IS_BETTER) or "acc" in monitor
            mode = "max" if higher and not (monitor.endswith("loss") or "error" in monitor) else "min"
        self.who, self.monitor, self.mode, self.min_delta = who, monitor, mode, abs(min_delta)
        self._warned = False

    def value(self, logs) -> float | None:
        v = (logs or {}).get(self.monitor)
        if v is None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"{self.who}: the monitored quantity '{self.monitor}' is not in the logs "
                              f"(available: {sorted(logs or {})}). Expected one of those; the callback "
                              "does nothing.", UserWarning, stacklevel=3)
            return None
        return float(v)

    def improved(self, current: float, best: float | None) -> bool:
        if best is None:
            return math.isfinite(current)
        if self.mode == "min":
            return current < best - self.min_delta
        return current > best + self.min_delta
