"""``implicit_gemm_conv2d_inference``: a convolution with few input channels (a network's stem) as a GEMM whose rows
are read in place from the padded input, with its bias and activation, answering in channels_last."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _extension
from ._common import (ACTIVATION_FNS, check_float32_bias, check_padded_map, check_padding, check_stride, is_tensor,
                      pair, references_check)
from .gemm_act_inference import GEMM_ACTIVATIONS, GEMM_PANEL, _weight_from_panels, gemm_panels

__all__ = ["implicit_gemm_conv2d_inference", "implicit_gemm_filters", "reference_implicit_gemm_conv2d_inference"]


def implicit_gemm_filters(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``(K, C, kh, kw)`` as the kernel reads it: :func:`gemm_panels` of its ``(K, kh * kw * C)`` rows,
    in the order ``(ky, kx, c)`` (the columns of an NHWC im2col). Built once per weight (``tg.optimize``'s
    convolution plans keep it).

    Example:
        >>> implicit_gemm_filters(torch.randn(20, 3, 7, 7)).shape
        torch.Size([2, 147, 16])
    """
    torch._check(weight.dim() == 4, lambda: f"implicit_gemm_filters: weight must be (out_channels, in_channels, "
                 f"kh, kw), got shape {list(weight.shape)}")
    return gemm_panels(weight.detach().permute(0, 2, 3, 1).reshape(weight.shape[0], -1))


def _check_implicit_gemm_conv2d_inference(x, panels, bias, out_channels, kernel_size, stride, padding, act) -> None:
    """The twin of ``check_implicit_gemm_conv2d_inference`` in csrc/cpu/implicit_gemm_conv2d_inference.cpp (same
    messages)."""
    op = "implicit_gemm_conv2d_inference"
    torch._check(act in GEMM_ACTIVATIONS,
                 lambda: f"{op}: act must be one of {', '.join(GEMM_ACTIVATIONS)}, got '{act}'")
    if not is_tensor(x, panels) or not (bias is None or is_tensor(bias)):
        return
    torch._check(x.dtype == torch.float32, lambda: f"{op}: x must be float32, got {x.dtype}")
    torch._check(x.dim() == 4 and x.shape[1] > 0 and x.shape[2] > 0 and x.shape[3] > 0,
                 lambda: f"{op}: x must be 4-D (N, C, H, W) with non-zero C, H, W, got shape {list(x.shape)}")
    kernel_size, stride, padding = list(kernel_size), list(stride), list(padding)
    torch._check(len(kernel_size) == 2 and min(kernel_size) > 0,
                 lambda: f"{op}: kernel_size must be two positive ints, got {kernel_size}")
    check_stride(op, stride)
    check_padding(op, padding)
    torch._check(panels.dtype == torch.float32, lambda: f"{op}: panels must be float32, got {panels.dtype}")
    count, depth = -(-out_channels // GEMM_PANEL), x.shape[1] * kernel_size[0] * kernel_size[1]
    torch._check(out_channels > 0 and tuple(panels.shape) == (count, depth, GEMM_PANEL),
                 lambda: f"{op}: panels must have shape [{count}, {depth}, 16] for {out_channels} output channels and "
                 f"{x.shape[1]} input channels of {kernel_size[0]}x{kernel_size[1]} "
                 f"(ops.gemm_panels(weight.permute(0, 2, 3, 1).flatten(1))), got {list(panels.shape)}")
    check_float32_bias(op, "bias", bias, out_channels)
    check_padded_map(op, x, padding, kernel_size[0], kernel_size[1])


def _filters(panels: torch.Tensor, out_channels: int, in_channels: int, kernel_size) -> torch.Tensor:
    """:func:`implicit_gemm_filters`' panels as the ``(K, C, kh, kw)`` weight they hold."""
    rows = _weight_from_panels(panels, out_channels)
    return rows.reshape(out_channels, kernel_size[0], kernel_size[1], in_channels).permute(0, 3, 1, 2)


def reference_implicit_gemm_conv2d_inference(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None,
                                             out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                                             padding: Sequence[int], act: str = "none") -> torch.Tensor:
    """Pure-PyTorch :func:`implicit_gemm_conv2d_inference`: ``F.conv2d`` on the weight the panels hold, then the
    activation, answered in channels_last."""
    if references_check():  # NOTE: [Checks under compile]
        _check_implicit_gemm_conv2d_inference(x, panels, bias, out_channels, kernel_size, stride, padding, act)
    weight = _filters(panels, out_channels, x.shape[1], kernel_size)
    y = F.conv2d(x, weight, bias, list(stride), list(padding))
    return ACTIVATION_FNS[act](y).contiguous(memory_format=torch.channels_last)


def implicit_gemm_conv2d_inference(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None,
                                   out_channels: int, kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                                   padding: int | Sequence[int] = 0, act: str = "none") -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding))`` for a ``weight`` given as
    ``implicit_gemm_filters(weight)``, as a GEMM whose rows are read in place (inference only: it has no backward).

    Meant for convolutions with few input channels, a network's stem (3 -> 32 3x3 stride 2, 3 -> 64 7x7 stride 2),
    which oneDNN's channels_last convolution runs slowly: the input is padded once, and each output pixel's
    ``kh * kw * C`` inputs are read through a table of offsets by ops.gemm_act_inference's register tiles, with the
    bias and activation applied before the one store (NOTE: [Implicit GEMM] in
    csrc/cpu/implicit_gemm_conv2d_inference.cpp). ``tg.optimize`` runs stems on it where that is faster (NOTE:
    [Stem convolutions] in torchgraph/fused/conv.py). float32 CPU tensors run the kernel, the rest the reference.

    Example:
        >>> import torch.nn.functional as F
        >>> x, w, b = torch.randn(2, 3, 32, 32), torch.randn(16, 3, 7, 7), torch.randn(16)
        >>> y = implicit_gemm_conv2d_inference(x, implicit_gemm_filters(w), b, 16, 7, stride=2, padding=3, act="relu")
        >>> y.shape, y.is_contiguous(memory_format=torch.channels_last)
        (torch.Size([2, 16, 16, 16]), True)
        >>> torch.allclose(y, F.relu(F.conv2d(x, w, b, stride=2, padding=3)), atol=1e-4)
        True

    Args:
        x: ``(N, C, H, W)`` float32, any layout.
        panels: ``implicit_gemm_filters(weight)`` for ``weight`` ``(K, C, kh, kw)``: ``(ceil(K / 16), kh * kw * C,
            16)``.
        bias: ``(K,)`` or None.
        out_channels: ``K``.
        kernel_size, stride, padding: ints or pairs (zeros around the map; no dilation, no groups).
        act: ``"none"``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"``, ``"gelu"`` or ``"gelu_tanh"``.

    Returns:
        ``(N, K, H_out, W_out)`` in channels_last.

    Raises:
        RuntimeError: On other shapes, dtypes or activations, or if gradients are requested.
    """
    kernel_size, stride, padding = (pair(v) if isinstance(v, int) else list(v) for v in (kernel_size, stride, padding))
    if (_extension.HAS_C_OPS and isinstance(x, torch.Tensor) and x.device.type in ("cpu", "meta")
            and x.dtype == torch.float32):
        return torch.ops.torchgraph.implicit_gemm_conv2d_inference.default(x, panels, bias, out_channels, kernel_size,
                                                                           stride, padding, act)
    return reference_implicit_gemm_conv2d_inference(x, panels, bias, out_channels, kernel_size, stride, padding, act)


# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::implicit_gemm_conv2d_inference")
    def _implicit_gemm_conv2d_inference_fake(x, panels, bias, out_channels, kernel_size, stride, padding, act="none"):
        _check_implicit_gemm_conv2d_inference(x, panels, bias, out_channels, kernel_size, stride, padding, act)
        height = (x.shape[2] + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
        width = (x.shape[3] + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
        return torch.empty((x.shape[0], out_channels, height, width), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    # Its backward raises: registered in C++ (NOTE: [No backward in C++], csrc/no_backward.cpp).
