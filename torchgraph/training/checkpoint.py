"""Training checkpoints: everything an interrupted ``fit`` needs to continue as if never stopped.

A checkpoint holds the weights, the optimizer's state (and the fp16 GradScaler's), the state of
every callback that has one (LR schedulers, ``ReduceLROnPlateau``, ``EarlyStopping``...), the last
completed epoch, the running fit's shuffling seed, and the random number generators' states
(torch CPU and CUDA, Python's ``random``, NumPy's global generator).

Design constraints:
  - One safetensors file: tensors as tensors, the rest as JSON in its metadata. Loading never
    unpickles, so a checkpoint from a stranger cannot run code; safetensors bounds the header.
  - Written to a temporary file and renamed, so a crash while saving leaves the previous file.
  - Called from a callback during ``fit`` it reads the running loop (seed, callbacks); loaded
    there, it restores them too (``BackupAndRestore``).
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from typing import Any

import numpy as np
import torch

from ..saving import require_safetensors
from .state import state_of

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_metadata", "FORMAT_NAME"]

FORMAT_NAME = "torchgraph.training_checkpoint"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------- nested state <-> tensors + JSON

def _encode(obj: Any, tensors: dict, ids: dict, path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = ids.get(id(obj))
        if key is None:
            key = ids[id(obj)] = f"t{len(tensors)}"
            tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _encode(torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj),
                                       tensors, ids, path), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors, ids, path), _encode(v, tensors, ids, f"{path}.{k}")]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, ids, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, ids, f"{path}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"save_checkpoint: {path} holds a {type(obj).__name__}, which a checkpoint cannot store. "
                    "Expected tensors, arrays, numbers, strings, lists, tuples and dicts (state_dict() of "
                    "a callback must return only those).")


def _decode(obj: Any, tensors, path: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, path) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors.names:
            raise ValueError(f"load_checkpoint: '{path}' refers to a tensor '{key}' that is not in the file. "
                             "Expected a complete checkpoint written by torchgraph.")
        return tensors.file.get_tensor(key)
    if "__ndarray__" in obj:
        return _decode(obj["__ndarray__"], tensors, path).numpy().astype(obj["dtype"])
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, path) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors, path): _decode(v, tensors, path) for k, v in obj["__dict__"]}
    raise ValueError(f"load_checkpoint: '{path}' holds an unknown entry {sorted(obj)}. Expected a checkpoint "
                     "written by torchgraph.")


class _Tensors:
    """An open safetensors file and the set of its tensor names."""

    def __init__(self, file):
        self.file, self.names = file, set(file.keys())


# ---------------------------------------------------------------------- random number generators

def rng_states() -> dict:
    """The states of torch's (CPU and CUDA), Python's and NumPy's global generators."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None,
            "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(states["numpy"])


# ---------------------------------------------------------------------- save / load

def _stateful(callbacks) -> list:
    return [cb for cb in callbacks if callable(getattr(cb, "state_dict", None))
            and callable(getattr(cb, "load_state_dict", None))]


def save_checkpoint(model, path: str | os.PathLike, *, epoch: int | None = None, callbacks=None) -> None:
    """Write a training checkpoint of ``model`` to ``path`` (a safetensors file), atomically.

    Args:
        model (tg.Model): a compiled model (its optimizer's state is saved; without ``compile``
            only the weights and the generators' states).
        path: the file to write.
        epoch (int): the last completed epoch (from 0); default: the running fit's.
        callbacks: callbacks whose ``state_dict()`` to save; default: the running fit's.

    Example:
        >>> import os, tempfile, torch, torch.nn as nn, torchgraph as tg
        >>> from torchgraph.training import save_checkpoint, load_checkpoint
        >>> x = tg.Input(shape=(3,))
        >>> model = tg.Model(x, nn.Linear(3, 1)(x))
        >>> model.compile(optimizer="adam", loss="mse")
        >>> _ = model.fit(torch.randn(16, 3), torch.randn(16, 1), verbose=0)
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
        >>> save_checkpoint(model, path, epoch=0)
        >>> load_checkpoint(model, path)["epoch"]
        0
    """
    safetensors = require_safetensors("save_checkpoint")
    st = state_of(model)
    loop, cfg = st.loop, st.config
    if callbacks is None:
        callbacks = loop.callbacks.callbacks if loop is not None else []
    state = {
        "model": model.state_dict(),
        "optimizer": cfg.optimizer.state_dict() if cfg is not None else None,
        "scaler": cfg.scaler.state_dict() if cfg is not None and cfg.scaler is not None else None,
        "epoch": epoch if epoch is not None else (loop.epoch if loop is not None else None),
        "seed": loop.seed if loop is not None else None,
        "callbacks": [[type(cb).__name__, cb.state_dict()] for cb in _stateful(callbacks)],
        "rng": rng_states(),
    }
    tensors: dict = {}
    tree = _encode(state, tensors, {}, "checkpoint")
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "state": json.dumps(tree, separators=(",", ":"))}
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint_metadata(path: str) -> dict | None:
    """The metadata of the safetensors file at ``path`` (None when it has none)."""
    safetensors = require_safetensors("load_weights")
    with safetensors.safe_open(path, framework="pt") as f:
        return f.metadata()


def load_checkpoint(model, path: str | os.PathLike, *, callbacks=None, restore_rng: bool = True) -> dict:
    """Restore a training checkpoint written by ``save_checkpoint`` (or ``BackupAndRestore``).

    Restores the weights, the optimizer (when the model is compiled), the callbacks' states (those
    given, else the running fit's, matched by class and order), the generators' states and, inside
    a running fit, its shuffling seed.

    Returns:
        dict: ``{"epoch": last completed epoch or None}``; continue with ``initial_epoch=epoch + 1``.

    Raises:
        ValueError: not a training checkpoint, or weights that do not fit the model.
    """
    safetensors = require_safetensors("load_checkpoint")
    path = os.fspath(path)
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"load_checkpoint: '{path}' is not a torchgraph training checkpoint (its format is "
                             f"{metadata.get('format')!r}). Expected a file written by save_checkpoint, "
                             "BackupAndRestore or ModelCheckpoint(include_optimizer=True); load plain weights "
                             "with model.load_weights(path).")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(f"load_checkpoint: '{path}' has format version {metadata.get('format_version')!r}; "
                             f"this torchgraph reads version {FORMAT_VERSION}.")
        try:
            tree = json.loads(metadata["state"])
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"load_checkpoint: '{path}' has a damaged state ({e}).") from None
        state = _decode(tree, _Tensors(f), "checkpoint")
    _load_weights(model, state["model"], path)
    st = state_of(model)
    cfg, loop = st.config, st.loop
    if state.get("optimizer") is not None:
        if cfg is None:
            warnings.warn("load_checkpoint: the model is not compiled, so the optimizer's state was not "
                          "restored. Call model.compile(...) first to restore it.", UserWarning, stacklevel=2)
        else:
            cfg.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") is not None and cfg is not None and cfg.scaler is not None:
        cfg.scaler.load_state_dict(state["scaler"])
    if callbacks is None:
        callbacks = loop.callbacks.callbacks if loop is not None else []
    _load_callbacks(_stateful(callbacks), state.get("callbacks") or [])
    if restore_rng:
        set_rng_states(state["rng"])
    if loop is not None and state.get("seed") is not None:
        loop.set_seed(int(state["seed"]))
    return {"epoch": state.get("epoch")}


def _load_weights(model, weights: dict, path: str) -> None:
    from .weights import check_fits

    check_fits(model, {k: t.shape for k, t in weights.items()}, path, "load_checkpoint")
    model.load_state_dict(weights)


def _load_callbacks(callbacks: list, saved: list) -> None:
    remaining = list(saved)
    for cb in callbacks:
        name = type(cb).__name__
        match = next((i for i, (n, _) in enumerate(remaining) if n == name), None)
        if match is None:
            warnings.warn(f"load_checkpoint: no saved state for the callback {name}; it starts afresh.",
                          UserWarning, stacklevel=3)
            continue
        cb.load_state_dict(remaining.pop(match)[1])
