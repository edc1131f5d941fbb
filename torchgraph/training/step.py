"""One training step's parts: forward and loss (with sample weights), first-batch checks, and the
optimizer step with what may come between ``backward()`` and ``step()``.

Gradient handling follows Keras' ``compile`` arguments:
  - ``gradient_accumulation_steps=N``: the weights change every N batches, using the mean of
    their gradients (each loss is divided by N; under DDP the gradients are all-reduced on the
    N-th batch only). An epoch's last, shorter group is averaged over the batches it has, so an
    epoch never leaves gradients behind.
  - ``clipnorm``: each gradient tensor is rescaled to a norm of at most ``clipnorm`` (Keras'
    per-variable clipping); ``global_clipnorm``: all gradients together (torch's
    ``clip_grad_norm_``); ``clipvalue``: each element is clamped to ``[-clipvalue, clipvalue]``.
  - ``Callback.on_before_optimizer_step(optimizer)`` runs after the gradients are complete (and
    unscaled, with fp16) and before clipping, as in PyTorch Lightning.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..data import flatten_outputs
from ..losses import check_loss_inputs, weighted_loss
from .state import TrainingConfig

__all__ = ["compute", "compute_loss", "checked_compute", "GradientStep", "clip_gradients", "describe"]


def compute(net: nn.Module, cfg: TrainingConfig, xs: tuple, ys, sw):
    """Forward, the (weighted) total loss, and per-output losses for several outputs (else None)."""
    out = net(*xs)
    return (out,) + compute_loss(cfg, out, ys, sw)


def compute_loss(cfg: TrainingConfig, out, ys, sw):
    losses = cfg.losses
    if cfg.info.single:
        e = losses[0]
        loss = e.fn(out, ys) if sw is None else weighted_loss(e, out, ys, sw)
        return (loss if e.weight == 1.0 else loss * e.weight), None
    flat = flatten_outputs(cfg.info, out)
    index = cfg.info.output_names.index
    parts = []
    for e in losses:
        i = index(e.output)
        w = None if sw is None else sw[i]
        parts.append(e.fn(flat[i], ys[i]) if w is None else weighted_loss(e, flat[i], ys[i], w))
    total = parts[0] * losses[0].weight
    for e, p in zip(losses[1:], parts[1:]):
        total = total + p * e.weight
    return total, parts


def describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def _check_sample_weights(cfg: TrainingConfig, flat: tuple, sw_flat, where: str) -> None:
    for e in cfg.losses:
        i = cfg.info.output_names.index(e.output)
        w = sw_flat[i]
        if w is None:
            continue
        if e.per_sample is None:
            raise ValueError(f"{where}: sample weights for output '{e.output}' need per-sample losses, which "
                             f"the loss {e.name!r} cannot give. Expected a named loss, an nn.Module with a "
                             "'reduction' attribute, or a callable that accepts reduction='none'.")
        if not w.is_floating_point() and w.dtype != torch.bool and w.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: sample weights for output '{e.output}' must be numbers; received "
                             f"{describe(w)}.")
        pred = flat[i]
        if w.dim() == 0 or w.shape[0] != pred.shape[0] or w.dim() > pred.dim():
            raise ValueError(f"{where}: sample weights for output '{e.output}' must have one weight per sample "
                             f"(shape (batch,) or the target's shape); received {describe(w)} for an output "
                             f"of {describe(pred)}.")


def checked_compute(net: nn.Module, cfg: TrainingConfig, xs: tuple, ys, sw, where: str):
    """``compute`` on the first batch, with every loss/target mismatch reported clearly."""
    out = net(*xs)
    info = cfg.info
    flat = flatten_outputs(info, out)
    ys_flat = (ys,) if info.single else ys
    names = list(info.output_names)
    for e in cfg.losses:
        i = names.index(e.output)
        check_loss_inputs(e, flat[i], ys_flat[i], where)
    if sw is not None:
        _check_sample_weights(cfg, flat, (sw,) if info.single else sw, where)
    try:
        loss, parts = compute_loss(cfg, out, ys, sw)
    except Exception as err:
        desc = "; ".join(f"output '{n}' {describe(p)} vs target {describe(t)}"
                         for n, p, t in zip(names, flat, ys_flat))
        raise ValueError(f"{where}: the loss failed on the first batch ({desc}): {err}") from err
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        got = describe(loss) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{where}: the loss must be a float scalar tensor (the batch mean); received {got}. "
                         "Use reduction='mean' (or return loss.mean()).")
    with torch.no_grad():
        for m in cfg.metrics:
            pred, target = flat[m.output_index], ys_flat[m.output_index]
            if m.fn is None:
                continue  # torchmetrics validates its own inputs on update
            try:
                v = m.fn(pred, target)
            except Exception as err:
                raise ValueError(f"{where}: metric '{m.name}' failed on the first batch (output "
                                 f"{describe(pred)} vs target {describe(target)}): {err}") from err
            if not isinstance(v, torch.Tensor) or v.numel() != 1:
                raise ValueError(f"{where}: metric '{m.name}' must return a scalar tensor (the batch mean); "
                                 f"received {describe(v)}.")
    return out, loss, parts


def clip_gradients(params: list, cfg: TrainingConfig) -> None:
    """Applies ``cfg``'s clipnorm / global_clipnorm / clipvalue to the gradients of ``params``."""
    if cfg.clipvalue is not None:
        torch.nn.utils.clip_grad_value_(params, cfg.clipvalue)
    elif cfg.global_clipnorm is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.global_clipnorm)
    elif cfg.clipnorm is not None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            # NOTE: [Per-tensor clipping] Keras' clipnorm: g * c / max(||g||, c) for each tensor. The
            # _foreach ops are what torch's own clip_grad_norm_ uses: one kernel launch per list.
            scales = torch._foreach_norm(grads)
            torch._foreach_clamp_min_(scales, cfg.clipnorm)
            torch._foreach_reciprocal_(scales)
            torch._foreach_mul_(scales, cfg.clipnorm)
            torch._foreach_mul_(grads, scales)


class GradientStep:
    """``backward()`` and, every ``accumulation_steps`` batches, the optimizer step.

    Args:
        cfg: the training configuration. net: the module run forward (the DDP wrapper under DDP).
        callbacks: a CallbackList (its ``on_before_optimizer_step`` hooks run before each step).
    """

    def __init__(self, cfg: TrainingConfig, net: nn.Module, callbacks=None):
        self.cfg, self.opt, self.scaler = cfg, cfg.optimizer, cfg.scaler
        self.accumulation = cfg.accumulation_steps
        self.no_sync = getattr(net, "no_sync", None) if self.accumulation > 1 else None
        self.callbacks = callbacks if callbacks is not None and callbacks.has("on_before_optimizer_step") else None
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.clip = not (cfg.clipnorm is None and cfg.clipvalue is None and cfg.global_clipnorm is None)
        self.pending = 0  # micro-batches whose gradients are summed in .grad, not yet applied

    def backward(self, loss: torch.Tensor, last: bool | None) -> None:
        """Backward for one batch; steps when a group is complete or ``last`` (the epoch's last batch).

        ``last=None``: the epoch's length is unknown; ``finish`` applies a partial group at its end.
        """
        if self.pending == 0:
            self.opt.zero_grad(set_to_none=True)
        self.pending += 1
        if self.accumulation > 1:
            loss = loss / self.accumulation
        stepping = self.pending == self.accumulation or bool(last)
        # Under DDP, gradients are all-reduced only on a group's last batch, when it is known.
        skip_sync = self.no_sync is not None and not stepping and last is not None
        with self.no_sync() if skip_sync else contextlib.nullcontext():
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if stepping:
            self.step()

    def finish(self) -> None:
        """Applies the gradients of a last, partial group (end of an epoch of unknown length)."""
        if self.pending:
            self.step()

    def step(self) -> None:
        opt, scaler = self.opt, self.scaler
        if self.pending < self.accumulation:  # a short last group: the mean over the batches it has
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, self.accumulation / self.pending)
        self.pending = 0
        if scaler is not None and (self.callbacks is not None or self.clip):
            scaler.unscale_(opt)
        if self.callbacks is not None:
            self.callbacks.call("on_before_optimizer_step", opt)
        if self.clip:
            clip_gradients(self.params, self.cfg)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
