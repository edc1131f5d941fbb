"""``depthwise_conv2d_inference``: a 3x3, 5x5 or 7x7 depthwise convolution with its bias and activation, on
channels_last maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _extension
from ._common import ACTIVATION_FNS, check_padded_map, check_padding, check_stride, is_tensor, pair, references_check

__all__ = ["DEPTHWISE_ACTIVATIONS", "depthwise_conv2d_inference", "reference_depthwise_conv2d_inference",
           "taps_last"]

#: Activations the kernel applies after the bias (their PyTorch functions: ``ACTIVATION_FNS``).
DEPTHWISE_ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish")
_DTYPES = (torch.float32, torch.bfloat16)


def _check_depthwise_conv2d_inference(x, weight, bias, stride, padding, act) -> None:
    """The twin of ``check_depthwise_conv2d_inference`` in csrc/cpu/depthwise_conv2d_inference.cpp (same messages)."""
    op = "depthwise_conv2d_inference"
    torch._check(act in DEPTHWISE_ACTIVATIONS,
                 lambda: f"{op}: act must be one of {', '.join(DEPTHWISE_ACTIVATIONS)}, got '{act}'")
    if not is_tensor(x, weight) or not (bias is None or is_tensor(bias)):
        return
    torch._check(x.dtype in _DTYPES, lambda: f"{op}: x must be float32 or bfloat16, got {x.dtype}")
    torch._check(x.dim() == 4 and x.shape[1] > 0 and x.shape[2] > 0 and x.shape[3] > 0,
                 lambda: f"{op}: x must be 4-D (N, C, H, W) with non-zero C, H, W, got shape {list(x.shape)}")
    channels = x.shape[1]
    torch._check(tuple(weight.shape) in ((channels, 1, 3, 3), (channels, 1, 5, 5), (channels, 1, 7, 7)),
                 lambda: f"{op}: weight must have shape [{channels}, 1, K, K] with K 3, 5 or 7 (one 3x3, 5x5 or 7x7 "
                 f"filter per channel of x), got {list(weight.shape)}")
    torch._check(weight.dtype == x.dtype,
                 lambda: f"{op}: weight dtype must equal x dtype {x.dtype}, got {weight.dtype}")
    if bias is not None:
        torch._check(tuple(bias.shape) == (channels,),
                     lambda: f"{op}: bias must have shape [{channels}], got {list(bias.shape)}")
        torch._check(bias.dtype == x.dtype, lambda: f"{op}: bias dtype must equal x dtype {x.dtype}, got {bias.dtype}")
    stride, padding = list(stride), list(padding)
    check_stride(op, stride)
    check_padding(op, padding)
    check_padded_map(op, x, padding, weight.shape[2], weight.shape[2])


def _output_size(x, weight, stride, padding) -> tuple:
    return tuple((x.shape[2 + i] + 2 * padding[i] - weight.shape[2]) // stride[i] + 1 for i in (0, 1))


def reference_depthwise_conv2d_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                         stride: Sequence[int], padding: Sequence[int],
                                         act: str = "none") -> torch.Tensor:
    """Pure-PyTorch :func:`depthwise_conv2d_inference`: ``F.conv2d`` with ``groups=C``, then the activation,
    answered in channels_last."""
    if references_check():  # NOTE: [Checks under compile]
        _check_depthwise_conv2d_inference(x, weight, bias, stride, padding, act)
    y = F.conv2d(x, weight, bias, list(stride), list(padding), 1, x.shape[1])
    return ACTIVATION_FNS[act](y).contiguous(memory_format=torch.channels_last)


def taps_last(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[C, 1, K, K]`` with the same values, stored as its K*K taps of C channels
    (``[K, K, C]`` in memory), the form the kernel reads without a copy.

    Example:
        >>> w = torch.randn(8, 1, 3, 3)
        >>> taps = taps_last(w)
        >>> torch.equal(taps, w), taps.stride()
        (True, (1, 8, 24, 8))
    """
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def depthwise_conv2d_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                               stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 1,
                               act: str = "none") -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding, groups=C))`` for 3x3, 5x5 and 7x7 depthwise filters,
    in one pass over channels_last maps (inference only: it has no backward).

    Every filter tap of a depthwise convolution on a channels_last map is a contiguous run of C
    channels, so the kernel is K*K vector multiply-adds an output pixel, from float32 sums (bfloat16
    is widened on load and rounded once). ``tg.optimize`` runs MobileNet's, EfficientNet's and ConvNeXt's depthwise
    convolutions with it (NOTE: [Depthwise convolutions] in torchgraph/fused/conv.py). float32 and
    bfloat16 CPU tensors run the kernel, the rest the reference. The output is channels_last.

    Example:
        >>> import torch.nn.functional as F
        >>> x, w, b = torch.randn(2, 16, 8, 8), torch.randn(16, 1, 3, 3), torch.randn(16)
        >>> y = depthwise_conv2d_inference(x, w, b, stride=2, padding=1, act="relu6")
        >>> torch.allclose(y, F.relu6(F.conv2d(x, w, b, 2, 1, groups=16)), atol=1e-5)
        True

    Args:
        x: ``(N, C, H, W)``, float32 or bfloat16.
        weight: ``(C, 1, K, K)`` with K 3, 5 or 7, x's dtype (any strides; :func:`taps_last` is the
            form read without a copy).
        bias: ``(C,)``, x's dtype, or None.
        stride, padding: an int or a pair.
        act: ``"none"``, ``"relu"``, ``"relu6"``, ``"silu"`` or ``"hardswish"``.

    Returns:
        ``(N, C, H_out, W_out)`` in channels_last.

    Raises:
        RuntimeError: On other shapes, dtypes or activations, or if gradients are requested.
    """
    stride = pair(stride) if isinstance(stride, int) else list(stride)
    padding = pair(padding) if isinstance(padding, int) else list(padding)
    if (_extension.HAS_C_OPS and isinstance(x, torch.Tensor) and x.device.type in ("cpu", "meta")
            and x.dtype in _DTYPES):
        return torch.ops.torchgraph.depthwise_conv2d_inference.default(x, weight, bias, stride, padding, act)
    return reference_depthwise_conv2d_inference(x, weight, bias, stride, padding, act)


# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::depthwise_conv2d_inference")
    def _depthwise_conv2d_inference_fake(x, weight, bias, stride, padding, act="none"):
        _check_depthwise_conv2d_inference(x, weight, bias, stride, padding, act)
        height, width = _output_size(x, weight, stride, padding)
        return torch.empty((x.shape[0], x.shape[1], height, width), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    # Its backward raises: registered in C++ (NOTE: [No backward in C++], csrc/no_backward.cpp).
