"""LLaMA as Meta's reference code and torchtitan write it: eager vs tg.optimize (float32, bfloat16, and float32
with one rewrite switched off), interleaved, medians.

- ``meta``: tests/community_models/llama_meta.py (``llama/model.py``): RMSNorm written out, attention written
  out with an additive ``-inf`` mask; ablations: the masked-attention rewrite, the RMSNorm fusion.
- ``titan``: tests/community_models/llama_titan.py (torchtitan's LLaMA 3): ``nn.RMSNorm``, SDPA behind a
  wrapper module; ablations: the RMSNorm fusion, recording the parents of untraceable modules (without it
  the attention stays one opaque call: NOTE: [Parents of untraceable modules] in passes/inline.py), SDPA on
  the unrepeated keys and values (passes.drop_repeated_kv).

Neither is in the community registry (complex-number rotary embeddings), so ``bench_peers.py --community``
does not run them. Sizes as the GPT stack's: 4 layers, d256, 4 heads on 2 key/value heads, vocabulary 8192,
128 tokens, batch 8.

    python benchmarks/bench_llama.py [--spelling meta --spelling titan] [--threads 2] [--reps 11] [--iters 2]
        [--large-blocks]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

import torchgraph as tg
from torchgraph import passes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peers import ABLATIONS, _interleaved, _no_pass, _patched  # noqa: E402
from community_models import llama_meta, llama_titan  # noqa: E402

SPELLINGS = {
    "meta": (lambda: llama_meta.Transformer(llama_meta.ModelArgs(**SIZES)),
             {"-written-attention": [(passes, "write_attention_as_sdpa", _no_pass)],
              "-rms-norm": [(passes, "fuse_rms_norm", _no_pass)]}),
    "titan": (lambda: llama_titan.Transformer(llama_titan.TransformerModelArgs(**SIZES)),
              {"-record-parents": ABLATIONS["record-parents"][1],
               "-grouped-heads": ABLATIONS["grouped-heads"][1],
               "-rms-norm": [(passes, "fuse_rms_norm", _no_pass)]}),
}
SIZES = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=8192, max_seq_len=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spelling", action="append", choices=sorted(SPELLINGS),
                        help="which LLaMA (repeatable; default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=11, help="interleaved repetitions (median)")
    parser.add_argument("--iters", type=int, default=2, help="calls per repetition")
    parser.add_argument("--large-blocks", action="store_true",
                        help="keep blocks above glibc's 32 MiB cap too (the float32 logits: 33.5 MB)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tg.retain_freed_memory(large_blocks=args.large_blocks)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}"
          f"{', blocks above 32 MiB kept' if args.large_blocks else ''}")
    for spelling in args.spelling or sorted(SPELLINGS):
        _run(spelling, args)


def _run(spelling: str, args) -> None:
    make, ablations = SPELLINGS[spelling]
    torch.manual_seed(0)
    net = make().eval()
    tokens = tg.Input(shape=(128,), dtype=torch.long, name="tokens")
    model = tg.Model(tokens, net(tokens))
    variants = {"tg.optimize": tg.optimize(model), "tg.optimize bf16": tg.optimize(model, dtype=torch.bfloat16)}
    for name, patches in ablations.items():
        with _patched(patches):
            variants[f"tg.optimize {name}"] = tg.optimize(model)
    data = torch.randint(0, 8192, (8, 128), generator=torch.Generator().manual_seed(0))
    fns = {"eager": net, **variants}
    with torch.inference_mode():
        ref = net(data)
        errors = {k: (fn(data) - ref).abs().max().item() for k, fn in fns.items()}
        # interleaved in a rotating order, one untimed call each time (NOTE: [Rotated order] in bench_peers.py)
        times = _interleaved({k: (lambda fn=fn: fn(data)) for k, fn in fns.items()}, argparse.Namespace(
            reps=args.reps, iters=args.iters, warm=1))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{spelling}\n| variant | ms | speed-up | max abs err |\n|---|---|---|---|")
    for k in fns:
        print(f"| {k} | {med[k] * 1e3:.2f} | {med['eager'] / med[k]:.2f}x | {errors[k]:.1e} |")


if __name__ == "__main__":
    main()
