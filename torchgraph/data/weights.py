"""``class_weight`` (Keras): a weight per class, turned into per-sample weights from the targets.

As in Keras, ``class_weight`` needs a model with one output and cannot be combined with
``sample_weight``. The class of a sample is its integer target, the argmax of a one-hot (or
probability) target with more than one column, or the rounded value of a binary target. Classes
missing from the dict weigh 1.
"""

from __future__ import annotations

import torch

from .structure import IOInfo

__all__ = ["class_weight_table", "class_weights_for"]


def class_weight_table(class_weight, info: IOInfo, has_sample_weight: bool, where: str) -> torch.Tensor | None:
    """``class_weight`` as a float tensor indexed by class (None when not given), checked."""
    if class_weight is None:
        return None
    if not isinstance(class_weight, dict) or not class_weight:
        raise ValueError(f"{where}: class_weight must be a non-empty dict {{class index: weight}}; received "
                         f"{class_weight!r}.")
    if len(info.output_names) != 1:
        raise ValueError(f"{where}: class_weight works with one output; this model has "
                         f"{len(info.output_names)} {list(info.output_names)}. Pass sample_weight per output "
                         "instead (a dict by output name).")
    if has_sample_weight:
        raise ValueError(f"{where}: got both class_weight and sample_weight. Expected one of them (fold the "
                         "class weights into sample_weight).")
    bad = [k for k in class_weight if isinstance(k, bool) or not isinstance(k, int) or k < 0]
    if bad:
        raise ValueError(f"{where}: class_weight keys must be class indices (ints >= 0); received {bad}.")
    table = torch.ones(max(class_weight) + 1)
    for k, w in class_weight.items():
        table[k] = float(w)
    return table


def class_weights_for(table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample weights ``table[class of each sample]`` (weight 1 for classes beyond the table)."""
    if target.is_floating_point():
        classes = target.argmax(1) if target.dim() >= 2 and target.shape[1] > 1 else target.round().long()
        if classes.dim() >= 2 and classes.shape[1] == 1:
            classes = classes.squeeze(1)
    else:
        classes = target.long()
    table = table.to(target.device)
    inside = (classes >= 0) & (classes < table.numel())
    return torch.where(inside, table[classes.clamp(0, table.numel() - 1)], torch.ones((), device=target.device))
