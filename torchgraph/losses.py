"""Losses for ``compile(loss=...)``: names, per-output resolution, and checks on the first batch.

A loss is called PyTorch-style, ``loss(prediction, target)`` (as ``F.cross_entropy(input, target)``
and ``nn.MSELoss()(input, target)``), not Keras-style ``(y_true, y_pred)``. It returns the batch mean.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LOSSES", "LossEntry", "resolve_losses", "check_loss_inputs", "weighted_loss"]

# name -> (function, kind); the kind drives the first-batch checks and what "accuracy" means.
LOSSES: dict[str, tuple[Callable, str]] = {
    "cross_entropy": (F.cross_entropy, "classes"),
    "nll": (F.nll_loss, "classes"),
    "nll_loss": (F.nll_loss, "classes"),
    "bce_with_logits": (F.binary_cross_entropy_with_logits, "binary_logits"),
    "binary_cross_entropy_with_logits": (F.binary_cross_entropy_with_logits, "binary_logits"),
    "bce": (F.binary_cross_entropy, "binary_probs"),
    "binary_cross_entropy": (F.binary_cross_entropy, "binary_probs"),
    "mse": (F.mse_loss, "regression"),
    "mse_loss": (F.mse_loss, "regression"),
    "mean_squared_error": (F.mse_loss, "regression"),
    "mae": (F.l1_loss, "regression"),
    "l1": (F.l1_loss, "regression"),
    "l1_loss": (F.l1_loss, "regression"),
    "mean_absolute_error": (F.l1_loss, "regression"),
    "smooth_l1": (F.smooth_l1_loss, "regression"),
    "huber": (F.huber_loss, "regression"),
}


@dataclass
class LossEntry:
    """The loss of one output: display ``name``, ``fn(pred, target)``, ``kind``, ``weight``.

    ``per_sample(pred, target)`` gives the unreduced losses that sample weights need (None when the
    loss cannot give them: a callable without a ``reduction`` argument).
    """

    output: str
    name: str
    fn: Callable
    kind: str  # "classes" | "binary_logits" | "binary_probs" | "regression" | "custom"
    weight: float = 1.0
    per_sample: Callable | None = None


def _unreduced(spec) -> Callable | None:
    """``spec`` with ``reduction="none"``: an nn.Module copy, or a callable taking ``reduction``."""
    if isinstance(spec, nn.Module):
        if not isinstance(getattr(spec, "reduction", None), str):
            return None
        module = copy.copy(spec)  # shallow: shares parameters and buffers (e.g. class weights)
        module.reduction = "none"
        return module
    try:
        params = inspect.signature(spec).parameters
    except (TypeError, ValueError):
        return None
    return functools.partial(spec, reduction="none") if "reduction" in params else None


def _one(spec, output: str, weight: float) -> LossEntry:
    if isinstance(spec, str):
        key = spec.lower()
        if key not in LOSSES:
            raise ValueError(f"compile: unknown loss {spec!r} for output '{output}'. Expected one of "
                             f"{sorted(LOSSES)}, an nn.Module, or a callable loss(prediction, target).")
        fn, kind = LOSSES[key]
        return LossEntry(output, key, fn, kind, weight, functools.partial(fn, reduction="none"))
    if isinstance(spec, nn.Module) or callable(spec):
        name = getattr(spec, "__name__", None) or type(spec).__name__
        return LossEntry(output, name, spec, "custom", weight, _unreduced(spec))
    raise TypeError(f"compile: the loss for output '{output}' must be a name, an nn.Module or a callable; "
                    f"received {type(spec).__name__}.")


def _by_output(spec: dict, info, who: str) -> dict:
    """A dict keyed by output or producing layer names, re-keyed by output name."""
    out = {}
    for k, v in spec.items():
        name = info.output_key(k, who)
        if name in out:
            raise ValueError(f"{who} names output '{name}' twice (as {name!r} and its layer's name). "
                             "Expected one entry per output.")
        out[name] = v
    return out


def resolve_losses(loss, info, loss_weights=None) -> list[LossEntry]:
    """One ``LossEntry`` per output that has a loss, in output order.

    ``loss`` is one spec (used for every output), a list/tuple with one spec per output, or a dict
    keyed by output name or by the name of the layer producing the output (outputs left out are not
    trained on). ``info`` is the model's ``IOInfo``.
    """
    output_names = list(info.output_names)
    if loss is None:
        raise ValueError("compile: loss is missing. Expected a name such as 'cross_entropy', an nn.Module, "
                         "a callable loss(prediction, target), or a dict per output.")
    n = len(output_names)
    if isinstance(loss, dict):
        specs = {k: v for k, v in _by_output(loss, info, "compile: the loss dict").items() if v is not None}
    elif isinstance(loss, (list, tuple)):
        if len(loss) != n:
            raise ValueError(f"compile: the loss list has {len(loss)} entries for {n} outputs "
                             f"{output_names}. Expected one loss per output (or a dict by output name).")
        specs = {o: s for o, s in zip(output_names, loss) if s is not None}
    else:
        specs = {o: loss for o in output_names}
    if not specs:
        raise ValueError("compile: no output has a loss. Expected a loss for at least one output.")
    weights = _weights(loss_weights, info)
    return [_one(specs[o], o, weights[o]) for o in output_names if o in specs]


def _weights(loss_weights, info) -> dict[str, float]:
    output_names = list(info.output_names)
    if loss_weights is None:
        return {o: 1.0 for o in output_names}
    if isinstance(loss_weights, dict):
        given = _by_output(loss_weights, info, "compile: loss_weights")
        return {o: float(given.get(o, 1.0)) for o in output_names}
    if isinstance(loss_weights, (list, tuple)) and len(loss_weights) == len(output_names):
        return {o: float(w) for o, w in zip(output_names, loss_weights)}
    raise ValueError(f"compile: loss_weights must be a dict by output name or a list with one weight per "
                     f"output ({len(output_names)}); received {loss_weights!r}.")


def weighted_loss(entry: LossEntry, pred: torch.Tensor, target: torch.Tensor,
                  sample_weight: torch.Tensor) -> torch.Tensor:
    """``mean(loss_i * sample_weight_i)`` over the unreduced losses (Keras' "sum over batch size").

    ``sample_weight`` has the batch as dim 0 and is broadcast over the loss's trailing dims. As in
    Keras the sum is divided by the number of loss values, not by the sum of the weights.
    """
    losses = entry.per_sample(pred, target)
    w = sample_weight.to(losses.dtype)
    if w.dim() < losses.dim():
        w = w.reshape(tuple(w.shape) + (1,) * (losses.dim() - w.dim()))
    return (losses * w).mean()


def _fmt(t: torch.Tensor) -> str:
    dims = ["None"] + [str(d) for d in t.shape[1:]] if t.dim() else []
    shape = f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"
    return f"shape {shape} {str(t.dtype).replace('torch.', '')}"


def check_loss_inputs(entry: LossEntry, pred, target, where: str = "fit") -> None:
    """Raise a clear ValueError when ``target`` cannot go with ``pred`` under ``entry``'s loss.

    Runs once, on the first batch, before any weight changes. Catches what PyTorch would accept
    silently (an (N, 1) prediction against an (N,) target broadcasts to (N, N)) or report deep inside
    autograd (an int32 class target, a float target for class indices).
    """
    who = f"{where}: loss '{entry.name}' for output '{entry.output}'"
    if not isinstance(pred, torch.Tensor):
        raise ValueError(f"{who}: the output is a {type(pred).__name__}, not a tensor.")
    if target is None:
        raise ValueError(f"{who}: no target was given for this output. Pass one in y.")
    kind = entry.kind
    if kind == "classes":
        if pred.dim() < 2 or not pred.is_floating_point():
            raise ValueError(f"{who}: expected class scores of shape (None, num_classes, ...); the output "
                             f"has {_fmt(pred)}.")
        if target.is_floating_point():
            if target.shape != pred.shape:
                raise ValueError(f"{who}: float targets are class probabilities and must match the "
                                 f"output's shape. Expected {_fmt(pred)}; received {_fmt(target)}. For "
                                 "class indices pass int64 targets.")
            return
        if target.dtype != torch.int64:
            raise ValueError(f"{who}: class-index targets must be int64. Expected int64; received "
                             f"{str(target.dtype).replace('torch.', '')}. Convert with y.long().")
        want = (pred.shape[0],) + tuple(pred.shape[2:])
        if tuple(target.shape) != want:
            raise ValueError(f"{who}: expected targets of shape (None{''.join(f', {d}' for d in want[1:])}) "
                             f"(one class index per sample) for an output of {_fmt(pred)}; received "
                             f"{_fmt(target)}.")
        num_classes = pred.shape[1]
        if target.numel():
            lo, hi = int(target.min()), int(target.max())
            if hi >= num_classes or (lo < 0 and lo != -100):  # -100: F.cross_entropy's ignore_index
                bad = hi if hi >= num_classes else lo
                raise ValueError(f"{who}: target class {bad} is out of range. Expected class indices in "
                                 f"[0, {num_classes - 1}] for {num_classes} output classes.")
    elif kind in ("binary_logits", "binary_probs", "regression"):
        if not target.is_floating_point():
            raise ValueError(f"{who}: expected float targets; received "
                             f"{str(target.dtype).replace('torch.', '')}. Convert with y.float().")
        if target.shape != pred.shape:
            hint = ""
            if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
                hint = " Reshape the targets with y.unsqueeze(-1) (or y.view(-1, 1))."
            raise ValueError(f"{who}: the target's shape does not match the output's (PyTorch would "
                             f"broadcast them silently). Expected {_fmt(pred)}; received {_fmt(target)}."
                             + hint)
