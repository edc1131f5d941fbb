"""``fit``: the epoch loop, as one would write it by hand, plus bookkeeping that stays on the device.

Design constraints:
  - The step is the handwritten one (forward, loss, ``zero_grad``, ``backward``, ``step``) whenever
    nothing else is asked for; losses and metrics are summed as tensors and read once per epoch,
    so ``fit`` costs about what a handwritten loop costs (see ``benchmarks/bench_fit.py``).
  - Under torch.distributed the same code runs on every rank; only DDP's gradient all-reduce runs
    per step, plus one all-reduce of the epoch's sums (see ``torchgraph.distributed``).
  - Bad data is rejected before the first optimizer step: lengths and structure when the data is
    normalised (``torchgraph.data``), loss/target fit on the first batch (``step.checked_compute``).
  - Everything an exact resume needs (the shuffling seed, the epoch, the callbacks) is on the
    ``FitLoop`` object, which ``training.checkpoint`` reads and restores.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler

from .. import distributed as tgdist
from ..callbacks import (BackupAndRestore, CallbackList, History, ModelCheckpoint, ProgbarLogger,
                         resolve_verbose)
from ..data import (IterableBatches, LimitedBatches, LoaderBatches, TensorBatches, check_batch_size,
                    class_weight_table, class_weights_for, io_info, make_batches, split_validation)
from .arguments import check_epochs, check_steps, check_validation_freq, place, use_distributed
from .configure import autocast
from .evaluation import evaluate_batches, modes, restore_modes
from .running import Running
from .state import TrainingConfig, config_of, state_of
from .step import GradientStep, checked_compute, compute

__all__ = ["FitLoop", "fit"]


class FitLoop:
    """One running ``fit``: its data, callbacks and the state that an exact resume needs."""

    def __init__(self, model, net, cfg: TrainingConfig, train, val, callbacks: CallbackList, seed: int,
                 initial_epoch: int, epochs: int, validation_freq, class_weight: torch.Tensor | None,
                 sync_stop: bool):
        self.model, self.net, self.cfg, self.train, self.val = model, net, cfg, train, val
        self.callbacks, self.seed, self.sync_stop = callbacks, seed, sync_stop
        self.initial_epoch, self.epochs, self.validation_freq = initial_epoch, epochs, validation_freq
        self.class_weight = class_weight
        self.epoch = initial_epoch - 1  # the last completed epoch
        self.val_checked = False  # the first validation batch is checked like the first training batch

    def set_seed(self, seed: int) -> None:
        """Use ``seed`` for shuffling from now on (a resumed run continues the interrupted one's)."""
        self.seed = seed
        source = self.train.batches if isinstance(self.train, LimitedBatches) else self.train
        if isinstance(source, TensorBatches):
            source.seed = seed
        elif isinstance(source, LoaderBatches) and isinstance(source.loader.sampler, DistributedSampler):
            source.loader.sampler.seed = seed

    def validates(self, epoch: int) -> bool:
        freq = self.validation_freq
        if self.val is None:
            return False
        return (epoch + 1) % freq == 0 if isinstance(freq, int) else (epoch + 1) in freq

    def run(self, state) -> None:
        cbs, logs = self.callbacks, {}
        cbs.call("on_train_begin", logs)
        for cb in cbs.callbacks:
            if isinstance(cb, BackupAndRestore):
                cb.restore(self)
        for epoch in range(self.initial_epoch, self.epochs):
            self.net.train()
            cbs.call("on_epoch_begin", epoch, {})
            running = Running(self.cfg, self.cfg.device)
            first = epoch == self.initial_epoch
            completed = self._train_epoch(epoch, running, state, check=first, sync_stop=self.sync_stop)
            if not completed:
                break  # stopped from a batch hook: the epoch is not recorded
            if running.count == 0 and tgdist.world_size() == 1:
                if first:
                    raise ValueError("fit: the training data holds no samples.")
                warnings.warn(f"fit: the training data ran out before epoch {epoch + 1}; training stops. Make "
                              "sure the data can give steps_per_epoch * epochs batches (e.g. a generator that "
                              "loops forever), or pass re-iterable data (tensors, a Dataset, a DataLoader).",
                              UserWarning, stacklevel=3)
                break
            if isinstance(self.train, LimitedBatches) and self.train.ran_out:
                warnings.warn(f"fit: the training data ran out during epoch {epoch + 1} ({self.train.taken} "
                              f"of {self.train.steps} steps); the epoch ends early. Make sure "
                              "the data can give steps_per_epoch * epochs batches.", UserWarning, stacklevel=3)
            logs = running.result()
            if self.validates(epoch):
                vlogs = evaluate_batches(self.model, self.cfg, self.val, "fit (validation data)",
                                         check=not self.val_checked)
                self.val_checked = True
                logs.update({f"val_{k}": v for k, v in vlogs.items()})
            self.epoch = epoch
            cbs.call("on_epoch_end", epoch, logs)
            if state.stop_training:
                break
        cbs.call("on_train_end", logs)

    def _train_epoch(self, epoch: int, running: Running, state, check: bool, sync_stop: bool) -> bool:
        """One epoch of optimizer steps; False when a batch hook set ``stop_training``.

        ``sync_stop``: under DDP with batch hooks, the ranks agree on stopping after every batch
        (one tiny all-reduce), since a rank that stops alone would hang the others' next step.
        """
        cfg, net, cbs, opt = self.cfg, self.net, self.callbacks, self.cfg.optimizer
        amp = autocast(cfg) if cfg.amp_dtype is not None else None
        begin, end = cbs.has("on_train_batch_begin"), cbs.has("on_train_batch_end")
        stepper = None if cfg.plain_step and not cbs.has("on_before_optimizer_step") else GradientStep(cfg, net, cbs)
        exact = isinstance(self.train, (TensorBatches, LoaderBatches))
        num_steps = len(self.train) if exact else None
        cw = self.class_weight
        # NOTE: [Fast path] One output, one unweighted loss, no autocast, no sample weights: the step is
        # the handwritten one, inlined (each avoided Python call is ~0.1-0.5 us per step on small models).
        fast = cfg.info.single and cfg.losses[0].weight == 1.0 and amp is None and cw is None
        loss_fn = cfg.losses[0].fn
        loss_sum = running.sums[0]
        tally = len(running.names) > 1
        for step, (xs, ys, sw, n) in enumerate(self.train.epoch(epoch)):
            if begin:
                cbs.call("on_train_batch_begin", step, running)
            if cw is not None:
                sw = _class_weights(cw, ys, sw, cfg)
            if check:
                with amp or contextlib.nullcontext():
                    out, loss, parts = checked_compute(net, cfg, xs, ys, sw, "fit")
                check = False
            elif fast and sw is None:
                out = net(*xs)
                loss, parts = loss_fn(out, ys), None
            else:
                with amp or contextlib.nullcontext():
                    out, loss, parts = compute(net, cfg, xs, ys, sw)
            if stepper is None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                stepper.backward(loss, None if num_steps is None else step + 1 == num_steps)
            loss_sum.add_(loss.detach(), alpha=n)
            if tally:
                running.add(cfg, out, ys, parts, n)
            running.count += n
            if end:
                cbs.call("on_train_batch_end", step, running)
                stop = tgdist.any_rank(state.stop_training, loss_sum.device) if sync_stop \
                    else state.stop_training
                if stop:
                    state.stop_training = True
                    return False
        if stepper is not None:
            stepper.finish()
        return True


def _class_weights(table: torch.Tensor, ys, sw, cfg: TrainingConfig):
    if sw is not None:
        raise ValueError("fit: got class_weight and batches with sample weights. Expected one of them (fold the "
                         "class weights into the sample weights).")
    if cfg.info.single:
        return class_weights_for(table, ys)
    return (class_weights_for(table, ys[0]),)


def _fit_data(model, x, y, sample_weight, batch_size, shuffle, validation_split, validation_data, device,
              seed, ddp, steps_per_epoch, validation_steps, validations):
    if validation_split and validation_data is not None:
        raise ValueError("fit: got both validation_split and validation_data. Expected one of them.")
    if validation_split:
        (xs, ys, sw), (vxs, vys, vsw) = split_validation(model, x, y, validation_split, sample_weight)
        batch_size = check_batch_size(batch_size, "fit")
        train = TensorBatches(xs, ys, sw, batch_size, shuffle, device, seed=seed, shard=ddp, where="fit")
        val = TensorBatches(vxs, vys, vsw, batch_size, False, device, shard=ddp, pad=False,
                            where="fit (validation_split)")
    else:
        train = make_batches(model, x, y, batch_size=batch_size, shuffle=shuffle, device=device, seed=seed,
                             shard=ddp, sample_weight=sample_weight, where="fit")
        val = None
        if validation_data is not None:
            vx, vy, vsw = _validation_parts(validation_data)
            val = make_batches(model, vx, vy, batch_size=batch_size, shuffle=False, device=device, shard=ddp,
                               pad=False, sample_weight=vsw, where="fit (validation_data)")
    if steps_per_epoch is not None:
        train = LimitedBatches(train, steps_per_epoch, persistent=True)
    if val is not None:
        one_shot = isinstance(val, IterableBatches) and val.one_shot
        if validation_steps is not None:
            val = LimitedBatches(val, validation_steps, persistent=one_shot)
        elif one_shot and validations > 1:
            raise ValueError("fit: validation_data is a one-shot iterator (e.g. a generator): the first "
                             f"validation would use it up, and {validations} are due. Pass validation_steps "
                             "(with a generator that loops forever), or re-iterable data (tensors, a Dataset, "
                             "a DataLoader).")
    return train, val


def _validation_parts(validation_data):
    """``(x, y, sample_weight)`` from ``validation_data``: a tuple of 2 or 3, or data yielding batches."""
    if isinstance(validation_data, tuple):
        if len(validation_data) not in (2, 3):
            raise ValueError(f"fit: validation_data must be (x_val, y_val), (x_val, y_val, sample_weight), a "
                             f"Dataset, a DataLoader or a generator; received a tuple of {len(validation_data)} "
                             "items.")
        vx, vy, vsw = (*validation_data, None)[:3]
        return vx, vy, vsw
    return validation_data, None, None


def fit(model, x=None, y=None, batch_size=32, epochs=1, verbose="auto", callbacks=None, validation_split=0.0,
        validation_data=None, shuffle=True, class_weight=None, sample_weight=None, initial_epoch=0,
        steps_per_epoch=None, validation_steps=None, validation_freq=1, distributed=None) -> History:
    """``model.fit``: see ``TrainingMixin.fit`` for the arguments."""
    cfg = config_of(model, "fit")
    check_epochs(epochs, initial_epoch)
    steps_per_epoch = check_steps("steps_per_epoch", steps_per_epoch)
    validation_steps = check_steps("validation_steps", validation_steps)
    validation_freq = check_validation_freq(validation_freq)
    ddp = use_distributed(distributed)
    device = place(model, cfg)
    cw = class_weight_table(class_weight, io_info(model), sample_weight is not None, "fit")
    seed = tgdist.broadcast_int(int(torch.randint(0, 2 ** 31 - 1, ()).item()), device)
    validations = sum(1 for e in range(initial_epoch + 1, epochs + 1)
                      if (e % validation_freq == 0 if isinstance(validation_freq, int) else e in validation_freq))
    train, val = _fit_data(model, x, y, sample_weight, batch_size, shuffle, validation_split, validation_data,
                           device, seed, ddp, steps_per_epoch, validation_steps, validations)
    verbose = resolve_verbose(verbose) if tgdist.is_chief() else 0
    net: nn.Module = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    history = History()
    params = {"epochs": epochs, "steps": _length(train), "verbose": verbose,
              "rank": tgdist.rank(), "world_size": tgdist.world_size()}
    extra = [ProgbarLogger(verbose)] if verbose else []
    callbacks = list(callbacks or [])
    cbs = CallbackList(_savers_last(callbacks + [history] + extra), model=model, params=params)
    # Progress bars run on rank 0 only; user callbacks run everywhere, so only theirs may sync.
    sync_stop = ddp and CallbackList(callbacks).has("on_train_batch_end")
    state = state_of(model)
    state.stop_training = False
    loop = FitLoop(model, net, cfg, train, val, cbs, seed, initial_epoch, epochs, validation_freq, cw, sync_stop)
    saved_modes = modes(model)
    state.loop = loop
    try:
        loop.run(state)
    finally:
        state.loop = None
        restore_modes(saved_modes)
    return history


def _savers_last(callbacks: list) -> list:
    """``callbacks`` with those that save the training state moved last, so that what they save at an
    epoch's end includes every other callback's update of that epoch (an LR scheduler's step...)."""
    savers = [cb for cb in callbacks if isinstance(cb, BackupAndRestore)
              or (isinstance(cb, ModelCheckpoint) and cb.include_optimizer)]
    return [cb for cb in callbacks if not any(cb is s for s in savers)] + savers


def _length(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None
