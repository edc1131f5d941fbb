"""Whatever the user passed as data, turned into batches: ``make_batches`` and ``split_validation``.

Accepted: tensors or NumPy arrays (a list/tuple or dict of them for several inputs), a ``Dataset``,
a ``DataLoader``, or any other iterable of batches (a Python generator, an iterator, an object with
``__iter__``) yielding ``(x, y)`` or ``(x, y, sample_weight)``. Lists, tuples and dicts always hold
one array per input, never batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler

from .batches import IterableBatches, LoaderBatches, TensorBatches, index, num_samples, warn_unshardable
from .structure import flatten_inputs, flatten_targets, io_info

__all__ = ["make_batches", "split_validation", "is_batch_iterable", "check_batch_size"]


def is_batch_iterable(x) -> bool:
    """True for data that yields batches itself (a Dataset, a DataLoader, a generator, ...)."""
    if isinstance(x, (Dataset, DataLoader)):
        return True
    if isinstance(x, (torch.Tensor, list, tuple, dict, str, bytes)) or hasattr(x, "__array__"):
        return False
    return isinstance(x, Iterable)


def check_batch_size(batch_size, where: str) -> int:
    """``batch_size`` checked; None means 32, as in Keras."""
    if batch_size is None:
        return 32
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be a positive int or None (32); received {batch_size!r}.")
    return batch_size


def _shard_loader(loader: DataLoader, shuffle: bool, seed: int, where: str) -> DataLoader:
    """``loader`` rebuilt with a DistributedSampler (when it has none and can be rebuilt)."""
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        warn_unshardable(where)
        return loader
    shuffle = shuffle and isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers)


def make_batches(model, x, y, *, batch_size: int, shuffle: bool, device: torch.device, seed: int = 0,
                 shard: bool = False, pad: bool = True, targets: bool = True, sample_weight=None,
                 where: str = "fit"):
    """``TensorBatches``, ``LoaderBatches`` or ``IterableBatches`` for ``x`` (and ``y``).

    ``sample_weight`` goes with tensors only: data that yields batches yields its own weights as
    ``(x, y, sample_weight)``.
    """
    info = io_info(model)
    batch_size = check_batch_size(batch_size, where)
    if is_batch_iterable(x):
        for name, given in (("y", y), ("sample_weight", sample_weight)):
            if given is not None:
                raise ValueError(f"{where}: {name} must be None when x is a {type(x).__name__}: it yields "
                                 "(x, y) or (x, y, sample_weight) batches itself.")
        if isinstance(x, Dataset) and not isinstance(x, IterableDataset):
            sampler = DistributedSampler(x, shuffle=shuffle, seed=seed, drop_last=False) if shard else None
            x = DataLoader(x, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler)
        elif isinstance(x, Dataset):
            x = DataLoader(x, batch_size=batch_size)
        if isinstance(x, DataLoader):
            if shard:
                x = _shard_loader(x, shuffle, seed, where)
            return LoaderBatches(x, info, device, targets, where)
        if shard:
            warn_unshardable(where)
        return IterableBatches(x, info, device, targets, where)
    if x is None:
        raise ValueError(f"{where}: x is missing. Pass tensors, a Dataset, a DataLoader or a generator of "
                         "(x, y) batches.")
    xs = flatten_inputs(info, x, where)
    ys = flatten_targets(info, y, where)
    sw = flatten_targets(info, sample_weight, where, "sample_weight")
    if targets and ys is None:
        raise ValueError(f"{where}: y is missing. Pass the targets, or (x, y) pairs as a Dataset.")
    return TensorBatches(xs, ys, sw, batch_size, shuffle, device, seed=seed, shard=shard, pad=pad,
                         where=where)


def split_validation(model, x, y, fraction: float, sample_weight=None, where: str = "fit"):
    """``(x_train, y_train, w_train), (x_val, y_val, w_val)``: the last ``fraction`` for validation."""
    if not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"{where}: validation_split must be in (0, 1); received {fraction!r}.")
    if is_batch_iterable(x):
        raise ValueError(f"{where}: validation_split works with tensors only; received a "
                         f"{type(x).__name__}. Pass validation_data instead.")
    info = io_info(model)
    xs, ys = flatten_inputs(info, x, where), flatten_targets(info, y, where)
    sw = flatten_targets(info, sample_weight, where, "sample_weight")
    n = num_samples(xs, ys, sw, where)
    n_val = int(n * fraction)
    if n_val == 0 or n_val == n:
        raise ValueError(f"{where}: validation_split={fraction} of {n} samples leaves "
                         f"{n - n_val} for training and {n_val} for validation. Expected both > 0.")
    cut = n - n_val
    train, val = slice(0, cut), slice(cut, n)
    return ((tuple(t[train] for t in xs), index(ys, train), index(sw, train)),
            (tuple(t[val] for t in xs), index(ys, val), index(sw, val)))
