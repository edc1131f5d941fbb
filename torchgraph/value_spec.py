"""ValueSpec: what a node of a model's graph outputs, stored as ``node.meta["tg_spec"]``.

A spec is the part of a recorded :class:`~torchgraph.symbolic.Value` that outlives the build: its
shape (with dynamic dims), its dtype and the shapes of its two probes. It survives
``copy.deepcopy``, ``pickle`` and ``torch.save`` with the graph, and turns back into a value when a
copied or loaded model's symbolic handles are rebuilt (``symbolic_handles.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .symbolic import Record, Value, format_shape

__all__ = ["ValueSpec"]


@dataclass(frozen=True)
class ValueSpec:
    """What a node outputs: ``shape`` (``None``/names for dynamic dims), ``dtype``, and probe shapes.

    ``dims`` (tensors only) has, per dim, the static size or the :class:`~torchgraph.dims.DynamicDim`
    (with ``name``, ``min``, ``max`` and ``probes``); it is ``None`` in models saved before it existed.
    """

    shape: tuple | None
    dtype: torch.dtype | None
    probes: tuple  # (shape at probe 0, shape at probe 1), or two ints for a dynamic size
    dims: tuple | None = None

    @staticmethod
    def of(value: Value) -> ValueSpec:
        p0, p1 = value.probes
        if isinstance(p0, torch.Tensor):
            return ValueSpec(value.shape, p0.dtype, (tuple(p0.shape), tuple(p1.shape)), value.dims)
        return ValueSpec(None, None, (p0, p1))

    def to_value(self, record: Record, path: tuple) -> Value:
        if self.dtype is None:
            return Value(record, path, self.probes)
        probes = tuple(torch.empty(s, dtype=self.dtype, device="meta") for s in self.probes)
        return Value(record, path, probes, [d for d in self.dims or () if not isinstance(d, int)])

    def format(self) -> str:
        if self.shape is None:
            return type(self.probes[0]).__name__
        return format_shape(["None" if d is None else d for d in self.shape]).replace("'", "")


# NOTE: [Pickled name of ValueSpec] Every pickled model (torch.save, copy by pickle, DataParallel
# replicas sent to workers) names this class by module and qualified name. It lived in model.py
# before model.py was split, and `torchgraph.model` still exports it; pinning __module__ there keeps
# pickles byte-for-byte what they were, so files written now load in earlier versions too (numpy's
# `set_module` does the same for its public names).
ValueSpec.__module__ = "torchgraph.model"
