"""End-to-end benchmark of ``tg.optimize``: speed-ups over the same model written by hand.

For each workload, in one run with interleaved repetitions (medians), it times:
handwritten eager (``benchmarks/handwritten.py`` over the very same layer objects), the ``tg.Model``,
``tg.optimize(model)`` and ``torch.compile(handwritten)`` (steady state; its first call is reported
apart), and prints each as a speed-up over handwritten eager (> 1 is faster).

Workloads (2 threads): a 4-block pre-LN GPT stack (d=256, t=128, b=8), inference and one training
step (forward, backward, SGD update; ``tg.optimize(model, inference=False)``); ResNet-18 and ResNet-50
inference (b=8, 64x64, random weights and BatchNorm statistics). The fused ops alone against eager
and the copy-bandwidth ceiling are in ``benchmarks/bench_kernels.py``.

Usage: python benchmarks/bench_optimize.py [--quick] [--no-compile] [--only gpt|gpt_train|resnet18|resnet50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torchgraph as tg  # noqa: E402
from torchgraph import _extension  # noqa: E402
from handwritten import HandGPT, HandResNet  # noqa: E402
from torchgraph.applications import GPTBlock, build_resnet, gpt_stack, resnet_layers  # noqa: E402


def _randomize_batchnorm(layers) -> None:
    g = torch.Generator().manual_seed(0)
    for m in layers:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def _first_call(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _compare(label: str, fns: dict, args: tuple, iters: int, reps: int, first: dict) -> dict:
    for fn in fns.values():
        for _ in range(2):
            fn(*args)
    times = {k: [] for k in fns}
    for _ in range(reps):  # interleaved: every variant sees the same machine state
        for k, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn(*args)
            times[k].append((time.perf_counter() - start) / iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["handwritten"]
    print(f"\n{label}")
    for k, t in med.items():
        extra = f"   (first call {first[k]:.1f} s)" if k in first else ""
        print(f"  {k:<26} {t * 1e3:8.2f} ms   speed-up {base / t:5.2f}x{extra}")
    return {k: base / t for k, t in med.items()}


def _inference(label, hand, model, x, args) -> dict:
    hand.eval(), model.eval()
    optimized = tg.optimize(model)
    fns = {"handwritten": hand, "tg.Model": model, "tg.optimize": optimized}
    first = {}
    with torch.inference_mode():
        if args.compile:
            compiled = torch.compile(hand)
            first["torch.compile(hand)"] = _first_call(compiled, x)
            fns["torch.compile(hand)"] = compiled
        return _compare(label, fns, (x,), args.iters, args.reps, first)


def bench_gpt(args) -> dict:
    blocks = [GPTBlock(256, 4) for _ in range(4)]
    model, hand = gpt_stack(4, 256, 4, 128, blocks=blocks), HandGPT(blocks)
    return _inference("GPT stack inference (4 blocks, d=256, t=128, b=8)", hand, model,
                      torch.randn(8, 128, 256), args)


def _train_step(module, optimizer):
    def step(x):
        optimizer.zero_grad(set_to_none=True)
        module(x).square().mean().backward()
        optimizer.step()
    return step


def bench_gpt_train(args) -> dict:
    blocks = [GPTBlock(256, 4) for _ in range(4)]
    model, hand = gpt_stack(4, 256, 4, 128, blocks=blocks), HandGPT(blocks)
    optimized = tg.optimize(model, inference=False)
    x = torch.randn(8, 128, 256)
    # SGD with lr=0: every variant does the update's work without drifting apart.
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.0)  # noqa: E731
    fns = {"handwritten": _train_step(hand, sgd(hand)), "tg.Model": _train_step(model, sgd(model)),
           "tg.optimize(inference=False)": _train_step(optimized, sgd(optimized))}
    first = {}
    if args.compile:
        compiled = torch.compile(hand)
        fns["torch.compile(hand)"] = _train_step(compiled, sgd(hand))
        first["torch.compile(hand)"] = _first_call(fns["torch.compile(hand)"], x)
    return _compare("GPT stack training step (forward + backward + SGD)", fns, (x,), max(1, args.iters // 2),
                    args.reps, first)


def bench_resnet(arch: str, args) -> dict:
    layers = resnet_layers(arch, 1000)
    _randomize_batchnorm(layers.values())
    model, hand = build_resnet(layers, (3, 64, 64)), HandResNet(layers)
    return _inference(f"{arch} inference (b=8, 64x64)", hand, model, torch.randn(8, 3, 64, 64), args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--only", choices=["gpt", "gpt_train", "resnet18", "resnet50"], action="append")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.iters, args.reps = (2, 5) if args.quick else (5, 15)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fused kernels built: {_extension.HAS_C_OPS}")
    start = time.perf_counter()
    model = build_resnet(resnet_layers("resnet50", 1000), (3, 224, 224))
    build = time.perf_counter() - start
    start = time.perf_counter()
    tg.optimize(model)
    print(f"tg.optimize(ResNet-50): {(time.perf_counter() - start) * 1e3:.0f} ms (build: {build * 1e3:.0f} ms)")
    runs = {"gpt": bench_gpt, "gpt_train": bench_gpt_train,
            "resnet18": lambda a: bench_resnet("resnet18", a), "resnet50": lambda a: bench_resnet("resnet50", a)}
    for key in args.only or list(runs):
        runs[key](args)


if __name__ == "__main__":
    main()
