"""Which GEMM library is fast on this CPU: :func:`cpu_vendor` and :data:`MKL_GEMMS_FAST`.

Example:
    >>> from torchgraph.fused.cpu_profile import MKL_GEMMS_FAST, cpu_vendor
    >>> isinstance(cpu_vendor(), str), isinstance(MKL_GEMMS_FAST, bool)
    (True, True)
"""

from __future__ import annotations

import platform

import torch

__all__ = ["MKL_GEMMS_FAST", "cpu_vendor"]

# NOTE: [MKL on other vendors' CPUs] PyTorch's x86 wheels run float32 F.linear/addmm through MKL,
# and tg.optimize called MKL's prepacked GEMM itself where it measured faster than oneDNN on an
# Intel CPU with AMX (NOTE: [Few rows], [MKL for a few hundred rows] in linear.py, [Convolutions on
# few pixels] in conv.py). MKL picks its code paths by CPU vendor; on an AMD EPYC (Zen 5, AVX-512,
# AVX512-BF16, no AMX; MKL 2024.2 in torch 2.13.0, 2 threads, medians) its float32 GEMMs ran at
# ~180 GFLOP/s where oneDNN's ran at ~430: 1024x256 @ 256x1024 took 3055 us in F.linear vs 1213 us
# in oneDNN from a reordered weight, 197x384 @ 384x1152 903 vs 386 us (MKL's packed GEMM the same
# 903), 8x1280 @ 1280x1000 240-257 vs 77 us. oneDNN's fixed cost per call was ~13 us there (45 us on
# the Intel machine), so it already won from ~1-2M multiply-adds (64x256x256: 49 vs 33 us; 8x256x256:
# 13.5 vs 17 us, still MKL's). In whole models, with MKL's GEMMs for few rows and few pixels taken
# out: ViT-S b1 0.96x -> 1.97x eager, ResNet-50 b8 64x64 0.94x -> 1.40x. So MKL's routes (and the
# higher oneDNN cut for small linears, ONEDNN_LINEAR_MIN_MACS) apply on Intel CPUs only; elsewhere
# every GEMM tg.optimize places runs on oneDNN, which picks its kernels by instruction set, not vendor.


def cpu_vendor() -> str:
    """The x86 CPU vendor string (``"GenuineIntel"``, ``"AuthenticAMD"``...), or ``""`` when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
                if not line.strip():  # the first processor's block has ended
                    break
    except OSError:
        pass
    name = platform.processor()  # Windows: "Intel64 Family 6 Model 143 Stepping 8, GenuineIntel"
    for vendor in ("GenuineIntel", "AuthenticAMD"):
        if vendor in name:
            return vendor
    return ""


#: Whether MKL's float32 GEMMs (F.linear, its prepacked GEMM) are fast here: MKL present and an Intel CPU.
MKL_GEMMS_FAST = torch.backends.mkl.is_available() and cpu_vendor() == "GenuineIntel"
