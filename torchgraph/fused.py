"""Run-time call targets of optimized graphs: linear/convolution + bias + activation, and attention.

``tg.optimize`` replaces ``nn.Linear``/``nn.Conv2d`` calls (and the activation after them) by calls
to :func:`linear_act` and :func:`conv2d_act`, and self-attention on a packed projection by
:func:`qkv_attention`. Each picks its implementation when it runs, from the tensors it receives, so
an optimized model keeps working after ``.to(device)``, ``.double()``, under autograd,
``torch.compile`` or an exporter:

* oneDNN's fused ops (``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise``): float32
  CPU tensors, eager mode. Without gradients they run the whole layer (GEMM + bias + activation;
  their GEMMs measured 12-19% faster than MKL's here); with gradients, linear layers run through
  ``_TrainableLinearAct`` (NOTE: [oneDNN GEMMs in training]). Convolutions keep their layout.
* otherwise standard ops: ``F.linear``/``F.conv2d`` without bias, then
  :func:`torchgraph.ops.bias_act` (one pass, with a backward), which itself falls back to plain
  PyTorch where no kernel exists. Traced programs (``torch.compile``, ``torch.export``, ONNX) only
  ever see this path, so exporters get standard ops (``bias_act`` is swapped for its reference).
* :func:`qkv_attention`: the ``ops.qkv_attention`` kernel for short sequences on eager CPU tensors,
  else the head split + ``F.scaled_dot_product_attention`` + merge it replaced.

Example:
    >>> import torch
    >>> from torchgraph.fused import linear_act
    >>> x, w, b = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
    >>> torch.allclose(linear_act(x, w, b, "relu"), torch.relu(x @ w.T + b), atol=1e-5)
    True
"""

from __future__ import annotations

import weakref

import torch
import torch.fx
import torch.nn.functional as F

from . import _extension, ops
from torch.autograd.function import once_differentiable

__all__ = ["CONV_GEMM_MAX_ROWS", "CONV_IM2COL_MAX_ROWS", "CONV_IM2COL_MAX_WIDTH", "MKL_PACKED_MAX_ROWS", "ONEDNN_ACTIVATIONS",
           "ONEDNN_LINEAR_MIN_MACS", "QKV_ATTENTION_MAX_SEQ", "RESIDUAL_ACTIVATIONS", "conv2d_act", "conv2d_add_act",
           "linear_act", "qkv_attention", "use_onednn"]

#: Our activation names -> oneDNN's (attr, scalars, algorithm). The first five are also
#: ``torchgraph.ops.ACTIVATIONS`` (the ``bias_act`` kernel's); the others (MobileNets') fuse on the
#: oneDNN path only and run as plain PyTorch functions elsewhere.
ONEDNN_ACTIVATIONS = {
    "none": ("none", [], ""),
    "relu": ("relu", [], ""),
    "gelu": ("gelu", [], "none"),
    "gelu_tanh": ("gelu", [], "tanh"),
    "silu": ("swish", [], ""),
    "relu6": ("hardtanh", [0.0, 6.0], ""),
    "hardswish": ("hardswish", [], ""),
    "hardsigmoid": ("hardsigmoid", [], ""),
    "sigmoid": ("sigmoid", [], ""),
    "tanh": ("tanh", [], ""),
}

_ACTIVATION_FNS = {
    "none": lambda y: y,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}

_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# bfloat16 runs on oneDNN only where the CPU has bf16 instructions (AVX512-BF16 / AMX); elsewhere
# oneDNN emulates it slowly (tg.optimize(dtype=torch.bfloat16) then falls back to float32).
_ONEDNN_DTYPES = frozenset({torch.float32} | ({torch.bfloat16} if _HAS_ONEDNN and
                                                 torch.ops.mkldnn._is_mkldnn_bf16_supported() else set()))


def use_onednn(x, *params, training: bool = False) -> bool:
    """Whether the oneDNN fused path applies to input ``x`` and the layer's ``params``.

    The oneDNN ops have no backward: with ``training=False`` the answer is False when a gradient
    is needed; with ``training=True`` it ignores gradients (the caller supplies the backward).
    """
    # NOTE: this runs before every fused linear and convolution, so it is written for speed
    # (`is_cpu`, a plain loop): 5.5 -> ~2 us a call, which tiny layers (32 x 32 linears) feel.
    if not _HAS_ONEDNN or type(x) is not torch.Tensor:  # noqa: E721 - fakes, proxies, subclasses
        return False
    dtype = x.dtype
    if not x.is_cpu or dtype not in _ONEDNN_DTYPES:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if not training and _needs_grad(x, *params):
        return False
    for p in params:
        if p is not None and (not p.is_cpu or p.dtype != dtype):
            return False
    return True


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _activation(y: torch.Tensor, act: str) -> torch.Tensor:
    return _ACTIVATION_FNS[act](y)


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
    if weight.is_inference():
        # made under torch.inference_mode: no version counter tells when it changes, so no cache
        return _pack_conv_weight(weight, padding, stride, dilation, groups, input_size)
    key = id(weight)
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    packed = _pack_conv_weight(weight, padding, stride, dilation, groups, input_size)
    ref = weakref.ref(weight, lambda _, key=key: _PACKED.pop(key, None))
    _PACKED[key] = (ref, weight._version, packed)
    return packed


_IN_PLACE_FNS = {
    "none": lambda y: y,
    "relu": torch.relu_,
    "gelu": torch.ops.aten.gelu_,
    "gelu_tanh": lambda y: torch.ops.aten.gelu_(y, approximate="tanh"),
    "silu": lambda y: F.silu(y, inplace=True),
    "relu6": lambda y: F.relu6(y, inplace=True),
    "hardswish": lambda y: F.hardswish(y, inplace=True),
    "hardsigmoid": lambda y: F.hardsigmoid(y, inplace=True),
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
}


def _activation_(y: torch.Tensor, act: str) -> torch.Tensor:
    """In place, for outputs nobody else holds (inference path only): no second buffer."""
    return _IN_PLACE_FNS[act](y)


def _epilogue(y: torch.Tensor, bias: torch.Tensor | None, act: str, dim: int) -> torch.Tensor:
    if bias is None:
        return _activation(y, act)
    return ops.bias_act(y, bias, act, dim)


# NOTE: [Small linears] oneDNN's fused linear pays a fixed ~30-40 us a call here (1 thread,
# benchmarks/bench_gemm.py --small): 0.2-0.4x of F.linear + ReLU for (8..64 rows) x (16..256)
# features, a tie around 4M multiply-adds, 1.1-1.6x from ~8M (1024 features) up, and 12-19% faster
# on the GPT block's GEMMs (200M). Below ONEDNN_LINEAR_MIN_MACS multiply-adds per call (rows x in x
# out), inference runs F.linear and an in-place activation instead, and training F.linear and the
# activation with eager autograd (no custom-op or autograd.Function overhead): the decision is made
# per call from the shapes, so it follows the batch the model runs at, and tests can move it.
#: Smallest linear (rows x in_features x out_features) that runs on oneDNN in inference.
ONEDNN_LINEAR_MIN_MACS = 1 << 23

# NOTE: [Few rows] With few rows (a classifier head at batch 1-32, a decoder step), a linear layer
# is bound by reading its weight, and MKL's prepacked GEMM (the one inductor uses for float32
# linears) reads it fastest: (8 x 1280) @ (1280 x 1000) took 0.37-1.4 ms against 2.2-2.5 ms for
# F.linear and oneDNN (1 thread, two runs on the loaded 2-core VM).
#
# NOTE: [MKL GEMMs in inference] Measured on a quiet machine (2 threads, interleaved medians,
# `python benchmarks/bench_gemm.py --inference`), MKL's prepacked GEMM was also the fastest float32
# forward in isolation on the GPT block's and the encoder's shapes (1024 rows): 5-19% faster than
# oneDNN's fused linear (fc1's GELU applied after it) and 2-18% faster than F.linear. Inside the
# model it was not: the GPT stack ran 0.96-1.19x eager with every large linear on MKL, 1.12-1.27x
# with the GELU linears left on oneDNN and 1.19-1.24x with all on oneDNN (three interleaved runs),
# so linears from 8M multiply-adds up stay on oneDNN's fused op.
#
# The packing depends on the row count, so the packed copy is cached per (weight, rows), beside the
# parameter like the conv weights (NOTE: [Packed conv weights]), for at most MKL_PACKED_ROW_COUNTS
# row counts per weight: a decoding loop whose row count grows every step would otherwise keep a
# copy of every weight per step. Other row counts run F.linear / oneDNN (the same values up to
# float32 rounding). Weights made under torch.inference_mode have no version counter, so they are
# never packed (packing per call cost more than it saved: 547 vs 307 us for the head above).
#: Float32 inference linears with fewer rows than this run MKL's prepacked GEMM ...
MKL_PACKED_MAX_ROWS = 64
#: ... when their weight has at least this many elements: on smaller ones F.linear was faster
#: (8 rows, 2 threads: 32 -> 10 features 3.9 vs 5.5 us, 128 -> 128 8.3 vs 9.1 us, a tie at 256 -> 256,
#: then packed ahead: 512 -> 512 34 vs 25 us).
MKL_PACKED_MIN_WEIGHT = 1 << 16
#: Most row counts a weight is packed for by MKL (each packed copy is the weight's size).
MKL_PACKED_ROW_COUNTS = 4
_HAS_MKL_PACKED = hasattr(torch.ops.mkl, "_mkl_linear") and torch.backends.mkl.is_available()
_MKL_PACKED: dict[int, tuple] = {}


def _mkl_packed_weight(weight: torch.Tensor, rows: int, as_matrix=None) -> tuple | None:
    """``weight`` (or ``as_matrix(weight)``, an ``(out, in)`` matrix) packed by MKL for ``rows`` rows,
    and the matrix itself: ``(packed, matrix)``; None where MKL's packed GEMM should not run (no
    MKL, an inference-mode weight, MKL_PACKED_ROW_COUNTS other row counts already packed)."""
    if not _HAS_MKL_PACKED or weight.is_inference():
        return None
    key = id(weight)
    hit = _MKL_PACKED.get(key)
    if hit is None or hit[0]() is not weight or hit[1] != weight._version:
        ref = weakref.ref(weight, lambda _, key=key: _MKL_PACKED.pop(key, None))
        hit = _MKL_PACKED[key] = (ref, weight._version, {})
    by_rows = hit[2]
    found = by_rows.get(rows)
    if found is None:
        if len(by_rows) >= MKL_PACKED_ROW_COUNTS:
            return None
        with torch.no_grad():
            matrix = weight.detach() if as_matrix is None else as_matrix(weight.detach()).contiguous()
            found = by_rows[rows] = (torch.ops.mkl._mkl_reorder_linear_weight(matrix, rows), matrix)
    return found


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               act: str = "none") -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` in one fused call where possible.

    Args:
        x: input of shape ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        act: a key of ``ONEDNN_ACTIVATIONS``.

    Returns:
        A tensor of shape ``(..., out_features)``.
    """
    if isinstance(x, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        return x.tracer.create_proxy("call_function", linear_act, (x, weight, bias, act), {})
    small = False
    if x.dim() >= 2 and use_onednn(x, weight, bias, training=True):
        small = x.numel() * weight.shape[0] < ONEDNN_LINEAR_MIN_MACS  # NOTE: [Small linears]
        if not _needs_grad(x, weight, bias):
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            few_rows = (x.dtype == torch.float32 and 0 < rows < MKL_PACKED_MAX_ROWS  # NOTE: [Few rows]
                        and weight.numel() >= MKL_PACKED_MIN_WEIGHT)
            packed = _mkl_packed_weight(weight, rows) if few_rows else None
            if packed is not None:
                y = torch.ops.mkl._mkl_linear(x.reshape(rows, -1), packed[0], weight, bias, rows)
                return _activation_(y.view(*x.shape[:-1], weight.shape[0]), act)
            if small:
                return _activation_(F.linear(x, weight, bias), act)
            attr, scalars, algorithm = ONEDNN_ACTIVATIONS[act]
            return torch.ops.mkldnn._linear_pointwise(x, _onednn_linear_weight(weight), bias, attr, scalars,
                                                      algorithm)
        if not small and bias is not None and x.dtype == torch.float32 and (
                act == "none" or (_extension.HAS_C_OPS and act in ops.ACTIVATIONS)):
            return _TrainableLinearAct.apply(x, weight, bias, act)
    if small or bias is None or act == "none" or act not in ops.ACTIVATIONS:
        # small layers in training: eager autograd's own formulas beat a custom op's Python overhead
        return _activation(F.linear(x, weight, bias), act)
    return _epilogue(F.linear(x, weight), bias, act, -1)


# NOTE: [oneDNN GEMMs in training] Measured by benchmarks/bench_gemm.py (2 threads, 1024 rows, the
# GPT block's four shapes, interleaved medians, two runs): oneDNN's matmul ran the forward product
# x @ W^T 12-19% and the input gradient g @ W 14-25% faster than MKL's addmm/mm, and the weight
# gradient g^T @ x slower (MKL/oneDNN 0.78-0.84x). So the trainable path runs the first two on
# oneDNN, the third on MKL, and the bias + activation (forward and backward) with the fused
# bias_act kernels.
class _TrainableLinearAct(torch.autograd.Function):
    """``act(x @ weight.T + bias)`` with a float32 CPU input, for training (bias required)."""

    @staticmethod
    def forward(ctx, x, weight, bias, act):
        linear = torch.ops.mkldnn._linear_pointwise
        if act == "none":
            pre, y = None, linear(x, weight, bias, "none", [], "")
        else:
            pre = linear(x, weight, None, "none", [], "")
            y = torch.ops.torchgraph.bias_act.default(pre, bias, act, -1)
        ctx.save_for_backward(x, weight, bias, pre)
        ctx.act = act
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, bias, pre = ctx.saved_tensors
        grad_bias = None
        if ctx.act != "none":
            grad, grad_bias = torch.ops.torchgraph.bias_act_backward.default(grad, pre, bias, ctx.act, -1)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.mkldnn._linear_pointwise(grad_2d, weight.t(), None, "none", [], "")
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[2] and grad_bias is None:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias if ctx.needs_input_grad[2] else None, None


# NOTE: [Convolutions on few pixels] A convolution whose output has few pixels (ResNet-50's last
# stage: 2x2 maps at batch 8 and 64x64 input, 7x7 at batch 1 and 224x224) reads its whole weight for
# a few dozen output rows, and oneDNN's direct convolution is slow there, most of all on maps a few
# pixels wide (its kernels block over the output width). Measured here for every ResNet-50
# convolution (1 and 2 threads, interleaved medians, `python benchmarks/bench_conv_layouts.py --gemm`),
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
#: 1x1 convolutions with at most this many output pixels (N x H_out x W_out) run as an MKL GEMM.
CONV_GEMM_MAX_ROWS = 128
#: Larger kernels run as im2col + MKL GEMM when their output is at most this wide ...
CONV_IM2COL_MAX_WIDTH = 4
#: ... and has at most this many output pixels.
CONV_IM2COL_MAX_ROWS = 128


def _conv_gemm_rows(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups) -> int:
    """Output pixels of the convolution when it should run as a GEMM ([Convolutions on few
    pixels]), else 0. Called on the oneDNN path only (eager float32/bfloat16 CPU, no gradient)."""
    gemm = _HAS_MKL_PACKED if x.dtype == torch.float32 else x.dtype in _ONEDNN_DTYPES
    if not gemm or groups != 1 or any(d != 1 for d in dilation):
        return 0
    kh, kw = weight.shape[-2:]
    ho = (x.shape[2] + 2 * padding[0] - kh) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - kw) // stride[1] + 1
    rows = x.shape[0] * ho * wo
    if rows <= 0:
        return 0
    if kh == kw == 1 and not any(padding):
        return rows if rows <= CONV_GEMM_MAX_ROWS else 0
    return rows if rows <= CONV_IM2COL_MAX_ROWS and wo <= CONV_IM2COL_MAX_WIDTH else 0


def _filters_as_rows(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in, kh, kw)`` -> ``(out, kh * kw * in)``, the order of :func:`_conv_gemm`'s columns."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _conv_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
               rows: int) -> torch.Tensor | None:
    """The convolution as one GEMM on NHWC rows (float32: MKL with prepacked filters; bfloat16:
    oneDNN's matmul, filters reordered for it); answers in channels_last. None when the filters
    are not cached in that form (see :func:`_mkl_packed_weight`, :func:`_cached_beside`)."""
    if x.dtype == torch.float32:
        packed = _mkl_packed_weight(weight, rows, _filters_as_rows)
    else:
        packed = None if weight.is_inference() else (_onednn_linear_weight(weight, _filters_as_rows),)
    if packed is None:
        return None
    n, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
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
    if len(packed) == 2:
        y = torch.ops.mkl._mkl_linear(cols.reshape(rows, -1), *packed, bias, rows)
    else:
        y = torch.ops.mkldnn._linear_pointwise(cols.reshape(rows, -1), packed[0], bias, "none", [], "")
    return y.view(n, ho, wo, -1).permute(0, 3, 1, 2)


# NOTE: [Packed linear weights] oneDNN's matmul also runs faster from weights reordered once into
# its blocked layout (torch.ops.mkldnn._reorder_linear_weight; for bfloat16 the AMX tile layout):
# measured here (2 threads, interleaved medians) 10-20% faster in float32 (2.87 -> 2.51 ms for the
# GPT block's 1024 x 256 -> 1024) and 12-30% in bfloat16 than from the plain weight, with identical
# values. The copy is cached beside the parameter like the conv weights.
_ONEDNN_LINEAR: dict[int, tuple] = {}
_HAS_LINEAR_REORDER = _HAS_ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _cached_beside(cache: dict, weight: torch.Tensor, make) -> torch.Tensor | None:
    """``make(weight)``, cached per weight and rebuilt when it changes (its version counter); None
    for a weight made under inference mode (no version counter)."""
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


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list,
               padding: list, dilation: list, groups: int, act: str = "none",
               channels_last: bool = False) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, ...))`` in one fused call where possible.

    On the oneDNN path (float32 CPU tensors, no gradient, eager), ``channels_last=True`` (what
    ``tg.optimize`` sets for inference) runs oneDNN's fused op on a channels_last input with
    prepacked weights and returns a channels_last tensor (NOTE: [Packed channels_last convs]).
    Without it, 3x3-and-larger convolutions with >= 16 input channels still use prepacked weights
    and return a contiguous tensor; others run ``F.conv2d``. On that path, convolutions with few
    output pixels run as one MKL GEMM instead (NOTE: [Convolutions on few pixels]).

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
    onednn = use_onednn(x, weight, bias)
    if onednn and x.dim() == 4:
        rows = _conv_gemm_rows(x, weight, stride, padding, dilation, groups)
        y = _conv_gemm(x, weight, bias, stride, padding, rows) if rows else None
        if y is not None:
            y = _activation_(y, act)
            return y if channels_last else y.contiguous()
    if onednn and x.dim() == 4 and (
            channels_last or (groups == 1 and weight.shape[1] >= 16 and weight.shape[-1] > 1)):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # a no-op inside a conv stack
        packed = _packed_weight(weight, padding, stride, dilation, groups, x.shape)
        attr, scalars, algorithm = ONEDNN_ACTIVATIONS[act]
        y = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups,
                                                    attr, scalars, algorithm)
        # It answers in channels_last; F.conv2d (the next layer, outside a channels_last stack) is
        # slow on that layout.
        return y if channels_last else y.contiguous()
    if bias is None or act not in ops.ACTIVATIONS or act == "none" or onednn:
        # NOTE: measured here, F.conv2d with its bias then an in-place activation beats both oneDNN's
        # fused op and conv + bias_act for contiguous tensors (the bias add is free inside oneDNN).
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return _activation_(y, act) if onednn else _activation(y, act)
    return _epilogue(F.conv2d(x, weight, None, stride, padding, dilation, groups), bias, act, 1)


#: Activations :func:`conv2d_add_act` applies after the residual add.
RESIDUAL_ACTIVATIONS = ("none", "relu")


# NOTE: [Residual in the convolution] oneDNN adds the residual inside the convolution's epilogue
# (``_convolution_pointwise.binary``, "add" then the activation), so the sum never makes a second
# pass over memory: measured here for the last 1x1 convolution of ResNet-50's bottlenecks (batch 8,
# 64x64; 1 and 2 threads, interleaved medians) it took 0.71-0.96x the time of the convolution then
# ``ops.add_relu``, with identical values.
def conv2d_add_act(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: list, padding: list, dilation: list, groups: int, act: str = "none",
                   channels_last: bool = False) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, ...) + residual)`` in one fused call where possible.

    ``tg.optimize`` (inference) writes this for a ResNet block's ``relu(bn3(conv3(out)) + identity)``
    and MobileNetV2's ``x + conv(x)``. The paths are :func:`conv2d_act`'s: oneDNN's convolution with
    the add and activation in its epilogue (NOTE: [Residual in the convolution]), the MKL GEMM for
    few output pixels (then the add and activation in place), and standard ops everywhere else
    (gradients, other devices and dtypes, traced programs and exporters).

    Args:
        x: input ``(N, C, H, W)``.
        residual: a tensor of the convolution output's shape (no broadcasting).
        weight, bias, stride, padding, dilation, groups: the convolution's, as for :func:`conv2d_act`.
        act: ``"none"`` or ``"relu"`` (``RESIDUAL_ACTIVATIONS``), applied after the add.
        channels_last: answer in channels_last on the oneDNN path.

    Returns:
        ``act(conv + residual)``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x, w, r = torch.randn(2, 8, 5, 5), torch.randn(8, 8, 1, 1), torch.randn(2, 8, 5, 5)
        >>> with torch.no_grad():
        ...     y = conv2d_add_act(x, r, w, None, [1, 1], [0, 0], [1, 1], 1, "relu", channels_last=True)
        >>> torch.allclose(y, F.relu(F.conv2d(x, w) + r), atol=1e-5)
        True
    """
    if isinstance(x, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        args = (x, residual, weight, bias, stride, padding, dilation, groups, act)
        kwargs = {"channels_last": True} if channels_last else {}
        return x.tracer.create_proxy("call_function", conv2d_add_act, args, kwargs)
    if act not in RESIDUAL_ACTIVATIONS:
        raise ValueError(f"conv2d_add_act: act must be one of {RESIDUAL_ACTIVATIONS}; received {act!r}.")
    if (use_onednn(x, weight, bias, residual) and x.dim() == 4 and type(residual) is torch.Tensor  # noqa: E721
            and not _needs_grad(residual)):
        rows = _conv_gemm_rows(x, weight, stride, padding, dilation, groups)
        y = _conv_gemm(x, weight, bias, stride, padding, rows) if rows else None
        if y is not None and y.shape == residual.shape:
            y = _activation_(y.add_(residual), act)  # y is new: nobody else holds it
            return y if channels_last else y.contiguous()
        if y is None and channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            packed = _packed_weight(weight, padding, stride, dilation, groups, x.shape)
            unary = "relu" if act == "relu" else None  # the binary op refuses "none"
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual.contiguous(memory_format=torch.channels_last), packed, bias, padding, stride,
                dilation, groups, "add", 1.0, unary, [], "")
            return y
    y = conv2d_act(x, weight, bias, stride, padding, dilation, groups, "none", channels_last) + residual
    return _activation(y, act)


#: Longest sequence for which :func:`qkv_attention` runs torchgraph's kernel (it keeps the
#: ``B * heads * T * T`` attention weights for the backward; longer ones run SDPA's flash kernel).
QKV_ATTENTION_MAX_SEQ = 512


def _sdpa_qkv_attention(qkv, heads: int, causal: bool, scale) -> torch.Tensor:
    b, t, width = qkv.shape
    q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return out.transpose(1, 2).reshape(b, t, width // 3)


def qkv_attention(qkv: torch.Tensor, heads: int, causal: bool = False,
                  scale: float | None = None) -> torch.Tensor:
    """Multi-head attention from a packed ``q | k | v`` projection ``(B, T, 3E)`` -> ``(B, T, E)``.

    :func:`torchgraph.ops.qkv_attention` (heads read in place, no split/merge copies) for eager
    float32/float64 CPU tensors with ``T <= QKV_ATTENTION_MAX_SEQ``; measured by ``benchmarks/bench_kernels.py``
    (2 threads, B=8, T=128, E=256, 4 heads, causal) it was 1.25-1.75x faster forward and
    1.40-1.43x faster forward + backward than the split + ``F.scaled_dot_product_attention`` +
    merge it replaces. Everywhere else (CUDA, long sequences, traced programs, missing kernels) it
    runs exactly that split + SDPA + merge.

    Example:
        >>> import torch
        >>> qkv = torch.randn(2, 6, 3 * 8)
        >>> qkv_attention(qkv, heads=2, causal=True).shape
        torch.Size([2, 6, 8])
    """
    if isinstance(qkv, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        return qkv.tracer.create_proxy("call_function", qkv_attention, (qkv, heads, causal, scale), {})
    # NOTE: [bfloat16 attention] The kernel computes bfloat16 attention in float32 through sgemm
    # (converting its inputs); SDPA's flash kernel runs bf16 natively and took 1.8-4.9 ms per GPT
    # block call against 10-15 ms for the kernel (1 thread, loaded VM), so bf16 goes to SDPA.
    if (type(qkv) is torch.Tensor and qkv.device.type == "cpu" and qkv.dim() == 3  # noqa: E721
            and qkv.shape[1] <= QKV_ATTENTION_MAX_SEQ and not torch.compiler.is_compiling()
            and qkv.dtype != torch.bfloat16 and _kernel_beats_sdpa(qkv.shape, heads, causal)
            and ops._use_kernel(qkv)):
        return ops.qkv_attention(qkv, heads, causal, scale)
    return _sdpa_qkv_attention(qkv, heads, causal, scale)


# NOTE: [Kernel or SDPA] Measured here (2 threads, interleaved medians, float32) against split +
# SDPA (flash) + merge, torchgraph's attention kernel won with head dims >= 64 when causal or up to
# 128 positions (8 x 128 x 4 heads of 64: 0.96 vs 1.05 ms; causal 0.83 vs 1.13; heads of 128:
# 1.18-1.45 vs 1.95 ms) and on small problems, and lost with heads of 32 on larger ones (16 heads of
# 32, 8 x 128: 5.4 vs 3.6 ms; 8 heads: 1.9 vs 1.2 ms) and non-causal at 197 positions (ViT: 0.51
# vs 0.48 ms). 2**20 = batch x heads x T x T is where the small problems end.
def _kernel_beats_sdpa(shape, heads: int, causal: bool) -> bool:
    batch, seq, width = shape
    head_dim = width // (3 * heads) if heads else 0
    if head_dim >= 64:
        return causal or seq <= 128
    return batch * heads * seq * seq < 1 << 20
