"""What every fused call shares: the activation table, when oneDNN applies, and the activations.

Example:
    >>> import torch
    >>> from torchgraph.fused._common import use_onednn
    >>> use_onednn(torch.randn(2, 3), torch.randn(4, 3)) == torch.backends.mkldnn.is_available()
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..ops._common import ACTIVATION_FNS

__all__ = ["ACTIVATIONS_AFTER_ONEDNN", "ONEDNN_ACTIVATIONS", "onednn_epilogue", "use_onednn"]

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

_ACTIVATION_FNS = {**ACTIVATION_FNS, "hardsigmoid": F.hardsigmoid, "sigmoid": torch.sigmoid, "tanh": torch.tanh}

# Whether torch runs at the AVX2 level (x86 without AVX-512): the level the kernels' AVX2 choices were
# measured at (NOTE: [Activations after oneDNN on AVX2] below; NOTE: [Tiled attention on AVX2] in attention.py).
_AVX2_ONLY = torch.backends.cpu.get_cpu_capability().upper() == "AVX2"

# NOTE: [Activations after oneDNN on AVX2] On a CPU without AVX-512 (an AMD EPYC Zen 3, 2 threads,
# `python benchmarks/bench_gemm.py --epilogues --reps 12`, medians, the order of each pair alternating),
# oneDNN's AVX2 epilogues for the transcendental activations were slower than its GEMM or convolution
# with no post-op followed by ATen's vectorised activation in place. The GPT block's fc1 (1024 x 256 ->
# 1024) took, after / fused: GELU 0.86x (5.26 vs 6.14 ms), GELU-tanh 0.79x, SiLU 0.83x, tanh 0.83x; a 3x3
# 64 -> 64 channels_last convolution at 8 x 32 x 32: 0.95x, 0.86x, 0.95x, 0.90x. ReLU, ReLU6, the hard
# activations and sigmoid were 1.00-1.11x (the epilogue as fast or faster). In whole models (bench_peers
# `--ablate activations-after`, two processes) ViT 1.08x -> 1.12-1.14x eager, HF BERT 1.01x -> 1.07x, the
# GPT stack 0.97-1.04x -> 1.03-1.06x, EfficientNet-B0 unchanged within noise. So where torch runs at the
# AVX2 level (x86 without AVX-512) these four run after oneDNN; elsewhere (AVX-512, where the fused epilogues
# were measured, and CPUs not measured) oneDNN applies every activation.
#: Activations that run in place after oneDNN's GEMM or convolution rather than in its epilogue.
ACTIVATIONS_AFTER_ONEDNN = frozenset({"gelu", "gelu_tanh", "silu", "tanh"}) if _AVX2_ONLY else frozenset()


def onednn_epilogue(act: str) -> tuple[tuple, str]:
    """oneDNN's (attr, scalars, algorithm) for ``act`` and what runs after it in place (NOTE: [Activations
    after oneDNN on AVX2]): ``(ONEDNN_ACTIVATIONS[act], "none")``, or no post-op and ``act`` after."""
    if act in ACTIVATIONS_AFTER_ONEDNN:
        return ONEDNN_ACTIVATIONS["none"], act
    return ONEDNN_ACTIVATIONS[act], "none"


_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# ATen's oneDNN matmul (the attention kernels' products) refuses to run, float32 included, on CPUs
# without AVX-512 BW/VL/DQ, AVX-NE-CONVERT or Arm's bf16: the condition torch's bf16 check reads
# (NOTE: [oneDNN matmul needs AVX-512] in csrc/cpu/onednn_matmul.h). Convolutions and linears run there.
_ONEDNN_MATMUL_RUNS = _HAS_ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# bfloat16 runs on oneDNN only where the CPU has bf16 instructions (AVX512-BF16 / AMX); elsewhere
# oneDNN emulates it slowly (tg.optimize(dtype=torch.bfloat16) then falls back to float32).
_ONEDNN_DTYPES = frozenset({torch.float32} | ({torch.bfloat16} if _ONEDNN_MATMUL_RUNS else set()))


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
