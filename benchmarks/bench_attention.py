"""torchgraph's attention kernels against SDPA, shape by shape: the measurements behind fused attention's routing.

For each shape it times, interleaved (the order alternating each repetition), medians:

- ``qkv``: ``ops.qkv_attention`` on a packed ``(B, T, 3E)`` projection against the split + SDPA + merge it replaces;
- ``sdpa``: ``ops.attention_inference`` against ``F.scaled_dot_product_attention`` on HF's layout (heads split from
  ``(B, T, H*D)``), unmasked or causal, and with a padding mask.

and prints the kernel's time over SDPA's, and whether ``torchgraph.fused`` routes that call to the kernel on this
machine (NOTE: [Tiled attention on AVX2], [Small attention on SDPA] and [Kernel or SDPA] in
torchgraph/fused/attention.py).

Usage::

    python benchmarks/bench_attention.py [--threads 2] [--reps 7] [--only qkv|sdpa]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchgraph import fused, ops  # noqa: E402
from torchgraph.fused import attention as fused_attention  # noqa: E402

#: (batch, heads, queries, keys, head dim, "causal" or "full"): GPT/BERT blocks, ViT-S/Ti, test-sized models,
#: long sequences, and decode steps (one query against cached keys; self-attention ``qkv`` skips those).
SHAPES = [
    (8, 4, 128, 128, 64, "causal"), (8, 4, 128, 128, 64, "full"), (8, 16, 128, 128, 32, "causal"),
    (8, 8, 128, 128, 32, "full"), (1, 6, 197, 197, 64, "full"), (1, 3, 197, 197, 64, "full"),
    (1, 12, 128, 128, 64, "full"), (1, 12, 50, 50, 64, "full"), (16, 2, 64, 64, 64, "full"),
    (2, 4, 17, 17, 16, "full"), (8, 4, 32, 32, 16, "causal"), (2, 2, 7, 7, 8, "causal"),
    (2, 8, 256, 256, 64, "full"), (1, 8, 512, 512, 64, "causal"), (1, 8, 512, 512, 64, "full"),
    (1, 32, 1, 128, 128, "full"), (1, 32, 1, 512, 128, "full"), (4, 8, 1, 256, 64, "full"),
]


def _medians(fns: dict, calls: int, reps: int) -> dict:
    """Milliseconds per call, the median over ``reps`` repetitions of ``calls`` calls; the order alternates."""
    times = {name: [] for name in fns}
    for rep in range(reps):
        for name, fn in (list(fns.items()) if rep % 2 == 0 else list(fns.items())[::-1]):
            fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _routed(fn, name: str) -> bool:
    """Whether calling ``fn`` (a fused attention call) reaches ``ops.<name>``."""
    real, seen = getattr(ops, name), []
    setattr(fused_attention.ops, name, lambda *a, **k: seen.append(1) or real(*a, **k))
    try:
        fn()
    finally:
        setattr(fused_attention.ops, name, real)
    return bool(seen)


def bench_qkv(shape, reps: int) -> str | None:
    b, h, t, s, d, kind = shape
    if t != s:
        return None
    causal = kind == "causal"
    qkv = torch.randn(b, t, 3 * h * d)
    calls = max(3, int(4e7 / (b * h * t * s * d + 2e5)))
    ms = _medians({"kernel": lambda: ops.qkv_attention(qkv, h, causal),
                   "sdpa": lambda: fused_attention._sdpa_qkv_attention(qkv, h, causal, None)}, calls, reps)
    routed = _routed(lambda: fused.qkv_attention(qkv, h, causal), "qkv_attention")
    return f"kernel {ms['kernel']:8.3f} ms  SDPA {ms['sdpa']:8.3f} ms  {ms['kernel'] / ms['sdpa']:5.2f}x  routed {routed}"


def bench_sdpa(shape, reps: int) -> str:
    b, h, t, s, d, kind = shape
    causal = kind == "causal"
    q = torch.randn(b, t, h, d).transpose(1, 2)
    k, v = (torch.randn(b, s, h, d).transpose(1, 2) for _ in range(2))
    calls = max(3, int(4e7 / (b * h * t * s * d + 2e5)))
    line = []
    for mask in ([None] if causal else [None, torch.rand(b, 1, 1, s) > 0.1]):
        ms = _medians({"kernel": lambda: ops.attention_inference(q, k, v, mask, causal),
                       "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)},
                      calls, reps)
        routed = _routed(lambda: fused.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal),
                         "attention_inference")
        label = "padding mask: " if mask is not None else ""
        line.append(f"{label}kernel {ms['kernel']:8.3f} ms  SDPA {ms['sdpa']:8.3f} ms  "
                    f"{ms['kernel'] / ms['sdpa']:5.2f}x  routed {routed}")
    return "   ".join(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--only", choices=["qkv", "sdpa"], action="append")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, float32; (B, H, T, S, D)")
    with torch.inference_mode():
        for form, bench in (("qkv", bench_qkv), ("sdpa", bench_sdpa)):
            if args.only and form not in args.only:
                continue
            for shape in SHAPES:
                line = bench(shape, args.reps)
                if line is not None:
                    print(f"{form:4s} {str(shape[:5]):24s} {shape[5]:6s} {line}", flush=True)


if __name__ == "__main__":
    main()
