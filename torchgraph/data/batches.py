"""Batches for the loops: ``for xs, ys, sample_weights, n in batches.epoch(e)``.

``xs`` is a tuple of input tensors, ``ys`` and ``sample_weights`` are flattened like targets (see
``structure``; None when absent), ``n`` the number of samples. Three sources:

  - ``TensorBatches``: in-memory tensors, batched by indexing (a view per batch without shuffling,
    one gather with it), never through a DataLoader, which collates sample by sample and costs more
    than a small model's step;
  - ``LoaderBatches``: a DataLoader (a Dataset is wrapped in one), each batch moved to the device;
  - ``IterableBatches``: any other iterable of batches, e.g. a Python generator.

``LimitedBatches`` caps an epoch at ``steps`` batches (``steps_per_epoch``, ``validation_steps``).

Design constraints:
  - Under torch.distributed each rank gets an equal share of the training batches (padded by
    repeating samples, as DistributedSampler does), so DDP's per-step collectives always match.
    Evaluation shards are not padded: every sample counts exactly once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .. import distributed as tgdist
from .structure import IOInfo, flatten_inputs, flatten_targets

__all__ = ["TensorBatches", "LoaderBatches", "IterableBatches", "LimitedBatches", "num_samples"]


def num_samples(xs: tuple, ys, sw, where: str) -> int:
    """The common length along dim 0 of every input, target and sample weight (else a ValueError)."""
    leaves = [("x" if len(xs) == 1 else f"x[{i}]", t) for i, t in enumerate(xs)]
    for what, tree in (("y", ys), ("sample_weight", sw)):
        if isinstance(tree, torch.Tensor):
            leaves.append((what, tree))
        elif tree is not None:
            leaves += [(f"{what}[{i}]", t) for i, t in enumerate(tree) if t is not None]
    for what, t in leaves:
        if t.dim() == 0:
            raise ValueError(f"{where}: {what} is a scalar; expected a batch of samples along dim 0.")
    n = leaves[0][1].shape[0]
    if any(t.shape[0] != n for _, t in leaves):
        sizes = ", ".join(f"{w} has {t.shape[0]}" for w, t in leaves)
        raise ValueError(f"{where}: x and y hold different numbers of samples ({sizes}). Expected the same "
                         "length along dim 0 in every input, target and sample weight.")
    return n


def index(tree, idx):
    """``tree`` (a tensor, a tuple of tensors/None, or None) indexed along dim 0."""
    if tree is None:
        return None
    if isinstance(tree, torch.Tensor):
        return tree[idx]
    return tuple(None if t is None else t[idx] for t in tree)


def move(tree, device, non_blocking=True):
    """``tree`` (a tensor, a tuple of tensors/None, or None) on ``device``."""
    if tree is None:
        return None
    if isinstance(tree, torch.Tensor):
        return tree.to(device, non_blocking=non_blocking)
    return tuple(None if t is None else t.to(device, non_blocking=non_blocking) for t in tree)


class TensorBatches:
    """Batches of in-memory tensors.

    Args:
        xs: input tensors (a tuple); ys: targets (tensor, tuple or None); sw: sample weights (like ys);
        batch_size: samples per batch; shuffle: reshuffle every epoch; device: where batches go;
        seed: the shuffling seed (shared by all ranks; the permutation of epoch ``e`` is drawn from
        ``seed + e``); shard: split samples over torch.distributed ranks; pad: pad shards to equal size.
    """

    def __init__(self, xs: tuple, ys, sw, batch_size: int, shuffle: bool, device: torch.device,
                 seed: int = 0, shard: bool = False, pad: bool = True, where: str = "fit"):
        self.num_samples = num_samples(xs, ys, sw, where)
        self.batch_size, self.shuffle, self.device, self.seed = batch_size, shuffle, device, seed
        self.rank, self.world = (tgdist.rank(), tgdist.world_size()) if shard else (0, 1)
        self.pad = pad
        home = xs[0].device  # index tensors live here: keep every array with the first input
        self.xs = tuple(t.to(home) for t in xs)
        self.ys, self.sw = move(ys, home, non_blocking=False), move(sw, home, non_blocking=False)
        self.move = home != device

    def _indices(self, epoch: int) -> torch.Tensor | None:
        n = self.num_samples
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            idx = torch.randperm(n, generator=g)
        elif self.world == 1:
            return None
        else:
            idx = torch.arange(n)
        if self.world > 1:
            if self.pad and n % self.world:
                extra = self.world - n % self.world
                idx = torch.cat([idx, idx[:extra].repeat(extra // max(n, 1) + 1)[:extra]])
            idx = idx[self.rank::self.world]
        return idx

    def __len__(self) -> int:
        n = self.num_samples
        if self.world > 1:
            n = -(-n // self.world) if self.pad else len(range(self.rank, n, self.world))
        return -(-n // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[tuple]:
        idx = self._indices(epoch)
        xs, ys, sw, b, dev = self.xs, self.ys, self.sw, self.batch_size, self.device
        total = self.num_samples if idx is None else len(idx)
        if idx is not None:
            idx = idx.to(xs[0].device)
        for start in range(0, total, b):
            sel = slice(start, start + b) if idx is None else idx[start:start + b]
            bx, by, bw = tuple(t[sel] for t in xs), index(ys, sel), index(sw, sel)
            if self.move:
                bx, by, bw = tuple(t.to(dev, non_blocking=True) for t in bx), move(by, dev), move(bw, dev)
            yield bx, by, bw, bx[0].shape[0]


def split_batch(info: IOInfo, batch: Any, where: str, targets: bool) -> tuple:
    """One batch from a loader or generator as ``(xs, ys, sample_weights)``.

    Accepted: ``(x, y)``, ``(x, y, sample_weight)``, or ``x`` alone when targets are optional.
    """
    multi_in = len(info.input_names) > 1
    x, y, sw = batch, None, None
    if isinstance(batch, (list, tuple)):
        # Single input: (x, y[, w]). Several inputs: a tuple whose first item is the inputs' structure.
        inputs_first = not multi_in or isinstance(batch[0], (list, tuple, dict)) if batch else False
        if inputs_first and len(batch) in (2, 3):
            x, y, sw = (*batch, None)[:3]
        elif multi_in and not targets:
            x = batch
        elif not multi_in and len(batch) == 1:
            x = batch[0]
        else:
            raise ValueError(f"{where}: each batch must be (x, y) or (x, y, sample_weight); received a "
                             f"{type(batch).__name__} of {len(batch)} items.")
    if targets and y is None:
        raise ValueError(f"{where}: the data yields inputs without targets. Expected (x, y) pairs (or "
                         "(x, y, sample_weight) triples) from the Dataset, DataLoader or generator.")
    return (flatten_inputs(info, x, where), flatten_targets(info, y, where),
            flatten_targets(info, sw, where, "sample_weight"))


class LoaderBatches:
    """Batches from a DataLoader, split into ``(xs, ys, sw)`` and moved to ``device`` one at a time."""

    def __init__(self, loader: DataLoader, info: IOInfo, device: torch.device, targets: bool, where: str):
        self.loader, self.info, self.device, self.targets, self.where = loader, info, device, targets, where

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int = 0) -> Iterator[tuple]:
        sampler = getattr(self.loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        yield from _split_all(self.loader, self.info, self.device, self.targets, self.where)


def _split_all(batches, info, device, targets, where):
    for batch in batches:
        xs, ys, sw = split_batch(info, batch, where, targets)
        xs = tuple(t.to(device, non_blocking=True) for t in xs)
        yield xs, move(ys, device), move(sw, device), xs[0].shape[0]


class IterableBatches:
    """Batches from any iterable (a generator, an iterator, an object with ``__iter__``).

    A re-iterable source starts over every epoch; a one-shot iterator (``iter(x) is x``, e.g. a
    generator) continues where it stopped, and yields nothing once exhausted.
    """

    def __init__(self, source, info: IOInfo, device: torch.device, targets: bool, where: str):
        self.source, self.info, self.device, self.targets, self.where = source, info, device, targets, where
        self.one_shot = isinstance(source, Iterator)

    def epoch(self, epoch: int = 0) -> Iterator[tuple]:
        yield from _split_all(self.source, self.info, self.device, self.targets, self.where)


class LimitedBatches:
    """At most ``steps`` batches of ``batches`` per epoch.

    ``persistent=True`` (Keras' ``steps_per_epoch``): the next epoch continues the same iterator, and
    a fresh one starts only once the data is used up. ``persistent=False`` (``validation_steps`` on
    re-iterable data): every epoch takes the first ``steps`` batches. ``ran_out`` tells whether the
    last epoch ended early because the data was used up.
    """

    def __init__(self, batches, steps: int, persistent: bool):
        self.batches, self.steps, self.persistent = batches, steps, persistent
        self._iterator = None
        self.ran_out = False
        self.taken = 0  # batches the last epoch took

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int = 0) -> Iterator[tuple]:
        if self._iterator is None or not self.persistent:
            self._iterator = iter(self.batches.epoch(epoch))
        self.ran_out, self.taken = False, 0
        for _ in range(self.steps):
            try:
                item = next(self._iterator)
            except StopIteration:
                self._iterator, self.ran_out = None, True
                return
            self.taken += 1
            yield item


def warn_unshardable(where: str) -> None:
    """Warns that every rank reads its own copy of data that cannot be split over ranks."""
    warnings.warn(f"{where}: this data cannot be sharded over ranks (a generator, an IterableDataset or a "
                  "custom batch_sampler): every rank reads its own copy. Make each rank yield its own share "
                  "and the same number of batches (or pass steps_per_epoch), or a rank waits forever.",
                  UserWarning, stacklevel=5)
