"""Meta's reference LLaMA (tests/community_models/llama_meta.py): eager vs tg.optimize (float32, bfloat16, and
float32 without the masked-attention rewrite or the fused RMSNorm), interleaved, medians.

It is not in the community registry (its complex-number rotary embeddings are not round-tripped through
ONNX), so ``bench_peers.py --community`` does not run it. Sizes as the GPT stack's: 4 layers, d256, 4 heads
on 2 key/value heads, vocabulary 8192, 128 tokens, batch 8.

    python benchmarks/bench_llama_meta.py [--threads 2] [--reps 11] [--iters 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import torchgraph as tg
from torchgraph import passes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peers import _no_pass, _patched  # noqa: E402
from community_models.llama_meta import ModelArgs, Transformer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=11, help="interleaved repetitions (median)")
    parser.add_argument("--iters", type=int, default=2, help="calls per repetition")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tg.retain_freed_memory()
    torch.manual_seed(0)
    net = Transformer(ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=8192, max_seq_len=256))
    net.eval()
    tokens = tg.Input(shape=(128,), dtype=torch.long, name="tokens")
    model = tg.Model(tokens, net(tokens))
    variants = {"tg.optimize": tg.optimize(model), "tg.optimize bf16": tg.optimize(model, dtype=torch.bfloat16)}
    for name, pass_name in (("-written-attention", "write_attention_as_sdpa"), ("-rms-norm", "fuse_rms_norm")):
        with _patched([(passes, pass_name, _no_pass)]):
            variants[f"tg.optimize {name}"] = tg.optimize(model)
    data = torch.randint(0, 8192, (8, 128), generator=torch.Generator().manual_seed(0))
    fns = {"eager": net, **variants}
    times: dict = {k: [] for k in fns}
    with torch.inference_mode():
        ref = net(data)
        errors = {k: (fn(data) - ref).abs().max().item() for k, fn in fns.items()}
        for _ in range(args.reps):
            for k, fn in fns.items():
                start = time.perf_counter()
                for _ in range(args.iters):
                    fn(data)
                times[k].append((time.perf_counter() - start) / args.iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print("| variant | ms | speed-up | max abs err |\n|---|---|---|---|")
    for k in fns:
        print(f"| {k} | {med[k] * 1e3:.2f} | {med['eager'] / med[k]:.2f}x | {errors[k]:.1e} |")


if __name__ == "__main__":
    main()
