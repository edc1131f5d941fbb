"""``expand_depthwise_conv2d_inference``: an inverted residual block's 1x1 expansion and depthwise convolution in one
pass (MobileNetV2, EfficientNet), on channels_last maps, the expanded map kept in the cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _extension
from ._common import (ACTIVATION_FNS, check_float32_bias, check_padded_map, check_padding, check_stride, is_tensor,
                      pair, references_check)
from .depthwise_conv2d_inference import DEPTHWISE_ACTIVATIONS
from .gemm_act_inference import GEMM_ACTIVATIONS, GEMM_PANEL, _weight_from_panels

__all__ = ["expand_depthwise_conv2d_inference", "reference_expand_depthwise_conv2d_inference"]


def _check_expand_depthwise_conv2d_inference(x, panels, expand_bias, mid_channels, expand_act, weight, bias, stride,
                                             padding, act) -> None:
    """The twin of ``check_expand_depthwise_conv2d_inference`` in csrc/cpu/expand_depthwise_conv2d_inference.cpp
    (same messages)."""
    op = "expand_depthwise_conv2d_inference"
    torch._check(expand_act in GEMM_ACTIVATIONS,
                 lambda: f"{op}: act must be one of {', '.join(GEMM_ACTIVATIONS)}, got '{expand_act}'")
    torch._check(act in DEPTHWISE_ACTIVATIONS,
                 lambda: f"{op}: act must be one of {', '.join(DEPTHWISE_ACTIVATIONS)}, got '{act}'")
    if not is_tensor(x, panels, weight) or not all(t is None or is_tensor(t) for t in (expand_bias, bias)):
        return
    torch._check(x.dtype == torch.float32, lambda: f"{op}: x must be float32, got {x.dtype}")
    torch._check(x.dim() == 4 and x.shape[1] > 0 and x.shape[2] > 0 and x.shape[3] > 0,
                 lambda: f"{op}: x must be 4-D (N, C, H, W) with non-zero C, H, W, got shape {list(x.shape)}")
    count, channels = -(-mid_channels // GEMM_PANEL), x.shape[1]
    torch._check(panels.dtype == torch.float32, lambda: f"{op}: panels must be float32, got {panels.dtype}")
    torch._check(mid_channels > 0 and tuple(panels.shape) == (count, channels, GEMM_PANEL),
                 lambda: f"{op}: panels must have shape [{count}, {channels}, 16] for {mid_channels} expanded channels "
                 f"and {channels} input channels (ops.gemm_panels(expand_weight)), got {list(panels.shape)}")
    check_float32_bias(op, "expand_bias", expand_bias, mid_channels)
    size = weight.shape[2] if weight.dim() == 4 else 0
    torch._check(weight.dim() == 4 and tuple(weight.shape) == (mid_channels, 1, size, size) and size in (3, 5, 7),
                 lambda: f"{op}: weight must have shape [{mid_channels}, 1, K, K] with K 3, 5 or 7 (one depthwise "
                 f"filter per expanded channel), got {list(weight.shape)}")
    torch._check(weight.dtype == torch.float32, lambda: f"{op}: weight must be float32, got {weight.dtype}")
    check_float32_bias(op, "bias", bias, mid_channels)
    stride, padding = list(stride), list(padding)
    check_stride(op, stride)
    check_padding(op, padding)
    check_padded_map(op, x, padding, size, size)


def reference_expand_depthwise_conv2d_inference(x: torch.Tensor, panels: torch.Tensor, expand_bias: torch.Tensor | None,
                                                mid_channels: int, expand_act: str, weight: torch.Tensor,
                                                bias: torch.Tensor | None, stride: Sequence[int],
                                                padding: Sequence[int], act: str = "none") -> torch.Tensor:
    """Pure-PyTorch :func:`expand_depthwise_conv2d_inference`: the two convolutions as written, answered in
    channels_last."""
    if references_check():  # NOTE: [Checks under compile]
        _check_expand_depthwise_conv2d_inference(x, panels, expand_bias, mid_channels, expand_act, weight, bias,
                                                 stride, padding, act)
    expand = _weight_from_panels(panels, mid_channels)[:, :, None, None]
    h = ACTIVATION_FNS[expand_act](F.conv2d(x, expand, expand_bias))
    y = F.conv2d(h, weight, bias, list(stride), list(padding), 1, mid_channels)
    return ACTIVATION_FNS[act](y).contiguous(memory_format=torch.channels_last)


def expand_depthwise_conv2d_inference(x: torch.Tensor, panels: torch.Tensor, expand_bias: torch.Tensor | None,
                                      mid_channels: int, expand_act: str, weight: torch.Tensor,
                                      bias: torch.Tensor | None, stride: int | Sequence[int] = 1,
                                      padding: int | Sequence[int] = 1, act: str = "none") -> torch.Tensor:
    """``act(F.conv2d(expand_act(F.conv2d(x, expand_weight, expand_bias)), weight, bias, stride, padding,
    groups=mid_channels))``: an inverted residual block's 1x1 expansion and depthwise convolution in one pass, the
    expansion's weight given as ``ops.gemm_panels(expand_weight.flatten(1))`` (inference only: it has no backward).

    Each task keeps the expanded rows the depthwise filter reads in a ring of K rows, computes each once on
    ops.gemm_act_inference's register tiles and runs the depthwise kernel's row loops on them, so the expanded map
    (4-6 times the input's channels) never goes out to memory (NOTE: [Expanded rows in a ring] in
    csrc/cpu/expand_depthwise_conv2d_inference.cpp). ``tg.optimize`` runs MobileNetV2's and EfficientNet's blocks on
    it where that is faster (NOTE: [Inverted residuals in one pass] in torchgraph/fused/conv_expand.py). float32 CPU
    tensors run the kernel, the rest the reference.

    Example:
        >>> import torch.nn.functional as F
        >>> from torchgraph.ops import gemm_panels
        >>> x, w1, b1 = torch.randn(2, 16, 12, 12), torch.randn(96, 16, 1, 1), torch.randn(96)
        >>> w2, b2 = torch.randn(96, 1, 3, 3), torch.randn(96)
        >>> y = expand_depthwise_conv2d_inference(x, gemm_panels(w1.flatten(1)), b1, 96, "relu6", w2, b2, 2, 1, "relu6")
        >>> expected = F.relu6(F.conv2d(F.relu6(F.conv2d(x, w1, b1)), w2, b2, 2, 1, groups=96))
        >>> y.shape, torch.allclose(y, expected, atol=1e-4)
        (torch.Size([2, 96, 6, 6]), True)

    Args:
        x: ``(N, C, H, W)`` float32 (read channels_last).
        panels: ``gemm_panels(expand_weight.flatten(1))`` for the expansion's ``(M, C, 1, 1)`` weight.
        expand_bias: ``(M,)`` or None.
        mid_channels: ``M``.
        expand_act: the expansion's activation (as for ``gemm_act_inference``).
        weight: the depthwise ``(M, 1, K, K)`` filters, K 3, 5 or 7 (read without a copy as
            ``ops.depthwise_conv2d_inference.taps_last`` stores them).
        bias: ``(M,)`` or None.
        stride, padding: ints or pairs, the depthwise convolution's.
        act: the depthwise convolution's activation: ``"none"``, ``"relu"``, ``"relu6"``, ``"silu"`` or
            ``"hardswish"``.

    Returns:
        ``(N, M, H_out, W_out)`` in channels_last.

    Raises:
        RuntimeError: On other shapes, dtypes or activations, or if gradients are requested.
    """
    stride, padding = (pair(v) if isinstance(v, int) else list(v) for v in (stride, padding))
    if (_extension.HAS_C_OPS and isinstance(x, torch.Tensor) and x.device.type in ("cpu", "meta")
            and x.dtype == torch.float32):
        return torch.ops.torchgraph.expand_depthwise_conv2d_inference.default(
            x, panels, expand_bias, mid_channels, expand_act, weight, bias, stride, padding, act)
    return reference_expand_depthwise_conv2d_inference(x, panels, expand_bias, mid_channels, expand_act, weight, bias,
                                                       stride, padding, act)


# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::expand_depthwise_conv2d_inference")
    def _expand_depthwise_conv2d_inference_fake(x, panels, expand_bias, mid_channels, expand_act, weight, bias,
                                                stride, padding, act="none"):
        _check_expand_depthwise_conv2d_inference(x, panels, expand_bias, mid_channels, expand_act, weight, bias,
                                                 stride, padding, act)
        size = weight.shape[2]
        height = (x.shape[2] + 2 * padding[0] - size) // stride[0] + 1
        width = (x.shape[3] + 2 * padding[1] - size) // stride[1] + 1
        return torch.empty((x.shape[0], mid_channels, height, width), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    # Its backward raises: registered in C++ (NOTE: [No backward in C++], csrc/no_backward.cpp).
