"""Fused torchgraph ops swapped back to their pure-torch references (ONNX has no such ops).

Example:
    >>> import torch.nn as nn, torchgraph as tg
    >>> from torchgraph.export import reference_model
    >>> x = tg.Input(shape=(4,))
    >>> model = tg.Model(x, nn.Linear(4, 2)(x))
    >>> reference_model(model) is model
    False
"""

from __future__ import annotations

import copy
import importlib
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["EXPORT_DECOMPOSITIONS", "fused_op_references", "reference_model", "ReferenceMode"]


def _rms_norm_in_primitives(*args, **kwargs):
    """``torchgraph.ops.rms_norm_in_primitives`` (``F.rms_norm`` as torch computes it on CPU, in plain ops).

    NOTE: [rms_norm in ONNX] The legacy exporter has no translation of ``aten::rms_norm`` before opset 23
    ("Exporting the operator 'aten::rms_norm' to ONNX opset version 20 is not supported"), so any model with
    torch's ``nn.RMSNorm`` (torchtitan's LLaMA) could not be exported."""
    return importlib.import_module("torchgraph.ops.rms_norm_inference").rms_norm_in_primitives(*args, **kwargs)


def _sdpa_with_repeated_heads(*args, **kwargs):
    """``torchgraph.ops.sdpa_with_repeated_heads`` (SDPA's ``enable_gqa`` with the heads repeated first)."""
    return importlib.import_module("torchgraph.ops.attention_inference").sdpa_with_repeated_heads(*args, **kwargs)


#: torch functions the exporters cannot translate at every opset (or with every argument) -> the same
#: computation in primitive ops.
EXPORT_DECOMPOSITIONS: dict = {F.rms_norm: _rms_norm_in_primitives, torch.rms_norm: _rms_norm_in_primitives,
                               F.scaled_dot_product_attention: _sdpa_with_repeated_heads}


def fused_op_references() -> dict:
    """``torchgraph.ops.REFERENCES`` (fused op -> pure-torch reference), or ``{}`` without it."""
    try:
        ops = importlib.import_module("torchgraph.ops")
    except ModuleNotFoundError as exc:
        if exc.name != "torchgraph.ops":
            raise
        return {}
    return dict(getattr(ops, "REFERENCES", None) or {})


def _reference_for(target, references: dict) -> Callable | None:
    if not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    keys: list = [target]
    if isinstance(target, torch._ops.OpOverload):
        keys += [target.overloadpacket, target.name(), str(target.overloadpacket._qualified_op_name)]
    else:
        keys += [target._qualified_op_name]
    for key in keys:
        try:
            ref = references.get(key)
        except TypeError:  # unhashable key type in a user mapping
            ref = None
        if ref is not None:
            return ref
    return None


def reference_model(model: fx.GraphModule, references: dict | None = None) -> fx.GraphModule:
    """A deep copy of ``model`` in which every fused op node calls its pure-torch reference.

    Nested models are rewritten too. ``references`` maps an op (``OpOverload``, its packet, or its
    qualified name ``"ns::op"``) to a function with the same signature; it defaults to
    ``torchgraph.ops.REFERENCES``. The model passed in is not changed.

    Example:
        >>> import torch.nn as nn, torchgraph as tg
        >>> from torchgraph.export import reference_model
        >>> x = tg.Input(shape=(4,))
        >>> model = tg.Model(x, nn.Linear(4, 2)(x))
        >>> reference_model(model) is model
        False
    """
    references = fused_op_references() if references is None else references
    copied = copy.deepcopy(model)
    if not references:
        return copied
    for gm in copied.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        changed = False
        for node in gm.graph.nodes:
            if node.op == "call_function":
                ref = _reference_for(node.target, references)
                if ref is not None:
                    node.target = ref
                    changed = True
        if changed:
            gm.recompile()
    return copied




class ReferenceMode(torch.overrides.TorchFunctionMode):
    """Calls each fused op's reference instead of the op (for fused ops called inside layers), and each
    function of ``EXPORT_DECOMPOSITIONS`` in primitive ops."""

    def __init__(self, references: dict):
        super().__init__()
        self.references = references

    def __torch_function__(self, func, types, args=(), kwargs=None):
        ref = EXPORT_DECOMPOSITIONS.get(func)
        if ref is None and self.references:
            ref = _reference_for(func, self.references)
        return (ref or func)(*args, **(kwargs or {}))
