"""Undoing what building changes in a module: buffers its forward mutates, attributes it caches.

NOTE: [Hidden mutation]
Ops on probes never touch real tensors (they run on meta copies). But a forward can mutate its
own state without involving the input at all -- BatchNorm's `num_batches_tracked.add_(1)` -- and
the interrupted original forward really does run. So buffers are snapshotted when a scope opens,
shadow runs are undone, and once the module call is done, integer buffers that a shadow run
showed to change are stepped back by that change and other changed buffers restored. Attributes
the forward set to tensors it made (a cache) are set back to what they were.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .symbolic import SymbolicInt, SymbolicTensor

__all__ = ["attribute_snapshot", "buffer_snapshot", "restore_attributes", "undo_buffers"]


def buffer_snapshot(module: nn.Module):
    bufs = [(m, n, b) for m in module.modules() for n, b in m._buffers.items()
            if b is not None and b.device.type != "meta"]
    saved = [b.detach().clone() for _, _, b in bufs]
    return bufs, saved


def undo_buffers(bufs, saved):
    """Restore buffers; return ``{index: delta}`` for those that changed (int deltas, else None)."""
    changed = {}
    with torch.no_grad():
        for i, ((m, n, b), s) in enumerate(zip(bufs, saved)):
            cur = m._buffers.get(n)
            if cur is None or cur.shape != s.shape or not torch.equal(cur, s):
                if cur is not None and cur.shape == s.shape and not cur.dtype.is_floating_point:
                    changed[i] = (cur - s)
                else:
                    changed[i] = None
                if cur is b and cur.shape == s.shape:
                    b.copy_(s)
                else:
                    m._buffers[n] = s
    return changed


def attribute_snapshot(module: nn.Module) -> list:
    """The attributes of ``module`` and its submodules, except torch.nn's own layers (which keep no
    tensor they make in forward; skipping them keeps a ResNet's per-layer cost down)."""
    return [(m, dict(m.__dict__)) for m in module.modules()
            if not type(m).__module__.startswith("torch.nn.modules.")]


def restore_attributes(snapshot: list, *, tensors: bool = False) -> None:
    """Attributes the forward set to symbolic tensors (a cache of a tensor it made) go back; with
    ``tensors``, also those it set to any other tensor (after a shadow run: NOTE: [Attributes between
    shadow runs]).

    A new attribute stays: using it outside the forward then says that a value computed inside a
    module's forward was used outside it.
    """
    kinds = (SymbolicTensor, SymbolicInt, torch.Tensor) if tensors else (SymbolicTensor, SymbolicInt)
    for m, before in snapshot:
        for key, value in list(m.__dict__.items()):
            if key in before and value is not before[key] and isinstance(value, kinds):
                m.__dict__[key] = before[key]


# NOTE: [Attributes between shadow runs] A forward may re-bind a tensor attribute to a tensor it makes:
# Meta's reference LLaMA (llama/model.py) starts with `self.freqs_cis = self.freqs_cis.to(h.device)`.
# A shadow run computes on probes, so the attribute then held a meta tensor made from the probe run,
# the next run read that instead of the constant, and the build failed ("did different operations
# when it was called again"). Each shadow run now puts the call's attributes back as it ends (also when it
# fails, and for the re-runs that explain a failure), so every run starts from them, as each starts from
# the same buffers and generator states.
