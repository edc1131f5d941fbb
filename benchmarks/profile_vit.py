"""Where ViT-S's time goes, op group by op group: eager, ``tg.optimize`` and torch.compile (freezing).

Profiles the benchmark ViT-S (``bench_peers.py``'s ``vit_s``: timm-style ViT-S/16, batch 1, 224x224)
with ``torch.profiler``, the variants interleaved over ``--rounds`` rounds of two calls each, and
prints milliseconds per forward for each op group (self time of the ops in the group). The
``tg.optimize`` column is shown twice: as built, and with its token-row linears on oneDNN (the
``mkl-token-rows`` ablation of ``bench_peers.py``, how it ran before NOTE: [MKL for a few hundred
rows]). Inductor's generated C++ kernels are profiled with ``cpp.enable_kernel_profile`` and
grouped by the suffix inductor numbered them with, as ``TORCH_LOGS=output_code`` shows them for
torch 2.13 (``_2``: qkv bias + q/k/v copies for SDPA; ``_4``: bias + GELU; ``_3``/``_5``-``_8``:
bias + residual add + LayerNorm; ``_1``: class token, position add and the first LayerNorm): another
torch version may number them differently (they then land in "other").

The profiler's times are wall-clock times: on a loaded machine use ``--threads 1`` and compare the
columns of one run, not runs with each other. With ``--minima`` it prints instead, per variant, the
sum over one forward's top-level op calls of each call's *fastest* time over the rounds (a call is
its op name and its position in the forward): on a machine loaded by others, some rounds of each
call run undisturbed, so this estimates the quiet machine's time (Python between the ops excluded)
where medians of whole forwards are noise; use 25 rounds or more, with 2 threads.

Usage: python benchmarks/profile_vit.py [--threads 1] [--rounds 8] [--minima]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_peers

import torchgraph as tg

#: (group, pattern on the profiler's event name); the first match wins.
GROUPS = [
    ("GEMM (qkv, proj, fc1, fc2, head)", r"aten::addmm|aten::linear$|mkldnn::_linear_pointwise|mkl::_mkl_linear|aten::mm$"),
    ("attention (SDPA, q/k/v prep)", r"scaled_dot_product|qkv_attention|cpp_fused__scaled_dot"),
    ("GELU (+bias)", r"aten::gelu|cpp_fused_.*_4$"),
    ("residual add + LayerNorm (+bias)",
     r"aten::native_layer_norm|aten::layer_norm|add_layer_norm|aten::add$|cpp_fused_.*_[35678]$|cpp_fused_.*_9$"),
    ("patch embed conv, class token", r"convolution|aten::conv2d|cpp_fused_.*_[01]$|aten::cat"),
    ("layout copies", r"aten::copy_|aten::clone"),
]
OTHER = "other (Python, views, allocation, dispatch)"


def _group(name: str) -> str:
    return next((group for group, pattern in GROUPS if re.search(pattern, name)), OTHER)


def _wrapper(event) -> bool:
    return event.name.startswith(("Torch-Compiled Region", "## Call CompiledFxGraph"))


def _keep_minima(minima: dict, events) -> None:
    """Per top-level call (name, position) of the profiled forwards, its fastest time in ms."""
    seen = collections.Counter()
    for event in events:
        parent = event.cpu_parent
        if _wrapper(event) or (parent is not None and not _wrapper(parent)):
            continue
        key = (event.name, seen[event.name])
        seen[event.name] += 1
        minima[key] = min(minima.get(key, float("inf")), event.cpu_time_total / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--minima", action="store_true", help="sum of per-call minima (loaded machines)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build, shape, batch, _ = bench_peers._models()["vit_s"]
    torch.manual_seed(0)
    eager = build().eval()
    x_sym = tg.Input(shape=shape)
    fast = tg.optimize(tg.Model(x_sym, eager(x_sym)).eval())
    x = torch.randn(batch, *shape)
    patches = bench_peers.ABLATIONS["mkl-token-rows"][1]
    with inductor_config.patch(freezing=True, **{"cpp.enable_kernel_profile": True}):
        compiled = torch.compile(eager)
        with torch.inference_mode():
            compiled(x)
    fns = {
        "eager": eager,
        "tg.optimize, oneDNN linears": bench_peers._CalledUnder(fast, lambda: bench_peers._patched(patches)),
        "tg.optimize": fast,
        "compile freezing": bench_peers._CalledUnder(
            compiled, lambda: inductor_config.patch(freezing=True, **{"cpp.enable_kernel_profile": True})),
    }
    table = collections.defaultdict(collections.Counter)
    minima = {label: {} for label in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)
        for _ in range(args.rounds):
            for label, fn in fns.items():
                with torch.profiler.profile() as prof:
                    fn(x)
                    fn(x)
                for event in prof.key_averages():
                    table[_group(event.key)][label] += event.self_cpu_time_total / 1e3 / (2 * args.rounds)
                _keep_minima(minima[label], prof.events())
    if args.minima:
        for label, calls in minima.items():
            by_group = collections.Counter()
            for (name, _), ms in calls.items():
                by_group[_group(name)] += ms / 2  # two forwards per round
            print(f"{label:30s} {sum(by_group.values()):7.2f} ms  (" + ", ".join(
                f"{group.split(' (')[0]} {ms:.2f}" for group, ms in by_group.most_common()) + ")")
        return
    print(f"| op group ({args.threads} thread(s), ms per forward) | " + " | ".join(fns) + " |")
    print("|---" * (len(fns) + 1) + "|")
    for group in [g for g, _ in GROUPS] + [OTHER]:
        print(f"| {group} | " + " | ".join(f"{table[group][k]:.1f}" for k in fns) + " |")
    print("| total | " + " | ".join(f"{sum(table[g][k] for g in table):.1f}" for k in fns) + " |")


if __name__ == "__main__":
    main()
