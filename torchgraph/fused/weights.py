"""Weights in the layouts the fast kernels read, cached beside the parameters they come from.

oneDNN's convolutions and matmuls and MKL's packed GEMM run faster from weights reordered once into
their own layouts. Each copy is a cache keyed by the parameter (``id`` plus a weak reference, since
tensors cannot be dict keys by value) and its version counter, so ``load_state_dict``, an optimizer
step or any in-place change rebuilds it; ``state_dict``, pickling and ``.to()`` only ever see the
plain parameter.

Example:
    >>> import torch
    >>> from torchgraph.fused.weights import _filters_as_rows
    >>> _filters_as_rows(torch.randn(8, 3, 3, 3)).shape
    torch.Size([8, 27])
"""

from __future__ import annotations

import weakref

import torch

from ..ops.gemm_act_inference import gemm_panels
from ._common import _HAS_ONEDNN

__all__ = ["MKL_PACKED_ROW_COUNTS"]


def _cached_beside(cache: dict, weight: torch.Tensor, make):
    """``make(weight)``, cached in ``cache`` per weight and rebuilt when it changes (its version
    counter); None for a weight made under inference mode (no version counter). Every cache of
    this module goes through here."""
    if weight.is_inference():
        return None
    key = id(weight)
    hit = cache.get(key)
    if hit is None or hit[0]() is not weight or hit[1] != weight._version:
        with torch.no_grad():
            value = make(weight.detach())
        ref = weakref.ref(weight, lambda _, key=key: cache.pop(key, None))
        hit = cache[key] = (ref, weight._version, value)
    return hit[2]


# NOTE: [Packed conv weights] oneDNN runs a convolution faster from weights already in its blocked
# layout. The packed copy is a cache beside the parameter (state_dict, pickling and .to() see the
# plain weight), keyed by the parameter and refreshed when it changes (load_state_dict bumps its
# version). (Tensors cannot be WeakKeyDictionary keys -- their == is elementwise -- hence id + weakref.)
#
# NOTE: [Packed channels_last convs] Measured here for every convolution of ResNet-18 and ResNet-50
# at batch 8, 64x64 (2 threads, medians): packed weights on a channels_last input (answering in
# channels_last, nothing copied) beat F.conv2d on a contiguous input for every layer, by 15-30% for
# most (0.92 -> 0.75 ms for 64-channel 3x3 on 16x16; 1.64 -> 0.80 ms for 512-channel 3x3 on 2x2;
# 1x1 convs 0.14 -> 0.09 ms; the 7x7 stem a tie). F.conv2d on channels_last input was the worst
# (1.5-9x slower on 2x2-4x4 maps with 512+ channels), and packed weights on a contiguous input paid
# a reorder per call (slower than F.conv2d for 1x1 convs and the stem). Hence: for inference,
# tg.optimize keeps whole conv stacks channels_last with packed weights
# (passes.keep_layout_local makes the tensors contiguous where they leave the stack).
_PACKED: dict[int, tuple] = {}


def _pack_conv_weight(weight: torch.Tensor, padding, stride, dilation, groups, input_size) -> torch.Tensor:
    with torch.no_grad():
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.detach().to_mkldnn(), list(padding), list(stride), list(dilation), groups, list(input_size))


def _packed_weight(weight: torch.Tensor, padding, stride, dilation, groups, input_size) -> torch.Tensor:
    def pack(w):
        return _pack_conv_weight(w, padding, stride, dilation, groups, input_size)

    packed = _cached_beside(_PACKED, weight, pack)
    # a weight made under torch.inference_mode is packed per call (no version counter to cache by)
    return pack(weight) if packed is None else packed


# The packing depends on the row count, so the packed copy is cached per (weight, rows), beside the
# parameter like the conv weights (NOTE: [Packed conv weights]), for at most MKL_PACKED_ROW_COUNTS
# row counts per weight: a decoding loop whose row count grows every step would otherwise keep a
# copy of every weight per step. Other row counts run F.linear / oneDNN (the same values up to
# float32 rounding). Weights made under torch.inference_mode have no version counter, so they are
# never packed (packing per call cost more than it saved: 547 vs 307 us for the classifier head of NOTE: [Few rows]).
#: Most row counts a weight is packed for by MKL (each packed copy is the weight's size).
MKL_PACKED_ROW_COUNTS = 4
_HAS_MKL_PACKED = hasattr(torch.ops.mkl, "_mkl_linear") and torch.backends.mkl.is_available()
_MKL_PACKED: dict[int, tuple] = {}


def _mkl_packed_weight(weight: torch.Tensor, rows: int, as_matrix=None) -> tuple | None:
    """``weight`` (or ``as_matrix(weight)``, an ``(out, in)`` matrix) packed by MKL for ``rows`` rows,
    and the matrix itself: ``(packed, matrix)``; None where MKL's packed GEMM should not run (no
    MKL, an inference-mode weight, MKL_PACKED_ROW_COUNTS other row counts already packed)."""
    by_rows = _cached_beside(_MKL_PACKED, weight, lambda w: {}) if _HAS_MKL_PACKED else None
    if by_rows is None:
        return None
    found = by_rows.get(rows)
    if found is None:
        if len(by_rows) >= MKL_PACKED_ROW_COUNTS:
            return None
        with torch.no_grad():
            matrix = weight.detach() if as_matrix is None else as_matrix(weight.detach()).contiguous()
            found = by_rows[rows] = (torch.ops.mkl._mkl_reorder_linear_weight(matrix, rows), matrix)
    return found


def _filters_as_rows(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in, kh, kw)`` -> ``(out, kh * kw * in)``, the order of :func:`_conv_gemm`'s columns."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


# NOTE: [Packed linear weights] oneDNN's matmul also runs faster from weights reordered once into
# its blocked layout (torch.ops.mkldnn._reorder_linear_weight; for bfloat16 the AMX tile layout):
# `python benchmarks/bench_gemm.py --inference [--bf16]` (2 threads, 1024 rows, the GPT block's and
# the encoder's six shapes, interleaved medians) measured it 0-11% faster in float32 (two runs) and
# 5-16% in bfloat16 than from the plain weight, with identical values. The copy is cached beside
# the parameter like the conv weights.
_ONEDNN_LINEAR: dict[int, tuple] = {}
_HAS_LINEAR_REORDER = _HAS_ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _onednn_linear_weight(weight: torch.Tensor, as_matrix=None) -> torch.Tensor:
    """``weight`` (or ``as_matrix(weight)``) reordered for oneDNN's matmul (NOTE: [Packed linear
    weights]); the plain matrix where it cannot be cached."""
    def pack(w):
        matrix = w if as_matrix is None else as_matrix(w).contiguous()
        return torch.ops.mkldnn._reorder_linear_weight(matrix) if _HAS_LINEAR_REORDER else matrix

    packed = _cached_beside(_ONEDNN_LINEAR, weight, pack)
    if packed is not None:
        return packed
    return weight if as_matrix is None else as_matrix(weight)


class GemmPanels:
    """A linear's weight or a convolution's filters (in its GEMM's columns' order, as
    :func:`_filters_as_rows`) as :func:`torchgraph.ops.gemm_panels`, and their count: what
    ``ops.gemm_act_inference`` reads."""

    __slots__ = ("panels", "out_features")

    def __init__(self, weight: torch.Tensor):
        matrix = weight if weight.dim() == 2 else _filters_as_rows(weight)
        self.panels = gemm_panels(matrix.contiguous())
        self.out_features = weight.shape[0]


_GEMM_PANELS: dict[int, tuple] = {}


def _gemm_panels_weight(weight: torch.Tensor) -> GemmPanels | None:
    """``GemmPanels(weight)``, cached beside the parameter; None where it cannot be (inference-mode weights)."""
    return _cached_beside(_GEMM_PANELS, weight, GemmPanels)
