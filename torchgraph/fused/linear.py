"""``act(linear(x))`` in one call: :func:`linear_act`, and its trainable oneDNN path."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _extension, ops
from ..ops.gemm_act_inference import GEMM_ACTIVATIONS
from ._common import _AVX2_ONLY, _activation, _activation_, _epilogue, _needs_grad, onednn_epilogue, use_onednn
from .cpu_profile import MKL_GEMMS_FAST
from .weights import _gemm_panels_weight, _mkl_packed_weight, _onednn_linear_weight

__all__ = ["KERNEL_MAX_OUTPUT", "KERNEL_MAX_ROWS", "KERNEL_MIN_FEATURES", "MKL_PACKED_MAX_ROWS",
           "MKL_PACKED_MIN_WEIGHT", "ONEDNN_LINEAR_MIN_MACS", "linear_act"]

# NOTE: [Small linears] oneDNN's fused linear pays a fixed ~45 us a call here (1 thread,
# `python benchmarks/bench_gemm.py --small --threads 1`): F.linear + an in-place ReLU took 0.26-0.45x
# its time for 8 and 64 rows by 16 and 64 features, 0.45-0.82x at 256 features (0.5-4M
# multiply-adds), and oneDNN won from 1024 features (0.91x at 8M and 67M); the GPT block's GEMMs
# (200M) are compared by `bench_gemm.py --inference` (NOTE: [Packed linear weights]). Below
# ONEDNN_LINEAR_MIN_MACS multiply-adds per call (rows x in x out), inference runs F.linear and an
# in-place activation instead, and training F.linear and the activation with eager autograd (no
# custom-op or autograd.Function overhead): the decision is made per call from the shapes, so it
# follows the batch the model runs at, and tests can move it. Where MKL is slow (NOTE: [MKL on other
# vendors' CPUs] in cpu_profile.py) oneDNN's cost per call was ~13 us and the cut is 2M (without MKL,
# F.linear runs another BLAS: unmeasured, the cut stays 8M). At 1M it was a tie alone (64 x 16 -> 1024:
# 21-22 vs 24-27 us; 128 x 128 -> 64: 18 vs 15 us) but 6% slower inside the community MLP (interleaved,
# two processes: 922-931 vs 862-878 us eager; 817-830 us with that linear on F.linear); from 2M it won
# (8 x 512 -> 512: 26 vs 49 us).
#: Smallest linear (rows x in_features x out_features) that runs on oneDNN in inference.
ONEDNN_LINEAR_MIN_MACS = 1 << 21 if torch.backends.mkl.is_available() and not MKL_GEMMS_FAST else 1 << 23

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
# so linears of 1024 rows stay on oneDNN's fused op.
#
# NOTE: [MKL for a few hundred rows] ViT-S at batch 1 runs its linears on 197 rows (the tokens of
# one image), where torch.compile with freezing calls MKL's prepacked GEMM. On those four shapes
# (384 -> 1152, 384 -> 384, 384 -> 1536 + GELU, 1536 -> 384), MKL's packed GEMM with its bias
# (then the activation in place) took 0.80, 0.87, 0.96 and 0.81x the time of oneDNN's fused linear
# from a reordered weight (1 thread, thread CPU time, 25 interleaved repetitions, medians), and
# 0.77-0.93, 0.82-1.01, 0.96-1.00 and 0.91-0.96x with 2 threads (process CPU time with
# OMP_WAIT_POLICY=PASSIVE, three runs, one of them `python benchmarks/bench_gemm.py --inference
# --vit --cpu-time`: the VM was too loaded for wall-clock figures). In ViT-S's profile the GEMMs went from 84.5-164 to 63-140 ms
# per forward (1 thread, three loaded runs), level with inductor's (63-137 ms). At 1024 rows (the
# GPT and encoder benchmarks) the whole model did not gain from MKL (NOTE: [MKL GEMMs in
# inference]; again 0.93-1.03x in four in-model runs here), so those stay on oneDNN, and so do
# the unmeasured 256-1023 rows; heads with few rows were on MKL already (NOTE: [Few rows]).
#
# NOTE: [Bias after MKL's GEMM] Given the bias, mkl._mkl_linear writes it into the output before
# the GEMM (beta = 1). Adding it afterwards in place was faster on ViT-S's four shapes (197 rows,
# 2 threads, fastest of 300 interleaved wall-clock calls on the loaded VM): 791 vs 829, 276 vs 302,
# 997 vs 1036 and 1085 vs 1106 us (the bias-free GEMM alone: 658, 236, 945, 987 us).
#: Float32 inference linears with fewer rows than this run MKL's prepacked GEMM (on Intel CPUs only:
#: NOTE: [MKL on other vendors' CPUs]) ...
MKL_PACKED_MAX_ROWS = 256 if MKL_GEMMS_FAST else 0
#: ... when their weight has at least this many elements: on smaller ones F.linear was faster
#: (8 rows, 2 threads: 32 -> 10 features 3.9 vs 5.5 us, 128 -> 128 8.3 vs 9.1 us, a tie at 256 -> 256,
#: then packed ahead: 512 -> 512 34 vs 25 us).
MKL_PACKED_MIN_WEIGHT = 1 << 16


# NOTE: [Linears on the GEMM kernel] ops.gemm_act_inference (NOTE: [GEMM kernel] in conv.py) against
# oneDNN's fused linear from a reordered weight on the AMD EPYC Zen 3 (AVX2, 2 threads). Few rows (ad hoc,
# interleaved medians of 11): ViT-S's four token-row shapes (197 x 384 -> 1152 / 384 / 1536, 1536 -> 384)
# 0.84-0.96x its time, classifier heads (8 x 1280 / 2048 -> 1000) 0.71-0.79x. More rows, through linear_act
# as a model calls it (`python benchmarks/bench_gemm.py --kernel`, kernel / oneDNN): before the kernel's
# epilogue was compiled per activation (NOTE: [Compile-time epilogues] in csrc/cpu/gemm_act_inference.cpp),
# three runs found long sums ahead at 1,024 rows (BERT-base's three shapes 0.87-0.95x, the GPT block's fc2
# 0.79-0.98x) and the GPT block's sums over 256 tied (0.93-1.12x), so only 256 rows, or 1,024 summing over
# 768+, ran on the kernel. Measured again after it (2026-12-04, two runs of `--reps 15`), every shape but the
# extremes favours the kernel: the GPT block's qkv, proj, fc1 + GELU and the encoder's fc1 + ReLU (1,024 rows,
# K = 256) 0.82-0.90x, 2,048 x 256 -> 768 0.82-0.83x, 8,192 x 256 -> 256 0.85-0.86x, ViT-B at batch 8 (1,576
# rows) 0.87-0.92x, BERT-base 0.86-0.95x, 1,024 rows of 32 -> 128 and 128 -> 512 0.91-0.96x; not 1,024 rows
# of 16 -> 64 (1.24-1.40x: too few FMAs a tile to hide its stores, as for the convolutions) nor 64 -> 256 +
# GELU (1.00-1.05x), nor an output of 4,096 x 2,048 + GELU (1.05-1.07x: 32 MB, twice this CPU's L3). A third
# run, with the rule below in place, read the same or better (0.74-0.85x on the shapes above; ViT-Ti's 520
# rows of 192 -> 576 / 768 + GELU and 768 -> 192 0.86-0.97x), 64 -> 256 + GELU 1.09x: it stays routed, one
# small layer a few percent slower, not worth a threshold of its own. In whole
# models (`python benchmarks/bench_peers.py --only gpt --only encoder`, one process, `--reps 11`, the wider
# routing as an extra variant): GPT stack 1.19x -> 1.33x eager, encoder 1.21x -> 1.45x. So where torch runs at
# the AVX2 level, float32 inference linears (not small: NOTE: [Small linears]) run on the kernel when they sum
# over at least KERNEL_MIN_FEATURES inputs and their output has at most KERNEL_MAX_OUTPUT elements, whatever
# their rows (up to KERNEL_MAX_ROWS, a switch: tests and ablations set it to 0).
#: Float32 inference linears with at most this many rows run on ops.gemm_act_inference (AVX2 CPUs; 0: never) ...
KERNEL_MAX_ROWS = 1 << 62 if _AVX2_ONLY and not MKL_GEMMS_FAST else 0
#: ... when they sum over at least this many inputs ...
KERNEL_MIN_FEATURES = 24
#: ... and their output has at most this many elements (16 MB of float32).
KERNEL_MAX_OUTPUT = 1 << 22


# NOTE: [Few rows, large weights] A classifier at batch 1 (1 x 1280 -> 1000, MobileNetV2's) is small by the
# rule above (1.3M multiply-adds) but reads a 5 MB weight, which the rest of the model has pushed out of the
# caches by the next call. Cold (a 64 MB buffer written between calls, medians of 30, ad hoc), F.linear took
# 0.60 ms and the GEMM kernel, its panels split between the two threads, 0.43 ms. So small linears run on the
# kernel (where it takes them) when their weight has at least KERNEL_SMALL_MIN_WEIGHT elements; the small
# linears of the MLPs and siamese heads in the community models (weights of 4-16K elements), on F.linear.
#: Small inference linears (NOTE: [Small linears]) with a weight of at least this many elements run on the
#: GEMM kernel where it takes them (NOTE: [Few rows, large weights]).
KERNEL_SMALL_MIN_WEIGHT = 1 << 18


def _on_gemm_kernel(rows: int, in_features: int, out_features: int) -> bool:
    """Whether a float32 inference linear of ``rows`` rows, ``in_features`` -> ``out_features``, runs on the GEMM
    kernel (NOTE: [Linears on the GEMM kernel])."""
    return rows <= KERNEL_MAX_ROWS and in_features >= KERNEL_MIN_FEATURES and rows * out_features <= KERNEL_MAX_OUTPUT


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
            # NOTE: [Few rows], NOTE: [MKL for a few hundred rows]
            few_rows = (x.dtype == torch.float32 and 0 < rows < MKL_PACKED_MAX_ROWS
                        and weight.numel() >= MKL_PACKED_MIN_WEIGHT)
            packed = _mkl_packed_weight(weight, rows) if few_rows else None
            if packed is not None:  # NOTE: [Bias after MKL's GEMM]
                y = torch.ops.mkl._mkl_linear(x.reshape(rows, -1), packed[0], weight, None, rows)
                if bias is not None:
                    y.add_(bias)
                return _activation_(y.view(*x.shape[:-1], weight.shape[0]), act)
            if small and weight.numel() < KERNEL_SMALL_MIN_WEIGHT:  # NOTE: [Few rows, large weights]
                return _activation_(F.linear(x, weight, bias), act)
            panels = (_gemm_panels_weight(weight) if x.dtype == torch.float32 and _extension.HAS_C_OPS
                      and _on_gemm_kernel(rows, x.shape[-1], weight.shape[0]) else None)
            if panels is None and small:
                return _activation_(F.linear(x, weight, bias), act)
            if panels is not None:  # NOTE: [Linears on the GEMM kernel]
                inside = act if act in GEMM_ACTIVATIONS else "none"
                y = torch.ops.torchgraph.gemm_act_inference.default(x.reshape(rows, -1), panels.panels, bias, None,
                                                                    panels.out_features, inside)
                return _activation_(y.view(*x.shape[:-1], weight.shape[0]), "none" if inside == act else act)
            (attr, scalars, algorithm), after = onednn_epilogue(act)  # NOTE: [Activations after oneDNN on AVX2]
            return _activation_(torch.ops.mkldnn._linear_pointwise(x, _onednn_linear_weight(weight), bias, attr,
                                                                   scalars, algorithm), after)
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
# oneDNN, the third on MKL (on Intel CPUs; elsewhere oneDNN, 1.9x faster than MKL there: 4.55 vs 2.37
# ms for 1024 rows x 256 -> 768, 1 thread, thread CPU time, NOTE: [MKL on other vendors' CPUs]), and
# the bias + activation (forward and backward) with the fused bias_act kernels.
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
            x_2d = x.reshape(-1, x.shape[-1])
            if MKL_GEMMS_FAST:
                grad_weight = grad_2d.t().mm(x_2d)
            else:  # g^T @ x as oneDNN's x @ W^T with x = g^T, W = x^T
                grad_weight = torch.ops.mkldnn._linear_pointwise(grad_2d.t(), x_2d.t(), None, "none", [], "")
        if ctx.needs_input_grad[2] and grad_bias is None:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias if ctx.needs_input_grad[2] else None, None
