"""A convolution run as one GEMM on its NHWC pixels (NOTE: [Convolutions on few pixels] in conv.py): the call that
runs it on the filters :func:`torchgraph.fused.conv._gemm_filters` prepared, answering in channels_last."""

from __future__ import annotations

import torch

from ..ops.gemm_act_inference import GEMM_ACTIVATIONS
from ._common import _activation_, onednn_epilogue
from .weights import GemmPanels

__all__: list[str] = []


def _run_gemm(x: torch.Tensor, packed, kernel_size, bias: torch.Tensor | None, stride, padding,
              rows: int, act: str = "none", residual: torch.Tensor | None = None) -> torch.Tensor:
    """``act(conv(x) + residual)`` as one GEMM on ``packed`` (:func:`torchgraph.fused.conv._gemm_filters`'), in
    channels_last."""
    n, c, h, w = x.shape
    kh, kw = kernel_size
    # NOTE: a stride-1 1x1 convolution on a channels_last input (most of them inside a stack)
    # reads the input's memory as the (rows, C) matrix as it is, and the GEMM's (rows, C_out)
    # answer is the channels_last output: one as_strided view each way instead of permute +
    # reshape + view + permute (~2 us each).
    if kh == kw == 1 and stride[0] == stride[1] == 1 and not any(padding) \
            and x.is_contiguous(memory_format=torch.channels_last):
        cols = x.as_strided((rows, c), (c, 1))
        ho, wo = h, w
    else:
        nhwc = x.permute(0, 2, 3, 1)  # a view for a channels_last input
        if any(padding):
            ph, pw = padding
            padded = x.new_zeros(n, h + 2 * ph, w + 2 * pw, c)
            padded[:, ph:ph + h, pw:pw + w] = nhwc
            nhwc = padded
        if kh == kw == 1:
            cols = nhwc[:, ::stride[0], ::stride[1]]
        else:  # im2col: (n, ho, wo, kh, kw, c)
            cols = nhwc.unfold(1, kh, stride[0]).unfold(2, kw, stride[1]).permute(0, 1, 2, 4, 5, 3)
        ho, wo = cols.shape[1], cols.shape[2]
        cols = cols.reshape(rows, -1)
    if isinstance(packed, GemmPanels):  # the bias, residual and activation in the kernel's epilogue
        inside = act if act in GEMM_ACTIVATIONS else "none"
        y = _activation_(torch.ops.torchgraph.gemm_act_inference.default(
            cols, packed.panels, bias, None if residual is None else _pixels_as_rows(residual), packed.out_features,
            inside), "none" if inside == act else act)
    else:
        after_add = act if residual is not None else "none"  # the activation follows the residual
        act = "none" if residual is not None else act
        if isinstance(packed, tuple):  # MKL's (packed, matrix), from _gemm_filters
            y = _activation_(torch.ops.mkl._mkl_linear(cols, *packed, bias, rows), act)
        else:  # the activation in oneDNN's epilogue
            post_op, after = onednn_epilogue(act)  # NOTE: [Activations after oneDNN on AVX2]
            y = _activation_(torch.ops.mkldnn._linear_pointwise(cols, packed, bias, *post_op), after)
        if residual is not None:  # y is new: nobody else holds it
            y = _activation_(y.add_(_pixels_as_rows(residual)), after_add)
    out = y.shape[1]  # y: a new dense (rows, C_out) matrix, i.e. NHWC
    return y.as_strided((n, out, ho, wo), (ho * wo * out, 1, wo * out, out))


def _pixels_as_rows(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> its ``(N * H * W, C)`` pixels: a view of a channels_last tensor, else a copy."""
    n, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided((n * h * w, c), (c, 1))
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)
