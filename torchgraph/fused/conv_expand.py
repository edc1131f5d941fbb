"""An inverted residual block's 1x1 expansion and depthwise convolution in one call: :func:`conv2d_expand_depthwise`."""

from __future__ import annotations

import weakref

import torch
import torch.fx

from .. import _extension
from ..ops.depthwise_conv2d_inference import taps_last
from . import _common
from ._common import use_onednn
from .conv import conv2d_act
from .weights import _cached_beside, _gemm_panels_weight

__all__ = ["EXPAND_DEPTHWISE_KERNEL", "EXPAND_DEPTHWISE_MIN_BAND_ROWS", "conv2d_expand_depthwise"]

# NOTE: [Inverted residuals in one pass] MobileNetV2's and EfficientNet's blocks widen the map 4-6 times with a 1x1
# convolution and read it straight back with a depthwise one. Run as two kernels (ops.gemm_act_inference, then
# ops.depthwise_conv2d_inference), the wide map goes out to memory and back; ops.expand_depthwise_conv2d_inference
# keeps its rows in the cache (NOTE: [Expanded rows in a ring] in csrc/cpu/expand_depthwise_conv2d_inference.cpp).
# On the AMD EPYC (AVX2, 2 threads, ad hoc, interleaved medians of 11 x 10 calls, the fused kernel against the two,
# same values), on MobileNetV2's, MobileNetV3's and EfficientNet-B0's blocks: 16 -> 96 on 112x112 at b1 (stride 2)
# 0.61x the time (0.92-0.94 -> 0.56-0.57 ms), at b8 32x32 0.70x; 56x56 and 28x28 maps 0.85-1.00x, 14x14 0.88-0.94x,
# 5x5 filters 0.89-0.93x, b8's 4x4 and 8x8 maps 0.87-0.89x, 2x2 1.03x. Where a batch has fewer images than threads,
# each image is split between them: first version, into bands of output rows only, each band recomputing the
# expanded rows it shares with the one before. On short bands that lost (b1 7x7: 1.15-1.16x with 3x3 filters,
# 1.28x with 5x5; 14x14 to 7x7 by stride 2 with 5x5 filters: 1.23x; bands of 4 output rows), and on 14x14 it
# was level (0.97-1.03x). Now maps of fewer than 14 output rows a thread are split by channel blocks instead
# (bands still split maps of 28 output rows and more: 112x112 and 56x56 maps took 0.89-0.93x the time of channel
# parts there, 28x28 ones 0.98-1.04x; and the channels where there are more threads than blocks), and the kernel's ring is stored by channel block (NOTE:
# [Expanded rows in a ring]). Against the two kernels, in one process (ad hoc, interleaved medians): b1 14x14
# 0.58-0.75x, 7x7 0.79x (0.86x with 5x5 filters), 28x28 by stride 2 0.69x, b8 2x2 0.86x; 112x112 and 56x56 as
# before. A split that still leaves bands shorter than EXPAND_DEPTHWISE_MIN_BAND_ROWS output rows (more threads
# than channel blocks, on a small map) keeps the two kernels.
#: Run a channels_last 1x1 convolution and the depthwise convolution reading it as one kernel (AVX2 CPUs) ...
EXPAND_DEPTHWISE_KERNEL = _common._AVX2_ONLY
#: ... where no image is split into bands of fewer output rows than this (NOTE: [Inverted residuals in one pass]).
EXPAND_DEPTHWISE_MIN_BAND_ROWS = 7

# Channels of the kernel's blocks (kGemmBlock) on AVX2, where it is routed.
_CHANNEL_BLOCK = 16
# Output rows of a band from which the kernel splits an image by bands first (kLongBand).
_LONG_BAND = 14
_TAPS: dict[int, tuple] = {}


def _runs_kernel(x: torch.Tensor, expand_weight: torch.Tensor, expand_bias, weight: torch.Tensor, bias, stride,
                padding) -> bool:
    if not (EXPAND_DEPTHWISE_KERNEL and _extension.HAS_C_OPS and x.dtype == torch.float32 and x.dim() == 4
            and use_onednn(x, expand_weight, expand_bias, weight, bias)):
        return False
    # the kernel's tasks (NOTE: [Expanded rows in a ring] in csrc/cpu/expand_depthwise_conv2d_inference.cpp):
    # ceil(threads / N) an image, split by channel blocks first, then into bands of output rows
    images, out_rows = x.shape[0], (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
    per_image = -(-torch.get_num_threads() // images) if images else 1
    parts = 1 if out_rows >= _LONG_BAND * per_image else min(-(-weight.shape[0] // _CHANNEL_BLOCK), per_image)
    bands = min(out_rows, -(-per_image // parts))
    return bands <= 1 or -(-out_rows // bands) >= EXPAND_DEPTHWISE_MIN_BAND_ROWS


# NOTE: [Plans of fused blocks] As for the convolutions (NOTE: [Per-layer plans] in conv.py), deciding per call
# (use_onednn on five tensors, the split rule, two weight-cache lookups) cost ~9 us of Python around the kernel
# (21 vs 12 us a call on a 4x4 map, ad hoc), on each of MobileNetV2's 16 blocks. The first call that runs the
# kernel stores what it read in an _ExpandPlan keyed by the depthwise weight; later calls check that it holds.
class _ExpandPlan:
    """One block's kernel call: the expansion's panels and the depthwise taps, for this input shape and these
    threads."""

    __slots__ = ("weight", "version", "expand_weight", "expand_version", "expand_bias", "bias", "shape", "key",
                 "panels", "taps")

    def holds(self, x: torch.Tensor, expand_weight: torch.Tensor, expand_bias, weight: torch.Tensor, bias,
              key: tuple) -> bool:
        # NOTE: ordered and written for speed; the dtype and device checks as in _ConvPlan.holds
        return (self.weight() is weight and weight._version == self.version
                and self.expand_weight() is expand_weight and expand_weight._version == self.expand_version
                and expand_bias is self.expand_bias and bias is self.bias and x.shape == self.shape
                and key == self.key and x.dtype is torch.float32 and x.is_cpu
                and weight.dtype is torch.float32 and weight.is_cpu
                and expand_weight.dtype is torch.float32 and expand_weight.is_cpu
                and (bias is None or bias.dtype is torch.float32)
                and (expand_bias is None or expand_bias.dtype is torch.float32)
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                      or expand_weight.requires_grad
                                                      or (bias is not None and bias.requires_grad)
                                                      or (expand_bias is not None and expand_bias.requires_grad)))
                and not torch.compiler.is_compiling() and not torch._C._is_tracing())


_PLANS: dict[int, _ExpandPlan] = {}


def _plan(x, expand_weight, expand_bias, weight, bias, key, panels, taps) -> None:
    plan = _ExpandPlan()
    plan.weight, plan.version, plan.bias = weakref.ref(weight), weight._version, bias
    plan.expand_weight, plan.expand_version = weakref.ref(expand_weight), expand_weight._version
    plan.expand_bias, plan.shape, plan.key, plan.panels, plan.taps = expand_bias, x.shape, key, panels, taps
    ident = id(weight)
    if ident not in _PLANS:
        weakref.finalize(weight, _PLANS.pop, ident, None)
    _PLANS[ident] = plan


def _route(x, expand_weight, expand_bias, expand_act, weight, bias, stride, padding, act="none") -> str:
    """What :func:`conv2d_expand_depthwise` runs for these arguments, for ``tg.profile``."""
    if isinstance(x, torch.Tensor) and _runs_kernel(x, expand_weight, expand_bias, weight, bias, stride, padding):
        return "expansion + depthwise kernel"
    return "two convolutions"


def conv2d_expand_depthwise(x: torch.Tensor, expand_weight: torch.Tensor, expand_bias: torch.Tensor | None,
                            expand_act: str, weight: torch.Tensor, bias: torch.Tensor | None, stride: list,
                            padding: list, act: str = "none") -> torch.Tensor:
    """``conv2d_act(conv2d_act(x, expand_weight, expand_bias, act=expand_act), weight, bias, stride, padding,
    groups=M, act=act)``, both channels_last: an inverted residual block's 1x1 expansion to ``M`` channels and its
    depthwise convolution in one call.

    Where the kernel applies (float32 CPU tensors, no gradient, eager; AVX2 CPUs) it runs
    ops.expand_depthwise_conv2d_inference, which keeps the expanded map in the cache (NOTE: [Inverted residuals in
    one pass]); elsewhere (bfloat16, gradients, traced programs, exporters) the two fused convolutions it replaced.

    Args:
        x: input ``(N, C, H, W)``.
        expand_weight, expand_bias: the 1x1 convolution's ``(M, C, 1, 1)`` weight and ``(M,)`` bias (or None).
        expand_act: its activation (a key of ``GEMM_ACTIVATIONS``).
        weight, bias: the depthwise convolution's ``(M, 1, K, K)`` filters (K 3, 5 or 7) and bias (or None).
        stride, padding: pairs of ints, the depthwise convolution's.
        act: its activation (a key of ``DEPTHWISE_ACTIVATIONS``).

    Returns:
        ``(N, M, H_out, W_out)`` in channels_last.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x, w1, w2 = torch.randn(1, 8, 10, 10), torch.randn(48, 8, 1, 1), torch.randn(48, 1, 3, 3)
        >>> with torch.no_grad():
        ...     y = conv2d_expand_depthwise(x, w1, None, "relu6", w2, None, [2, 2], [1, 1], "relu6")
        >>> torch.allclose(y, F.relu6(F.conv2d(F.relu6(F.conv2d(x, w1)), w2, None, 2, 1, groups=48)), atol=1e-4)
        True
    """
    if isinstance(x, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        args = (x, expand_weight, expand_bias, expand_act, weight, bias, stride, padding, act)
        return x.tracer.create_proxy("call_function", conv2d_expand_depthwise, args, {})
    mid = weight.shape[0]
    key = (stride, padding, expand_act, act, torch.get_num_threads(), EXPAND_DEPTHWISE_KERNEL,
           EXPAND_DEPTHWISE_MIN_BAND_ROWS)
    plan = _PLANS.get(id(weight))
    if plan is not None and type(x) is torch.Tensor and plan.holds(  # noqa: E721
            x, expand_weight, expand_bias, weight, bias, key):
        return torch.ops.torchgraph.expand_depthwise_conv2d_inference.default(
            x, plan.panels, expand_bias, mid, expand_act, plan.taps, bias, stride, padding, act)
    if _runs_kernel(x, expand_weight, expand_bias, weight, bias, stride, padding):
        panels = _gemm_panels_weight(expand_weight)
        taps = _cached_beside(_TAPS, weight, taps_last)
        if panels is not None and taps is not None:
            _plan(x, expand_weight, expand_bias, weight, bias, key, panels.panels, taps)
            return torch.ops.torchgraph.expand_depthwise_conv2d_inference.default(
                x, panels.panels, expand_bias, mid, expand_act, taps, bias, stride, padding, act)
    h = conv2d_act(x, expand_weight, expand_bias, [1, 1], [0, 0], [1, 1], 1, expand_act, channels_last=True)
    return conv2d_act(h, weight, bias, stride, padding, [1, 1], mid, act, channels_last=True)
