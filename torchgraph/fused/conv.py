"""``act(conv2d(x))`` and ``act(conv2d(x) + residual)`` in one call: :func:`conv2d_act`, :func:`conv2d_add_act`."""

from __future__ import annotations

import weakref

import torch
import torch.fx
import torch.nn.functional as F

from .. import _extension, ops
from ..ops.depthwise_conv2d_inference import DEPTHWISE_ACTIVATIONS, taps_last
from ..ops.gemm_act_inference import GEMM_ACTIVATIONS
from ..ops.implicit_gemm_conv2d_inference import implicit_gemm_filters
from ..ops.winograd_conv2d_inference import WINOGRAD_ACTIVATIONS, winograd_filters
from . import _common
from ._common import (_ONEDNN_DTYPES, _activation, _activation_, _epilogue, onednn_epilogue,
                      use_onednn)
from .conv_gemm import _run_gemm
from .cpu_profile import MKL_GEMMS_FAST
from .weights import (_HAS_MKL_PACKED, GemmPanels, _filters_as_rows, _gemm_panels_weight, _mkl_packed_weight,
                      _onednn_linear_weight, _packed_weight)

__all__ = ["CONV_GEMM_MAX_ROWS", "CONV_IM2COL_MAX_ROWS", "CONV_IM2COL_MAX_WIDTH", "DEPTHWISE_BF16_MAX_PIXELS",
           "DEPTHWISE_KERNEL", "GEMM_KERNEL", "GEMM_KERNEL_MIN_DEPTH", "IMPLICIT_GEMM_KERNEL", "IMPLICIT_GEMM_MAX_CHANNELS",
           "ONEDNN_F32_CONV_GEMM_MAX_ROWS",
           "ONEDNN_F32_IM2COL_MAX_WIDTH", "RESIDUAL_ACTIVATIONS", "WINOGRAD_KERNEL", "WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_TILES", "conv2d_act",
           "conv2d_add_act"]

# NOTE: [Convolutions on few pixels] A convolution whose output has few pixels (ResNet-50's last
# stage: 2x2 maps at batch 8 and 64x64 input, 7x7 at batch 1 and 224x224) reads its whole weight for
# a few dozen output rows, and oneDNN's direct convolution is slow there, most of all on maps a few
# pixels wide (its kernels block over the output width). Measured here for every ResNet-50
# convolution (1 and 2 threads, interleaved medians, `python benchmarks/bench_conv_layouts.py --arch resnet50`),
# the convolution written as one GEMM on the NHWC rows (im2col for k > 1) through MKL's prepacked
# weights took:
# - 1x1 kernels: 0.4-0.6x oneDNN's time at 32 rows (2.57 -> 1.09 ms for 1024->2048 stride 2 at
#   2 threads), 0.9-1.0x at 49-196 rows, a tie at 512 rows and up to 1.1x slower from 784 rows;
# - 3x3 kernels: 0.45-0.6x on 2x2 maps (32 rows), 0.84-1.06x on 4x4 maps (128 rows), but 1.06-1.12x
#   slower on 7x7 maps (49 rows) and 1.3-1.9x slower from 8x8 maps up.
# Inside whole models (2 threads, interleaved, `tg.optimize` with the limits moved), a limit of 256
# rows for 1x1 kernels lost to 128: MobileNetV2 b8 64x64 1.92-2.14x vs 2.26-2.35x eager, ResNet-50
# b1 224x224 1.31x vs 1.44x, while ResNet-50 b8 64x64 gained nothing (1.48x vs 1.50x). Hence the
# limits below. The GEMM answers in NHWC, i.e. channels_last strides, like oneDNN. In
# bfloat16 (AMX) the same GEMM through oneDNN's matmul took 0.35-0.55x the convolution's time at 32
# rows and 0.85-1.03x at 128 rows (2 threads), so bfloat16 takes the same limits.
# Float32 runs the GEMM on MKL on Intel CPUs, on oneDNN's matmul elsewhere (NOTE: [MKL on other
# vendors' CPUs] in cpu_profile.py).
_MKL_CONV_GEMMS = _HAS_MKL_PACKED and MKL_GEMMS_FAST
#: 1x1 convolutions with at most this many output pixels (N x H_out x W_out) run as an MKL GEMM.
CONV_GEMM_MAX_ROWS = 128
#: Larger kernels run as im2col + MKL GEMM when their output is at most this wide ...
CONV_IM2COL_MAX_WIDTH = 4
#: ... and has at most this many output pixels.
CONV_IM2COL_MAX_ROWS = 128

# NOTE: [Float32 convolution GEMMs on oneDNN] The limits above were measured against MKL's GEMM
# (Intel, float32) and oneDNN's bfloat16 matmul (AMX). Where float32 GEMMs run on oneDNN's matmul
# (CPUs where MKL is slow), the AMD EPYC (2 threads, each ResNet-50/MobileNetV2 convolution alone,
# `conv2d_act` channels_last, medians) gave: 1x1 convolutions as a GEMM at 0.84-0.98x the fused
# convolution's time at every size from 32 to 12,544 output pixels (a few at 1.02-1.14x: MobileNetV2
# b1's 576 -> 96 and 960 -> 160/320 at 49-196 pixels), 3x3 ones on 4-wide maps 1.28-1.40x slower
# (ResNet-50's layer3 at b8 64x64, inside the old limit) and on 2-wide maps 0.77-0.93x. In whole models
# (interleaved, quiet, freed memory retained, two processes) every 1x1 convolution as a GEMM plus 3x3
# ones on maps at most 2 wide ran faster than the old limits: ResNet-50 b8 64x64 1.014-1.063x, b1
# 224x224 1.013-1.016x, MobileNetV2 b8 1.005-1.076x, b1 1.050-1.062x; in bfloat16 the same change lost
# (ResNet-50 0.961x, 0.970x), so bfloat16 keeps the limits above.
#: Float32 1x1 convolutions run as a oneDNN GEMM up to this many output pixels where MKL is slow (no limit).
ONEDNN_F32_CONV_GEMM_MAX_ROWS = 1 << 62
#: Float32 im2col GEMMs where MKL is slow: output at most this wide (and CONV_IM2COL_MAX_ROWS pixels).
ONEDNN_F32_IM2COL_MAX_WIDTH = 2

# NOTE: [GEMM kernel] On the AMD EPYC (Zen 3, AVX2 only, 2 threads, float32, interleaved medians of
# 11 x several calls, the bias and ReLU6 included), oneDNN's matmul ran the GEMMs of MobileNetV2's and
# ResNet-50's 1x1 convolutions at 45-150 GFLOP/s, about one core's worth below ~1,000 rows (the second
# thread hardly helps: 128 x 96 -> 576 took 193 us on one thread and 179 on two), with ~25 us a call
# before any arithmetic; ONNX Runtime's MLAS ran the same MobileNetV2 layers 1.5-2x faster (its
# profiler, b8 64x64). ops.gemm_act_inference, a register-tiled GEMM parallel over rows (or output
# channels when rows are few) with the bias, residual and activation applied before its one store, took
# 0.51-0.85x oneDNN's time on MobileNetV2's shapes (128 x 576 -> 96: 213 -> 115 us; 32 x 160 -> 960: 116
# -> 73 us) and 0.8-0.95x on ResNet-50's 512-2,048-row ones, but 1.0-1.2x on 8,192 x 16 -> 96 (K = 16:
# the stores dominate). The whole-model figures are in docs/optimize.md. Hence float32 convolution
# GEMMs run on it where torch runs at the AVX2 level and float32 GEMMs would otherwise run on oneDNN
# (AVX-512 CPUs keep oneDNN or MKL: not measured there). The shortest sums stay on oneDNN: once the
# kernel's epilogue was compiled per activation (NOTE: [Compile-time epilogues] in
# csrc/cpu/gemm_act_inference.cpp), it took, through conv2d_act as tg.optimize calls it (channels_last,
# ReLU6 where MobileNetV2 has one, interleaved medians of 100, two processes), 0.82-0.84x oneDNN's
# time on 12,544 x 32 -> 16, 0.76-0.79x on 784 x 32 -> 192, 0.72-0.79x on 512 x 32 -> 192, 0.89-0.93x
# on 3,136 x 24 -> 144 and 0.91-0.93x on 2,048 x 24 -> 144, but 0.84-1.0x on 12,544 x 16 -> 96 and
# 1.04-1.08x on 8,192 x 16 -> 96 (MobileNetV2's first expansion at b1 224x224 and b8 64x64), where a
# tile's 16 FMAs an output are too few to hide its stores. (Before that change, 1.31-1.68x on these
# K = 16-32 shapes, and the limit was 64.)
#: Run float32 convolution GEMMs on ops.gemm_act_inference where they would run on oneDNN's matmul (AVX2) ...
GEMM_KERNEL = _common._AVX2_ONLY
#: ... when they sum over at least this many inputs (in_channels x kernel height x width).
GEMM_KERNEL_MIN_DEPTH = 24


# NOTE: [Winograd convolutions] On the AMD EPYC (Zen 3, AVX2 only, 2 threads), oneDNN's direct 3x3
# convolutions ran ResNet-50's layers at 115-165 GFLOP/s, the machine's peak multiply rate (an implicit GEMM
# on ops.gemm_act_inference's register tiles, ad hoc, was level with it: 0.92-1.07x its time), so only fewer
# multiplies could make them faster. Winograd's F(2x2, 3x3) (ops.winograd_conv2d_inference) needs 16 products
# per 2x2 outputs and channel pair instead of 36. Measured alone against the planned oneDNN call (channels_last,
# bias and ReLU, interleaved medians of 9 x 8 calls, three runs, ad hoc), on ResNet-50's stride-1 3x3 shapes:
# 0.61-0.87x its time at batch 1 224x224 from 14x14 maps up (49-784 tiles of 2x2 outputs), 0.71-0.97x at
# batch 8 64x64 (32-512 tiles), but 1.20-1.30x on the 7x7 maps of batch 1 (16 tiles: GEMMs of 16 rows) and
# 1.06-1.57x with 16-32 channels (NOTE: [Winograd phases] in csrc/cpu/winograd_conv2d_inference.cpp).
# Its values are closer to float64's than the direct convolution's (3-6e-7 against 8e-7 to 2.4e-6 of the
# largest output). Hence where the float32 GEMM kernel runs (AVX2 CPUs; not measured with AVX-512), stride-1
# undilated ungrouped 3x3 convolutions with at least WINOGRAD_MIN_TILES tiles and WINOGRAD_MIN_CHANNELS
# input and output channels run on it, in channels_last plans, with the residual add of a ResNet basic
# block (conv2d_add_act) in its epilogue too.
#: Run stride-1 3x3 float32 convolutions by Winograd's F(2x2, 3x3) (AVX2 CPUs) ...
WINOGRAD_KERNEL = _common._AVX2_ONLY
#: ... when the output has at least this many 2x2 tiles (N x ceil(H_out / 2) x ceil(W_out / 2)) ...
WINOGRAD_MIN_TILES = 32
#: ... and at least this many input and output channels.
WINOGRAD_MIN_CHANNELS = 64

# NOTE: [Depthwise convolutions] oneDNN's depthwise convolution (torch's
# mkldnn::_convolution_pointwise) took 25-30 us a call inside MobileNetV2 even on 2x2 and 4x4 maps,
# where the arithmetic is a few microseconds: MobileNetV2 b8 64x64 spent ~0.6 ms of its ~2.5 ms in
# its 17 depthwise convolutions (2 threads, profiler, float32). On channels_last maps every tap of a
# depthwise filter is a contiguous run of channels, so the kernel is K*K vector FMAs an output
# pixel (ops.depthwise_conv2d_inference). Measured alone against the planned oneDNN call (2
# threads, medians of 7 x 200 calls, ReLU6, every MobileNetV2 shape at b8 64x64 and b1 224x224):
# float32 1.12-1.5x faster on the 56x56 to 112x112 maps of batch 1 and 1.2-5x on the rest;
# bfloat16 1.1-3.9x up to 2,048 output pixels but 0.64-0.87x on larger maps (the widening and
# rounding of every load and store cost more than oneDNN's blocked bfloat16 kernel there), and
# 0.64x at 2,048 pixels with 144 channels (a pixel of 288 bytes straddles cache lines). 5x5
# filters (EfficientNet, MobileNetV3), 1 thread, the best of 7 x 100 calls, SiLU, on their shapes
# at b1 224x224 and b8 64x64: float32 0.93-1.57x oneDNN's speed (1.06-1.57x on every map up to
# 512 pixels, 0.93-1.17x on the larger ones), bfloat16 0.69-1.38x, slower on most maps of 196 or
# more pixels. Hence float32 always, bfloat16 only 3x3 filters up to DEPTHWISE_BF16_MAX_PIXELS
# output pixels (N x H_out x W_out); no dilation, channels_last plans only.
# 7x7 filters (ConvNeXt's blocks; 2 threads, the best of 7 x 50 calls, against the planned oneDNN call, on
# ConvNeXt-atto's shapes at b8 64x64 and b1 224x224 and ConvNeXt-T's at b1): float32 1.3-8.4x oneDNN's speed
# on every shape but 40 channels on maps of 2,048 and 3,136 output pixels (0.84x: a 40-channel pixel is two
# and a half vectors, and oneDNN's blocked kernel does better there); bfloat16 3.3-9x on maps up to 128
# pixels, 0.75-0.92x on most maps of 196 pixels or more (1.56-2.1x on a few). Hence float32 where the
# channels fill whole vectors or the map has at most DEPTHWISE_7X7_MAX_PIXELS output pixels, bfloat16 up to
# DEPTHWISE_7X7_BF16_MAX_PIXELS.
# NOTE: [Stem convolutions] A network's first convolution reads 1-4 input channels (RGB), and oneDNN's
# channels_last convolution, vectorised over input channels, runs it far below this CPU's multiply rate. On the AMD
# EPYC (AVX2, 2 threads, interleaved medians of 11 x 5 calls, the activation included, `conv2d_act` channels_last
# as planned before against ops.implicit_gemm_conv2d_inference, ad hoc), the implicit GEMM took: MobileNetV2's
# 3 -> 32 3x3 stride 2 0.80x the time at b1 224x224 (0.48 -> 0.38 ms) and 0.73x at b8 64x64; ResNet's 3 -> 64 7x7
# stride 2 0.76x and 0.78x (2.44 -> 1.86 ms at b1; F.conv2d on NCHW took 1.93); MobileNetV3's 3 -> 16 + Hardswish
# 0.64x, EfficientNet's 3 -> 32 + SiLU 0.76x, ConvNeXt's 4x4 stride-4 patchify 0.66x (T, b1) and 0.48x (atto, b8
# 64x64), a 1 -> 32 3x3 on 28x28 maps at b8 0.60x, a 3 -> 64 3x3 stride 1 on 128x128 0.90x and a ViT's 16x16
# patches 0.82x. Its values are the oneDNN convolution's to float32 rounding (the same sums, k in another order).
# Hence float32 convolutions with at most IMPLICIT_GEMM_MAX_CHANNELS input channels and filters larger than 1x1 (no
# groups, no dilation, no residual; 1x1 ones, e.g. a squeeze-excitation's, were not measured) run on it in
# channels_last plans where the GEMM kernel runs (AVX2 CPUs; not measured with AVX-512).
#: Run float32 convolutions with few input channels as an implicit GEMM (AVX2 CPUs) ...
IMPLICIT_GEMM_KERNEL = _common._AVX2_ONLY
#: ... when they have at most this many input channels.
IMPLICIT_GEMM_MAX_CHANNELS = 4

#: Run 3x3, 5x5 and 7x7 depthwise convolutions on torchgraph's kernel (benchmarks switch it off to compare).
DEPTHWISE_KERNEL = True
#: ... in bfloat16 up to this many output pixels (3x3 filters only).
DEPTHWISE_BF16_MAX_PIXELS = 1024
#: 7x7 filters in float32: channels a multiple of 16, or at most this many output pixels.
DEPTHWISE_7X7_MAX_PIXELS = 1024
#: 7x7 filters in bfloat16: at most this many output pixels.
DEPTHWISE_7X7_BF16_MAX_PIXELS = 128


def _limits() -> tuple:
    """What the GEMM and depthwise decisions read, part of each plan's key (tests and benchmarks move them)."""
    return (CONV_GEMM_MAX_ROWS, CONV_IM2COL_MAX_ROWS, CONV_IM2COL_MAX_WIDTH, ONEDNN_F32_CONV_GEMM_MAX_ROWS,
            ONEDNN_F32_IM2COL_MAX_WIDTH, _MKL_CONV_GEMMS, GEMM_KERNEL, GEMM_KERNEL_MIN_DEPTH, DEPTHWISE_KERNEL,
            DEPTHWISE_BF16_MAX_PIXELS, DEPTHWISE_7X7_MAX_PIXELS, DEPTHWISE_7X7_BF16_MAX_PIXELS,
            _common.ACTIVATIONS_AFTER_ONEDNN, WINOGRAD_KERNEL, WINOGRAD_MIN_TILES, WINOGRAD_MIN_CHANNELS,
            IMPLICIT_GEMM_KERNEL, IMPLICIT_GEMM_MAX_CHANNELS)


def _runs_winograd_kernel(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups, act: str,
                          channels_last: bool) -> bool:
    """Whether a planned convolution runs on ops.winograd_conv2d_inference ([Winograd convolutions])."""
    if not (WINOGRAD_KERNEL and channels_last and _extension.HAS_C_OPS and x.dtype == torch.float32
            and act in WINOGRAD_ACTIVATIONS and groups == 1 and tuple(weight.shape[2:]) == (3, 3)
            and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)):
        return False
    n, out_channels, height, width = _output_shape(x, weight, stride, padding, dilation)
    tiles = n * ((height + 1) // 2) * ((width + 1) // 2)
    return tiles >= WINOGRAD_MIN_TILES and min(x.shape[1], out_channels) >= WINOGRAD_MIN_CHANNELS


def _runs_implicit_gemm_kernel(x: torch.Tensor, weight: torch.Tensor, dilation, groups, act: str,
                               channels_last: bool) -> bool:
    """Whether a planned convolution runs on ops.implicit_gemm_conv2d_inference ([Stem convolutions])."""
    return (IMPLICIT_GEMM_KERNEL and channels_last and _extension.HAS_C_OPS and x.dtype == torch.float32
            and groups == 1 and tuple(dilation) == (1, 1) and x.shape[1] <= IMPLICIT_GEMM_MAX_CHANNELS
            and weight.shape[-2] * weight.shape[-1] > 1 and act in GEMM_ACTIVATIONS)


def _runs_depthwise_kernel(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups, act: str,
                           channels_last: bool) -> bool:
    """Whether a planned convolution runs on ops.depthwise_conv2d_inference ([Depthwise convolutions])."""
    if not (DEPTHWISE_KERNEL and channels_last and _extension.HAS_C_OPS and act in DEPTHWISE_ACTIVATIONS):
        return False
    size = weight.shape[-1]
    if groups != x.shape[1] or tuple(weight.shape) != (groups, 1, size, size) or size not in (3, 5, 7) \
            or tuple(dilation) != (1, 1):
        return False
    if x.dtype == torch.float32 and size < 7:
        return True
    n, _, height, width = _output_shape(x, weight, stride, padding, dilation)
    pixels = n * height * width
    if x.dtype == torch.float32:
        return groups % 16 == 0 or pixels <= DEPTHWISE_7X7_MAX_PIXELS
    if x.dtype != torch.bfloat16:
        return False
    return pixels <= (DEPTHWISE_BF16_MAX_PIXELS if size == 3 else DEPTHWISE_7X7_BF16_MAX_PIXELS if size == 7 else 0)


def _output_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple:
    """The convolution's output shape ``(N, C_out, H_out, W_out)`` for a 4-D input."""
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in (0, 1)]
    return (x.shape[0], weight.shape[0], *size)


def _conv_gemm_rows(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups) -> int:
    """Output pixels of the convolution when it should run as a GEMM ([Convolutions on few
    pixels]), else 0. Called on the oneDNN path only (eager float32/bfloat16 CPU, no gradient)."""
    # NOTE: this runs before every fused convolution, so it rejects grouped and dilated ones first
    # and does its arithmetic inline: 3.1 -> ~1 us a call, measured with timeit.
    if groups != 1 or dilation[0] != 1 or dilation[1] != 1:
        return 0
    _, _, kh, kw = weight.shape
    n, _, h, w = x.shape
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (w + 2 * padding[1] - kw) // stride[1] + 1
    rows = n * ho * wo
    float32_on_onednn = x.dtype == torch.float32 and not _MKL_CONV_GEMMS  # [Float32 convolution GEMMs on oneDNN]
    if kh == 1 and kw == 1 and not padding[0] and not padding[1]:
        limit = ONEDNN_F32_CONV_GEMM_MAX_ROWS if float32_on_onednn else CONV_GEMM_MAX_ROWS
    else:
        width = ONEDNN_F32_IM2COL_MAX_WIDTH if float32_on_onednn else CONV_IM2COL_MAX_WIDTH
        limit = CONV_IM2COL_MAX_ROWS if wo <= width else 0
    if rows <= 0 or rows > limit or ho <= 0:
        return 0
    return rows if x.dtype in _ONEDNN_DTYPES else 0  # float32 on MKL or oneDNN, bfloat16 on oneDNN


def _conv_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
               rows: int, act: str = "none") -> torch.Tensor | None:
    """The convolution as one GEMM on NHWC rows (float32 on an Intel CPU: MKL with prepacked filters;
    otherwise oneDNN's matmul, filters reordered for it); answers in channels_last. None when the filters
    are not cached in that form (see :func:`_mkl_packed_weight`, :func:`_cached_beside`)."""
    packed = _gemm_filters(x, weight, rows)
    return None if packed is None else _run_gemm(x, packed, weight.shape[-2:], bias, stride, padding, rows, act)


def _gemm_filters(x: torch.Tensor, weight: torch.Tensor, rows: int):
    """The filters in the form :func:`_run_gemm` reads, or None where they cannot be cached."""
    if _MKL_CONV_GEMMS and x.dtype == torch.float32:
        return _mkl_packed_weight(weight, rows, _filters_as_rows)
    if (GEMM_KERNEL and x.dtype == torch.float32 and _extension.HAS_C_OPS  # NOTE: [GEMM kernel]
            and weight[0].numel() >= GEMM_KERNEL_MIN_DEPTH):
        return _gemm_panels_weight(weight)
    return None if weight.is_inference() else _onednn_linear_weight(weight, _filters_as_rows)


# NOTE: [Per-layer plans] Which kernel a fused convolution runs (the MKL GEMM, oneDNN's fused op)
# and the weights it reads depend on the input's shape, dtype and device, the layer's arguments,
# the limits above and the weight (object and version); in a model's steady state they are the
# same on every call. Deciding them per call (use_onednn, the GEMM rule, two weight-cache
# lookups) cost ~4 us of Python around a ~45 us depthwise kernel (timeit, 1 thread), on each of
# MobileNetV2's 52 convolutions. So the first oneDNN-path call of a layer stores its decision in
# a _ConvPlan keyed by the weight, and later calls only check that it still holds (the same
# weight object and version, bias object, input type, shape, dtype and device, arguments and
# limits; no gradient needed; not traced) before running the kernel. Anything else plans again
# (a layer shared at two input shapes replans on each switch: the old per-call cost); a weight
# that is garbage-collected drops its plan; inference-mode weights (no version counter) are never planned.
class _ConvPlan:
    """One layer's decision: the GEMM (``rows`` > 0) or oneDNN's convolution, and the weight it reads."""

    __slots__ = ("weight", "version", "bias", "shape", "dtype", "key", "rows", "packed", "kernel_size",
                 "out_shape", "stride", "padding", "onednn_args", "act", "act_after", "channels_last", "depthwise",
                 "winograd", "implicit", "__weakref__")

    def holds(self, x: torch.Tensor, weight: torch.Tensor, bias, key: tuple) -> bool:
        # NOTE: ordered and written for speed (~1 us in all). `.to()`/`.double()` change a
        # parameter's dtype and device in place, keeping its object and version: hence the
        # weight's own checks (a bias of another dtype or device makes the kernel raise).
        dtype = self.dtype
        return (self.weight() is weight and weight._version == self.version and bias is self.bias
                and x.dtype is dtype and x.shape == self.shape and key == self.key and x.is_cpu
                and weight.dtype is dtype and weight.is_cpu and (bias is None or bias.dtype is dtype)
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                      or (bias is not None and bias.requires_grad)))
                and not torch.compiler.is_compiling() and not torch._C._is_tracing())

    def takes_residual(self, residual: torch.Tensor) -> bool:
        return (residual.shape == self.out_shape and residual.dtype is self.dtype and residual.is_cpu
                and not (torch.is_grad_enabled() and residual.requires_grad))

    def run(self, x: torch.Tensor, bias) -> torch.Tensor:
        """:func:`conv2d_act`'s oneDNN path (or the depthwise kernel: [Depthwise convolutions])."""
        if self.depthwise is not None:  # planned channels_last only
            return torch.ops.torchgraph.depthwise_conv2d_inference.default(x, self.depthwise, bias, self.stride,
                                                                           self.padding, self.act)
        if self.winograd is not None:  # planned channels_last only
            return torch.ops.torchgraph.winograd_conv2d_inference.default(x, self.winograd, bias, self.out_shape[1],
                                                                          self.padding, self.act)
        if self.implicit is not None:  # planned channels_last only
            return torch.ops.torchgraph.implicit_gemm_conv2d_inference.default(
                x, self.implicit, bias, self.out_shape[1], self.kernel_size, self.stride, self.padding, self.act)
        if self.rows:
            y = _run_gemm(x, self.packed, self.kernel_size, bias, self.stride, self.padding, self.rows, self.act)
        else:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)  # a no-op inside a conv stack
            y = _activation_(torch.ops.mkldnn._convolution_pointwise(x, self.packed, bias, *self.onednn_args),
                             self.act_after)
        # oneDNN answers in channels_last; F.conv2d (the next layer, outside a channels_last stack)
        # is slow on that layout.
        return y if self.channels_last else y.contiguous()

    def run_add(self, x: torch.Tensor, residual: torch.Tensor, bias) -> torch.Tensor:
        """:func:`conv2d_add_act`'s oneDNN path (planned only channels_last or as a GEMM)."""
        if self.winograd is not None:  # planned channels_last only
            return torch.ops.torchgraph.winograd_conv2d_inference.default(x, self.winograd, bias, self.out_shape[1],
                                                                          self.padding, self.act, residual)
        if self.rows:
            y = _run_gemm(x, self.packed, self.kernel_size, bias, self.stride, self.padding, self.rows, self.act,
                          residual)
            return y if self.channels_last else y.contiguous()
        padding, stride, dilation, groups = self.onednn_args[:4]
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x.contiguous(memory_format=torch.channels_last), residual.contiguous(memory_format=torch.channels_last),
            self.packed, bias, padding, stride, dilation, groups, "add", 1.0,
            "relu" if self.act == "relu" else None, [], "")  # the binary op refuses "none"


_PLANS: dict[int, _ConvPlan] = {}
_ADD_PLANS: dict[int, _ConvPlan] = {}


def _planned_route(weight: torch.Tensor) -> str:
    """The kernel a convolution with this weight was last planned on (NOTE: [Per-layer plans]), for
    ``tg.profile``: ``"GEMM kernel, <rows> rows"`` (ops.gemm_act_inference), ``"GEMM, <rows> rows"`` (oneDNN's
    or MKL's), ``"depthwise kernel"``, ``"Winograd kernel"``, ``"implicit GEMM kernel"`` or ``"oneDNN convolution"``; ``""``
    where no plan holds it (the plain path, a traced program, a changed weight)."""
    plan = _PLANS.get(id(weight)) or _ADD_PLANS.get(id(weight))
    if plan is None or plan.weight() is not weight or plan.version != weight._version:
        return ""
    if plan.depthwise is not None:
        return "depthwise kernel"
    if plan.winograd is not None:
        return "Winograd kernel"
    if plan.implicit is not None:
        return "implicit GEMM kernel"
    if plan.rows:  # NOTE: [GEMM kernel]
        return f"GEMM kernel, {plan.rows} rows" if isinstance(plan.packed, GemmPanels) else f"GEMM, {plan.rows} rows"
    return "oneDNN convolution"


def _new_plan(plans: dict, x: torch.Tensor, weight: torch.Tensor, bias, key: tuple,
              residual: bool) -> _ConvPlan | None:
    """Plan a layer that the caller found on the oneDNN path (``use_onednn``, a 4-D input);
    None where the plain path applies or nothing can be cached."""
    if weight.is_inference():
        return None
    stride, padding, dilation, groups, act, channels_last = key[:6]
    depthwise = not residual and _runs_depthwise_kernel(x, weight, stride, padding, dilation, groups, act,
                                                        channels_last)
    winograd = not depthwise and _runs_winograd_kernel(x, weight, stride, padding, dilation, groups, act,
                                                       channels_last)
    implicit = not (depthwise or winograd or residual) and _runs_implicit_gemm_kernel(x, weight, dilation, groups,
                                                                                      act, channels_last)
    special = depthwise or winograd or implicit
    rows = 0 if special else _conv_gemm_rows(x, weight, stride, padding, dilation, groups)
    packed = _gemm_filters(x, weight, rows) if rows else None
    if packed is None and not special:
        rows = 0
        if residual and not channels_last:
            return None
        if not (channels_last or (groups == 1 and weight.shape[1] >= 16 and weight.shape[-1] > 1)):
            return None
        shape = x.shape  # channels_last does not change the shape oneDNN packs for
        packed = _packed_weight(weight, padding, stride, dilation, groups, shape)
    plan = _ConvPlan()
    plan.weight, plan.version, plan.bias = weakref.ref(weight), weight._version, bias
    plan.shape, plan.dtype, plan.key = x.shape, x.dtype, key
    plan.rows, plan.packed, plan.kernel_size = rows, packed, tuple(weight.shape[-2:])
    plan.depthwise = taps_last(weight.detach()) if depthwise else None
    plan.winograd = winograd_filters(weight) if winograd else None
    plan.implicit = implicit_gemm_filters(weight) if implicit else None
    plan.stride, plan.padding, plan.act, plan.channels_last = stride, padding, act, channels_last
    post_op, plan.act_after = onednn_epilogue(act)  # NOTE: [Activations after oneDNN on AVX2]
    plan.onednn_args = (padding, stride, dilation, groups, *post_op)
    plan.out_shape = torch.Size(_output_shape(x, weight, stride, padding, dilation))
    ident = id(weight)
    if ident not in plans:
        weakref.finalize(weight, plans.pop, ident, None)
    plans[ident] = plan
    return plan


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list,
               padding: list, dilation: list, groups: int, act: str = "none",
               channels_last: bool = False) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, ...))`` in one fused call where possible.

    On the oneDNN path (float32 CPU tensors, no gradient, eager), ``channels_last=True`` (what
    ``tg.optimize`` sets for inference) runs oneDNN's fused op on a channels_last input with
    prepacked weights and returns a channels_last tensor (NOTE: [Packed channels_last convs]).
    Without it, 3x3-and-larger convolutions with >= 16 input channels still use prepacked weights
    and return a contiguous tensor; others run ``F.conv2d``. On that path, convolutions with few
    output pixels run as one GEMM instead (NOTE: [Convolutions on few pixels]).

    Args:
        x: input ``(N, C, H, W)``.
        weight, bias: the convolution's parameters (bias may be None).
        stride, padding, dilation: pairs of ints; groups: an int.
        act: a key of ``ONEDNN_ACTIVATIONS``.
        channels_last: answer in channels_last on the oneDNN path (grouped and depthwise too).

    Returns:
        The activated convolution output.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x, w, b = torch.randn(2, 8, 5, 5), torch.randn(4, 8, 3, 3), torch.randn(4)
        >>> with torch.no_grad():
        ...     y = conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", channels_last=True)
        >>> torch.allclose(y, F.relu(F.conv2d(x, w, b, padding=1)), atol=1e-4)
        True
    """
    if isinstance(x, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        args = (x, weight, bias, stride, padding, dilation, groups, act)
        kwargs = {"channels_last": True} if channels_last else {}
        return x.tracer.create_proxy("call_function", conv2d_act, args, kwargs)
    key = (stride, padding, dilation, groups, act, channels_last, *_limits())
    plan = _PLANS.get(id(weight))
    if plan is not None and type(x) is torch.Tensor and plan.holds(x, weight, bias, key):  # noqa: E721
        return plan.run(x, bias)
    onednn = use_onednn(x, weight, bias)
    if onednn and x.dim() == 4:
        plan = _new_plan(_PLANS, x, weight, bias, key, residual=False)
        if plan is not None:
            return plan.run(x, bias)
        rows = _conv_gemm_rows(x, weight, stride, padding, dilation, groups)
        y = _conv_gemm(x, weight, bias, stride, padding, rows, act) if rows else None
        if y is not None:
            return y if channels_last else y.contiguous()
    if onednn and x.dim() == 4 and (
            channels_last or (groups == 1 and weight.shape[1] >= 16 and weight.shape[-1] > 1)):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # a no-op inside a conv stack
        packed = _packed_weight(weight, padding, stride, dilation, groups, x.shape)
        (attr, scalars, algorithm), after = onednn_epilogue(act)  # NOTE: [Activations after oneDNN on AVX2]
        y = _activation_(torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups,
                                                                 attr, scalars, algorithm), after)
        # It answers in channels_last; F.conv2d (the next layer, outside a channels_last stack) is
        # slow on that layout.
        return y if channels_last else y.contiguous()
    if bias is None or act not in ops.ACTIVATIONS or act == "none" or onednn:
        # NOTE: measured here, F.conv2d with its bias then an in-place activation beats both oneDNN's
        # fused op and conv + bias_act for contiguous tensors (the bias add is free inside oneDNN).
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return _activation_(y, act) if onednn else _activation(y, act)
    return _epilogue(F.conv2d(x, weight, None, stride, padding, dilation, groups), bias, act, 1)


# conv2d_add_act lives in conv_add.py (this module grew past ~500 lines); re-exported here, where models
# optimized before the split name it.
from .conv_add import RESIDUAL_ACTIVATIONS, conv2d_add_act  # noqa: E402
