"""``bench_peers.py --ablate NAME``: each named optimisation of ``tg.optimize`` switched off, one at a time.

``ABLATIONS`` maps a name to what it switches off and the ``(module, attribute, value)`` patches that do it;
``_ablated_variants`` builds one ``tg.optimize`` result per name, called under its patches
(tests/test_bench_ablations.py checks that each really changes what it names).
"""

from __future__ import annotations

import contextlib
import time

import torch

import torchgraph as tg
from torchgraph import passes
from torchgraph.fused import _common as fused_common
from torchgraph.fused import attention as fused_attention
from torchgraph.fused import conv as fused_conv
from torchgraph.fused import linear as fused_linear
from torchgraph.fused import weights as fused_weights
from torchgraph.passes import canonical as passes_canonical
from torchgraph.passes import inline as passes_inline
from torchgraph.passes import layout as passes_layout


def _no_pass(*args) -> int:
    return 0


def _no_plan(*args, **kwargs) -> None:
    return None


def _never(*args) -> bool:
    return False


def _trace_without_opaque_flag(module, concrete):
    """passes.inline's fx trace, as if it had left no submodule opaque: its parent is not recorded."""
    traced = _TRACE_ONCE(module, concrete)
    if traced is not None:
        traced.meta.pop("tg_left_opaque", None)
    return traced


_TRACE_ONCE = passes_inline._trace_once


#: ``--ablate`` name -> (what it switches off, the (module, attribute, value) patches that do it).
#: Passes are patched while ``tg.optimize`` runs; the fused calls read their limits per call, so
#: the patches also hold around every call of the ablated model.
ABLATIONS = {
    "conv-gemm": ("convolutions on few pixels run as one GEMM, MKL's on Intel CPUs, oneDNN's elsewhere "
                  "(NOTE: [Convolutions on few pixels])",
                  [(fused_conv, "CONV_GEMM_MAX_ROWS", 0), (fused_conv, "CONV_IM2COL_MAX_ROWS", 0),
                   (fused_conv, "ONEDNN_F32_CONV_GEMM_MAX_ROWS", 0)]),
    "gemm-kernel": ("convolution GEMMs on torchgraph's register-tiled kernel where they would run on oneDNN's "
                    "matmul (NOTE: [GEMM kernel]; AVX2 CPUs); oneDNN's, as before",
                    [(fused_conv, "GEMM_KERNEL", False)]),
    "short-sums-off-kernel": ("convolution GEMMs summing over 24-63 inputs on the kernel (NOTE: [GEMM kernel]); "
                              "on oneDNN's matmul, as before", [(fused_conv, "GEMM_KERNEL_MIN_DEPTH", 64)]),
    "linear-kernel": ("float32 linears summing over 24+ inputs into at most 4M outputs on the same kernel "
                      "(NOTE: [Linears on the GEMM kernel]; AVX2 CPUs); oneDNN's fused linear, as before",
                      [(fused_linear, "KERNEL_MAX_ROWS", 0)]),
    "large-small-linears": ("small float32 linears with large weights (a classifier at batch 1) on the same kernel "
                            "(NOTE: [Few rows, large weights]; AVX2 CPUs); F.linear, as before",
                            [(fused_linear, "KERNEL_SMALL_MIN_WEIGHT", 1 << 62)]),
    "winograd": ("stride-1 3x3 convolutions by Winograd's F(2x2, 3x3) (NOTE: [Winograd convolutions]; AVX2 CPUs); "
                 "oneDNN's direct convolution, as before", [(fused_conv, "WINOGRAD_KERNEL", False)]),
    "implicit-gemm": ("convolutions with 1-4 input channels (stems) as an implicit GEMM on torchgraph's kernel "
                      "(NOTE: [Stem convolutions]; AVX2 CPUs); oneDNN's channels_last convolution, as before",
                      [(fused_conv, "IMPLICIT_GEMM_KERNEL", False)]),
    "expand-depthwise": ("an inverted residual block's 1x1 expansion and depthwise convolution in one kernel, the "
                         "expanded rows kept in the cache (passes.fuse_expand_depthwise, NOTE: [Inverted residuals in "
                         "one pass]); two kernels, as before", [(passes, "fuse_expand_depthwise", _no_pass)]),
    "global-pool": ("global average pools of channels_last maps reduced as rows, the channels split between the "
                    "threads (passes.use_global_avg_pool, NOTE: [Global pools of channels_last maps]); as written",
                    [(passes, "use_global_avg_pool", _no_pass)]),
    "depthwise": ("3x3, 5x5 and 7x7 depthwise convolutions on torchgraph's NHWC kernel (NOTE: [Depthwise "
                  "convolutions]); "
                  "oneDNN's, as before", [(fused_conv, "DEPTHWISE_KERNEL", False)]),
    "conv-plans": ("per-layer plans of the fused convolutions (NOTE: [Per-layer plans]): decide per call",
                   [(fused_conv, "_new_plan", _no_plan)]),
    "shared-walks": ("generated code that reads each submodule once per forward (passes.share_attribute_walks)",
                     [(passes, "share_attribute_walks", _no_pass)]),
    "conv-residual": ("the residual add in the convolution's epilogue (passes.fuse_conv_add)",
                      [(passes, "fuse_conv_add", _no_pass)]),
    "few-rows-mkl": ("MKL's packed GEMM for linears with few rows (NOTE: [Few rows]; Intel CPUs only)",
                     [(fused_linear, "MKL_PACKED_MAX_ROWS", 0)]),
    "mkl-token-rows": ("MKL's packed GEMM for linears of 64-255 rows, ViT-S's tokens (NOTE: [MKL for a few "
                       "hundred rows]); oneDNN there, as before", [(fused_linear, "MKL_PACKED_MAX_ROWS", 64)]),
    "linear-reorder": ("linear weights reordered once for oneDNN (NOTE: [Packed linear weights])",
                       [(fused_weights, "_HAS_LINEAR_REORDER", False)]),
    "written-attention": ("softmax(q @ k^T * s) @ v written as SDPA (passes.write_attention_as_sdpa)",
                          [(passes, "write_attention_as_sdpa", _no_pass)]),
    "qkv-attention": ("the fused attention call (passes.fuse_qkv_attention)",
                      [(passes, "fuse_qkv_attention", _no_pass)]),
    "sdpa-kernel": ("SDPA calls qkv_attention does not take run ops.attention_inference where MKL is slow "
                    "(passes.use_inference_attention)", [(passes, "use_inference_attention", _no_pass)]),
    "attention-kernels": ("attention on torchgraph's kernels: both qkv-attention and sdpa-kernel, so that attention "
                          "runs split + SDPA + merge as written (on AVX2-only CPUs qkv-attention alone sends it to "
                          "the tiled attention_inference: NOTE: [Tiled attention on AVX2]); nn.TransformerEncoderLayer "
                          "keeps qkv_attention (passes.expand_transformer_layers writes it)",
                          [(passes, "fuse_qkv_attention", _no_pass), (passes, "use_inference_attention", _no_pass)]),
    "rms-norm": ("RMSNorm written the HF LLaMA way, and torch's nn.RMSNorm, as one op (passes.fuse_rms_norm)",
                 [(passes, "fuse_rms_norm", _no_pass)]),
    "record-parents": ("a module whose fx trace left a submodule opaque recorded whole (NOTE: [Parents of "
                       "untraceable modules])", [(passes_inline, "_trace_once", _trace_without_opaque_flag)]),
    "grouped-heads": ("SDPA on unrepeated keys and values (enable_gqa) instead of repeat_kv's copies "
                      "(passes.drop_repeated_kv)", [(passes, "drop_repeated_kv", _no_pass)]),
    "layer-scale": ("a layer scale after a linear folded into its weight (passes.fold_layer_scale)",
                    [(passes, "fold_layer_scale", _no_pass)]),
    "nhwc-permute": ("x.permute(0, 2, 3, 1) reading a channels_last conv's value without a copy (NOTE: [Channels-last "
                     "into NHWC])", [(passes_layout, "_nhwc_permute", _never)]),
    "tokens-layout": ("x.flatten(2).transpose(1, 2) reading a channels_last conv's value without a copy (NOTE: "
                      "[Channels-last into tokens])", [(passes_layout, "_flatten_to_tokens", _never)]),
    "concat-layout": ("torch.cat reading channels_last values as they are (NOTE: [Channels-last islands])",
                      [(passes_layout, "_PRESERVING_FUNCTIONS", passes_layout._PRESERVING_FUNCTIONS
                        - {torch.cat, torch.concat, torch.concatenate})]),
    "layout-blind": ("transposed convolutions, upsampling, padding, pooling, float32 GroupNorm... reading "
                     "channels_last values as they are (NOTE: [Layout-blind ops])",
                     [(passes_layout, "_LAYOUT_BLIND_FUNCTIONS", set()),
                      (passes_layout, "_LAYOUT_BLIND_METHODS", set()), (passes_layout, "_LAYOUT_BLIND_MODULES", ()),
                      (passes_layout, "_group_norm_of_groups", _never)]),
    "shape-readers": ("x.size() / x.shape reading channels_last values without a copy (NOTE: [Shape readers])",
                      [(passes_layout, "_reads_shape_only", _never)]),
    "instance-norm": ("nn.InstanceNorm2d (input statistics) run as F.group_norm, one channel a group (NOTE: "
                      "[InstanceNorm as GroupNorm])", [(passes_canonical, "_instance_norm_as_group_norm", _never)]),
    "preactivation-bn": ("conv(relu(bn(x))) as one bias_act pass and the scale folded into the convolutions "
                         "(NOTE: [Pre-activation BatchNorm])", [(passes, "fold_preactivation_batchnorm", _no_pass)]),
    "activations-after": ("GELU, SiLU and tanh run after oneDNN's GEMM or convolution on CPUs without AVX-512 "
                          "(NOTE: [Activations after oneDNN on AVX2]); in oneDNN's epilogue, as before",
                          [(fused_common, "ACTIVATIONS_AFTER_ONEDNN", frozenset())]),
    "lone-convs": ("in float32, convolutions that read and are read only in NCHW run as F.conv2d (NOTE: [Lone "
                   "convolutions]); channels_last conv2d_act with copies in and out, as before",
                   [(passes_layout, "_run_lone_convolutions_as_written", _no_pass)]),
    "attention-size": ("SDPA for attention too small for the oneDNN kernel (NOTE: [Small attention on SDPA]); "
                       "the kernel on every size, as before", [(fused_attention, "ATTENTION_KERNEL_MIN_WORK", 0)]),
}


@contextlib.contextmanager
def _patched(patches: list):
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


class _CalledUnder:
    """Calls ``fn`` inside ``context()`` each time: a compiled module under the inductor config it was
    compiled with, a ``tg.optimize`` result with one optimisation switched off (``ABLATIONS``)."""

    def __init__(self, fn, context):
        self.fn, self.context = fn, context

    def __call__(self, *inputs):
        with self.context():
            return self.fn(*inputs)


def _ablated_variants(model, names: list) -> tuple[dict, dict]:
    fns, first = {}, {}
    for name in names:
        patches = ABLATIONS[name][1]
        start = time.perf_counter()
        with _patched(patches):
            ablated = tg.optimize(model)
        first[f"tg.optimize -{name}"] = time.perf_counter() - start
        fns[f"tg.optimize -{name}"] = _CalledUnder(ablated, lambda patches=patches: _patched(patches))
    return fns, first
