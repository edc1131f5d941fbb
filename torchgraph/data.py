"""Data for fit/evaluate/predict: tensors, dicts of tensors, a Dataset or a DataLoader, as batches.

Everything is normalised to flat tuples in the model's own order, so the loop never looks at
structure again:

  - inputs: a tuple of tensors in ``model.input_names`` order (dict inputs are matched by key);
  - targets: one tensor for a single-output model, else a tuple in ``model.output_names`` order;
  - outputs: ``flatten_outputs`` / ``pack_outputs`` convert between the model's output structure
    and that tuple.

Design constraints:
  - Tensors are batched by indexing (a view per batch without shuffling, one gather with it), never
    through a DataLoader: a DataLoader collates sample by sample, which costs more than a small
    model's step.
  - Under torch.distributed each rank gets an equal share of the training batches (padded by
    repeating samples, as DistributedSampler does), so DDP's per-step collectives always match.
    Evaluation shards are not padded: every sample counts exactly once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler

from . import distributed as tgdist
from .trees import plain_containers, tree_leaves, tree_map

__all__ = ["IOInfo", "io_info", "flatten_inputs", "flatten_targets", "flatten_outputs", "pack_outputs",
           "TensorBatches", "LoaderBatches", "make_batches", "split_validation"]


@dataclass(frozen=True)
class IOInfo:
    """A model's input and output structure, as the data pipeline needs it."""

    input_names: tuple
    input_kind: str     # "single" | "list" | "tuple" | "dict"
    input_dtypes: tuple  # the dtype each input expects (None when unknown)
    output_names: tuple  # one per output tensor, flattened (nested outputs: "aux_0", ...)
    output_kind: str
    output_template: Any = None  # the output structure (fx nodes as leaves), to rebuild it


def io_info(model: torch.nn.Module) -> IOInfo:
    """The structure of ``model`` (a tg.Model; a plain module counts as one input, one output)."""
    meta = getattr(model, "meta", {}).get("torchgraph") if hasattr(model, "meta") else None
    if meta is None:
        return IOInfo(("input",), "single", (None,), ("output",), "single")
    specs = {n.name: n.meta.get("tg_spec") for n in model.graph.nodes if n.op == "placeholder"}
    dtypes = tuple(getattr(specs.get(name), "dtype", None) for name in meta["input_names"])
    template = plain_containers(next(n for n in reversed(model.graph.nodes) if n.op == "output").args[0])
    return IOInfo(tuple(meta["input_names"]), meta["input_kind"], dtypes, tuple(model.output_names),
                  meta["output_kind"], template)




def _to_tensor(a: Any, what: str, want_dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if hasattr(a, "__array__"):
        t = torch.as_tensor(a)
        # NumPy's default float64 meets float32 models: cast floats to what the model expects.
        if t.is_floating_point():
            t = t.to(want_dtype if want_dtype is not None and want_dtype.is_floating_point
                     else torch.get_default_dtype())
        return t
    raise TypeError(f"{what} must be a tensor (or a NumPy array); received {type(a).__name__}.")


def flatten_inputs(info: IOInfo, x: Any, where: str) -> tuple:
    """``x`` as a tuple of tensors in ``info.input_names`` order."""
    names, k = info.input_names, len(info.input_names)
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        extra = [key for key in x if key not in names]
        if missing or extra:
            raise ValueError(f"{where}: the keys of x do not match the model's inputs. Expected keys "
                             f"{list(names)}; received {list(x)}.")
        items = [x[n] for n in names]
    elif isinstance(x, (list, tuple)):
        if len(x) != k:
            raise ValueError(f"{where}: x does not match the model's inputs. Expected {k} array(s) for "
                             f"{list(names)}; received {len(x)} arrays. Pass one array per input (or a "
                             "dict keyed by input name).")
        items = list(x)
    else:
        if k != 1:
            raise ValueError(f"{where}: the model takes {k} inputs {list(names)}; received one "
                             f"{type(x).__name__}. Pass a list/tuple or a dict with one array per input.")
        items = [x]
    return tuple(_to_tensor(a, f"{where}: input '{n}'", d)
                 for a, n, d in zip(items, names, info.input_dtypes))


def flatten_targets(info: IOInfo, y: Any, where: str):
    """``y`` as one tensor (single output) or a tuple in ``info.output_names`` order; None stays None.

    For several outputs ``y`` is a dict by output name (outputs left out get no target), or any
    structure with one tensor per output in order (a list, or the outputs' own nesting).
    """
    if y is None:
        return None
    names = info.output_names
    if len(names) == 1:
        if isinstance(y, dict):
            if list(y) != list(names):
                raise ValueError(f"{where}: the keys of y do not match the model's outputs. Expected "
                                 f"{list(names)}; received {list(y)}.")
            y = y[names[0]]
        return _to_tensor(y, f"{where}: y")
    if isinstance(y, dict) and all(k in names for k in y):
        return tuple(None if y.get(n) is None else _to_tensor(y[n], f"{where}: y['{n}']") for n in names)
    leaves = [leaf for _, leaf in tree_leaves(y)] if isinstance(y, (dict, list, tuple)) else [y]
    if len(leaves) != len(names):
        keys = f" with keys {list(y)}" if isinstance(y, dict) else ""
        raise ValueError(f"{where}: y does not match the model's {len(names)} outputs {list(names)}. "
                         f"Expected one target per output; received {len(leaves)}{keys}. Pass a dict "
                         "keyed by output name, or a list in output order.")
    return tuple(None if a is None else _to_tensor(a, f"{where}: y['{n}']") for a, n in zip(leaves, names))


def flatten_outputs(info: IOInfo, out: Any) -> tuple:
    """The model's output structure as a tuple in ``info.output_names`` order."""
    if info.output_kind == "single":
        return (out,)
    return tuple(leaf for _, leaf in tree_leaves(out))


def pack_outputs(info: IOInfo, flat: list) -> Any:
    """The inverse of ``flatten_outputs``."""
    if info.output_kind == "single":
        return flat[0]
    items = iter(flat)
    return tree_map(lambda _: next(items), info.output_template)


def _num_samples(xs: tuple, ys, where: str) -> int:
    leaves = [("x" if len(xs) == 1 else f"x[{i}]", t) for i, t in enumerate(xs)]
    if isinstance(ys, torch.Tensor):
        leaves.append(("y", ys))
    elif ys is not None:
        leaves += [(f"y[{i}]", t) for i, t in enumerate(ys) if t is not None]
    for what, t in leaves:
        if t.dim() == 0:
            raise ValueError(f"{where}: {what} is a scalar; expected a batch of samples along dim 0.")
    n = leaves[0][1].shape[0]
    bad = [(w, t.shape[0]) for w, t in leaves if t.shape[0] != n]
    if bad:
        sizes = ", ".join(f"{w} has {t.shape[0]}" for w, t in leaves)
        raise ValueError(f"{where}: x and y hold different numbers of samples ({sizes}). Expected the same "
                         "length along dim 0 in every input and target.")
    return n


def _index(ys, idx):
    if ys is None:
        return None
    if isinstance(ys, torch.Tensor):
        return ys[idx]
    return tuple(None if t is None else t[idx] for t in ys)


def _move(ys, device, non_blocking=True):
    if ys is None:
        return None
    if isinstance(ys, torch.Tensor):
        return ys.to(device, non_blocking=non_blocking)
    return tuple(None if t is None else t.to(device, non_blocking=non_blocking) for t in ys)


class TensorBatches:
    """Batches of in-memory tensors: ``for xs, ys, n in batches.epoch(e)``.

    Args:
        xs: input tensors (a tuple), ys: targets (tensor, tuple or None), batch_size: samples per batch,
        shuffle: reshuffle every epoch, device: where batches go, seed: the shuffling seed (shared by
        all ranks), shard: split samples over torch.distributed ranks, pad: pad shards to equal size.
    """

    def __init__(self, xs: tuple, ys, batch_size: int, shuffle: bool, device: torch.device,
                 seed: int = 0, shard: bool = False, pad: bool = True, where: str = "fit"):
        self.xs, self.ys = xs, ys
        self.num_samples = _num_samples(xs, ys, where)
        self.batch_size, self.shuffle, self.device, self.seed = batch_size, shuffle, device, seed
        self.rank, self.world = (tgdist.rank(), tgdist.world_size()) if shard else (0, 1)
        self.pad = pad
        home = xs[0].device  # index tensors live here: keep every array with the first input
        self.xs, self.ys = tuple(t.to(home) for t in xs), _move(ys, home, non_blocking=False)
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
        xs, ys, b, dev = self.xs, self.ys, self.batch_size, self.device
        total = self.num_samples if idx is None else len(idx)
        if idx is not None:
            idx = idx.to(xs[0].device)
        for start in range(0, total, b):
            if idx is None:
                sl = slice(start, start + b)
                bx, by = tuple(t[sl] for t in xs), _index(ys, sl)
            else:
                sel = idx[start:start + b]
                bx, by = tuple(t[sel] for t in xs), _index(ys, sel)
            if self.move:
                bx, by = tuple(t.to(dev, non_blocking=True) for t in bx), _move(by, dev)
            yield bx, by, bx[0].shape[0]


def _split_batch(info: IOInfo, batch: Any, where: str, targets: bool):
    """A DataLoader batch as ``(xs, ys)``: ``(x, y)`` pairs, or x alone when targets are optional."""
    multi_in = len(info.input_names) > 1
    if isinstance(batch, (list, tuple)):
        # Single input: (x, y). Several inputs: a pair whose first item is itself the inputs' structure.
        is_pair = (len(batch) == 2 and (not multi_in or isinstance(batch[0], (list, tuple, dict))))
        if is_pair:
            x, y = batch
        elif multi_in and not targets:
            x, y = batch, None
        elif not multi_in and len(batch) == 1:
            x, y = batch[0], None
        else:
            raise ValueError(f"{where}: each batch must be a pair (x, y); received a {type(batch).__name__} "
                             f"of {len(batch)} items.")
    else:
        x, y = batch, None
    if targets and y is None:
        raise ValueError(f"{where}: the data yields inputs without targets. Expected (x, y) pairs from "
                         "the Dataset/DataLoader.")
    return flatten_inputs(info, x, where), flatten_targets(info, y, where)


class LoaderBatches:
    """Batches from a DataLoader, split into ``(xs, ys)`` and moved to ``device`` one at a time."""

    def __init__(self, loader: DataLoader, info: IOInfo, device: torch.device, targets: bool, where: str):
        self.loader, self.info, self.device, self.targets, self.where = loader, info, device, targets, where

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int = 0) -> Iterator[tuple]:
        sampler = getattr(self.loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        dev = self.device
        for batch in self.loader:
            xs, ys = _split_batch(self.info, batch, self.where, self.targets)
            xs, ys = tuple(t.to(dev, non_blocking=True) for t in xs), _move(ys, dev)
            yield xs, ys, xs[0].shape[0]


def _shard_loader(loader: DataLoader, shuffle: bool, seed: int, where: str) -> DataLoader:
    """``loader`` rebuilt with a DistributedSampler (when it has none and can be rebuilt)."""
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        warnings.warn(f"{where}: the DataLoader cannot be sharded over ranks (an IterableDataset or a "
                      "custom batch_sampler); every rank reads all of it. Give it a DistributedSampler.",
                      UserWarning, stacklevel=4)
        return loader
    shuffle = shuffle and isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers)


def make_batches(model, x, y, *, batch_size: int, shuffle: bool, device: torch.device, seed: int = 0,
                 shard: bool = False, pad: bool = True, targets: bool = True, where: str = "fit"):
    """``TensorBatches`` or ``LoaderBatches`` for whatever the user passed as ``x`` (and ``y``)."""
    info = io_info(model)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be a positive int; received {batch_size!r}.")
    if isinstance(x, (DataLoader, Dataset)):
        if y is not None:
            raise ValueError(f"{where}: y must be None when x is a {type(x).__name__} (it yields (x, y) "
                             "pairs itself).")
        if isinstance(x, Dataset):
            sampler = DistributedSampler(x, shuffle=shuffle, seed=seed, drop_last=False) if shard else None
            x = DataLoader(x, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler)
        elif shard:
            x = _shard_loader(x, shuffle, seed, where)
        return LoaderBatches(x, info, device, targets, where)
    if x is None:
        raise ValueError(f"{where}: x is missing. Pass tensors, a Dataset or a DataLoader.")
    xs = flatten_inputs(info, x, where)
    ys = flatten_targets(info, y, where)
    if targets and ys is None:
        raise ValueError(f"{where}: y is missing. Pass the targets, or (x, y) pairs as a Dataset.")
    return TensorBatches(xs, ys, batch_size, shuffle, device, seed=seed, shard=shard, pad=pad, where=where)


def split_validation(model, x, y, fraction: float, where: str = "fit"):
    """``(x_train, y_train), (x_val, y_val)``: the last ``fraction`` of the samples for validation."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{where}: validation_split must be in (0, 1); received {fraction!r}.")
    if isinstance(x, (Dataset, DataLoader)):
        raise ValueError(f"{where}: validation_split works with tensors only; received a "
                         f"{type(x).__name__}. Pass validation_data instead.")
    info = io_info(model)
    xs, ys = flatten_inputs(info, x, where), flatten_targets(info, y, where)
    n = _num_samples(xs, ys, where)
    n_val = int(n * fraction)
    if n_val == 0 or n_val == n:
        raise ValueError(f"{where}: validation_split={fraction} of {n} samples leaves "
                         f"{n - n_val} for training and {n_val} for validation. Expected both > 0.")
    cut = n - n_val
    train = (tuple(t[:cut] for t in xs), _index(ys, slice(0, cut)))
    val = (tuple(t[cut:] for t in xs), _index(ys, slice(cut, n)))
    return train, val
