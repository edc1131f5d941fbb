"""``max_pool2d_inference``: 2-D max pooling without argmax indices (inference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _extension
from ._common import check_float_dtype, dense_format, is_tensor, pair, references_check, use_kernel

__all__ = ["max_pool2d_inference", "reference_max_pool2d_inference"]


def _pool_output_size(size, kernel, stride, pad, dilation, ceil_mode: bool):
    # Same formula as ATen's pooling_output_shape (and csrc/common.h).
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out = out - 1
    return out


def _check_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode: bool, *, kernel: bool):
    """Validates the arguments; returns the output (height, width), or None for a Proxy."""
    op = "max_pool2d_inference"
    if not is_tensor(x):
        return None
    if kernel:
        check_float_dtype(op, "x", x)
    torch._check(
        x.dim() in (3, 4) and x.shape[-1] > 0 and x.shape[-2] > 0 and x.shape[-3] > 0,
        lambda: f"{op}: x must be 3-D (C, H, W) or 4-D (N, C, H, W) with non-zero C, H, W, "
        f"got shape {list(x.shape)}",
    )
    if stride is None or (not isinstance(stride, int) and len(stride) == 0):
        stride = kernel_size
    args = {"kernel_size": kernel_size, "stride": stride, "padding": padding, "dilation": dilation}
    for name, value in args.items():
        value = pair(value) if isinstance(value, int) else list(value)
        args[name] = value
        torch._check(
            len(value) in (1, 2),
            lambda: f"{op}: {name} must have 1 or 2 elements, got {value}",
        )
    k, s, p, d = ([v[0], v[-1]] for v in args.values())
    out_size = []
    for i in range(2):
        torch._check(
            k[i] > 0 and s[i] > 0 and d[i] > 0,
            lambda: f"{op}: kernel_size, stride and dilation must be positive, got "
            f"kernel_size={args['kernel_size']}, stride={args['stride']}, "
            f"dilation={args['dilation']}",
        )
        torch._check(
            0 <= p[i] <= k[i] // 2,
            lambda: f"{op}: padding must be non-negative and at most half of kernel_size, "
            f"got padding={args['padding']}, kernel_size={args['kernel_size']}",
        )
        size = x.shape[x.dim() - 2 + i]
        out_size.append(_pool_output_size(size, k[i], s[i], p[i], d[i], ceil_mode))
    torch._check(
        out_size[0] >= 1 and out_size[1] >= 1,
        lambda: f"{op}: output size {out_size[0]}x{out_size[1]} is too small for input of "
        f"shape {list(x.shape)} (kernel_size={args['kernel_size']}, "
        f"dilation={args['dilation']}, padding={args['padding']})",
    )
    return out_size


def reference_max_pool2d_inference(
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch :func:`max_pool2d_inference`: ``F.max_pool2d`` (which is differentiable)."""
    if references_check():  # NOTE: [Checks under compile]
        _check_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, kernel=False)
    if stride is not None and not isinstance(stride, int) and len(stride) == 0:
        stride = None  # the schema's `stride=[]` means "same as kernel_size"
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def max_pool2d_inference(
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """2-D max pooling for inference: same values as ``F.max_pool2d``, no indices.

    ``F.max_pool2d`` on the CPU computes the argmax indices that its backward
    needs even in inference. This op skips them, so it has no backward: calling
    ``.backward()`` through it raises a RuntimeError (use ``F.max_pool2d`` for
    training). NaN propagates as in ``F.max_pool2d``. A channels_last input
    gives a channels_last output.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> max_pool2d_inference(x, kernel_size=2)
        tensor([[[[ 5.,  7.],
                  [13., 15.]]]])

    Args:
        x: Input of shape ``(N, C, H, W)`` or ``(C, H, W)``.
        kernel_size: Window size, an int or a pair ``(kH, kW)``.
        stride: Window stride; defaults to ``kernel_size``.
        padding: Implicit ``-inf`` padding on both sides, at most half the kernel.
        dilation: Spacing between window elements.
        ceil_mode: Use ceil instead of floor for the output size.

    Returns:
        The pooled tensor.

    Raises:
        RuntimeError: On invalid pooling arguments, or if gradients are requested.
    """
    if use_kernel(x):
        stride_arg = [] if stride is None else stride
        return torch.ops.torchgraph.max_pool2d_inference.default(
            x, kernel_size, stride_arg, padding, dilation, ceil_mode
        )
    return reference_max_pool2d_inference(x, kernel_size, stride, padding, dilation, ceil_mode)

# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::max_pool2d_inference")
    def _max_pool2d_inference_fake(
        x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False
    ):
        out_h, out_w = _check_max_pool2d(
            x, kernel_size, stride, padding, dilation, ceil_mode, kernel=True
        )
        if x.dim() == 3:
            return x.new_empty((x.shape[0], out_h, out_w))
        return torch.empty(
            (x.shape[0], x.shape[1], out_h, out_w),
            dtype=x.dtype,
            device=x.device,
            memory_format=dense_format(x),
        )

    # Its backward raises: registered in C++ (NOTE: [No backward in C++], csrc/no_backward.cpp).
