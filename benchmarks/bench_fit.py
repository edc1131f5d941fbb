"""fit's per-step cost against a handwritten loop doing the same work, with each training feature off and on.

Same model, same optimizer object, same batches (a fresh permutation per epoch, gathered by index),
same loss. Each feature row runs three loops, interleaved and in rotating order: ``fit`` with the
feature, the handwritten loop with the same feature written by hand, and the plain handwritten
loop. Two ratios come out of it:

  - ``fit/hand``: fit with the feature over the handwritten loop with the same feature: fit's own
    overhead (target <= 1.05 with every feature off);
  - ``cost``: fit with the feature over the plain handwritten loop: what turning the feature on
    costs a user of ``fit``.

Features: ``+accuracy`` (built-in metric, summed on the device), ``+clipnorm`` (Keras' per-tensor
clipping), ``+global_clipnorm`` (``clip_grad_norm_``), ``+accum4`` (gradient_accumulation_steps=4),
``+f1`` (torchmetrics' macro F1, updated every step). Each repetition is one epoch; figures are
medians of the ratios of adjacent runs (process CPU time: torch runs on one thread, so the ratio is
steady when other jobs share the cores). With ``--processes N`` the whole measurement runs in N
fresh processes and each ratio is reported as the median and the range over them.

Run: python benchmarks/bench_fit.py [--processes 3] [--reps 15] [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg

FEATURES = ("off", "+accuracy", "+clipnorm", "+global_clipnorm", "+accum4", "+f1")


def small_mlp() -> tg.Model:
    x = tg.Input(shape=(256,))
    h = F.relu(nn.Linear(256, 256)(x))
    h = F.relu(nn.Linear(256, 256)(h))
    return tg.Model(x, nn.Linear(256, 10)(h), name="MLP")


def tiny() -> tg.Model:
    x = tg.Input(shape=(8,))
    return tg.Model(x, nn.Linear(8, 10)(x), name="Tiny")


def small_cnn() -> tg.Model:
    x = tg.Input(shape=(3, 32, 32))
    h = F.max_pool2d(F.relu(nn.BatchNorm2d(16)(nn.Conv2d(3, 16, 3, padding=1)(x))), 2)
    h = F.max_pool2d(F.relu(nn.BatchNorm2d(32)(nn.Conv2d(16, 32, 3, padding=1)(h))), 2)
    h = h.mean(dim=(2, 3))
    return tg.Model(x, nn.Linear(32, 10)(h), name="CNN")


def compile_kwargs(feature: str) -> dict:
    kw = {"optimizer": "sgd", "loss": "cross_entropy"}
    if feature == "+accuracy":
        kw["metrics"] = ["accuracy"]
    elif feature == "+clipnorm":
        kw["clipnorm"] = 1.0
    elif feature == "+global_clipnorm":
        kw["global_clipnorm"] = 1.0
    elif feature == "+accum4":
        kw["gradient_accumulation_steps"] = 4
    elif feature == "+f1":
        kw["metrics"] = ["f1_score"]
    return kw


def handwritten_epoch(model, opt, x, y, batch_size, gen, feature, f1=None):
    """The loop one writes by hand: the same work as fit(..., epochs=1, verbose=0) with ``feature``."""
    model.train()
    n = x.shape[0]
    perm = torch.randperm(n, generator=gen)
    total = torch.zeros(())
    correct = torch.zeros(())
    params = [p for g in opt.param_groups for p in g["params"]]
    accumulate = 4 if feature == "+accum4" else 1
    steps = -(-n // batch_size)
    for step, start in enumerate(range(0, n, batch_size)):
        idx = perm[start:start + batch_size]
        xb, yb = x[idx], y[idx]
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        if accumulate == 1:
            opt.zero_grad(set_to_none=True)
            loss.backward()
        else:
            if step % accumulate == 0:
                opt.zero_grad(set_to_none=True)
            (loss / accumulate).backward()
        if feature == "+clipnorm":
            grads = [p.grad for p in params]
            scales = torch._foreach_norm(grads)
            torch._foreach_clamp_min_(scales, 1.0)
            torch._foreach_reciprocal_(scales)
            torch._foreach_mul_(grads, scales)
        elif feature == "+global_clipnorm":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        if accumulate == 1 or (step + 1) % accumulate == 0 or step + 1 == steps:
            opt.step()
        total.add_(loss.detach(), alpha=xb.shape[0])
        if feature == "+accuracy":
            with torch.no_grad():
                correct.add_((out.argmax(1) == yb).float().mean(), alpha=xb.shape[0])
        elif feature == "+f1":
            with torch.no_grad():
                f1.update(out.softmax(1), yb)
    if feature == "+f1":
        f1.compute()
        f1.reset()
    return (total / n).item(), (correct / n).item()


def bench(make, x, y, batch_size, reps, feature) -> dict:
    model = make()
    model.compile(**compile_kwargs(feature))
    opt = model.optimizer
    f1 = None
    if feature == "+f1":
        from torchmetrics.classification import MulticlassF1Score
        f1 = MulticlassF1Score(num_classes=10, validate_args=False)
    gen = torch.Generator().manual_seed(0)
    runs = {
        "fit": lambda: model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0),
        "hand": lambda: handwritten_epoch(model, opt, x, y, batch_size, gen, feature, f1),
        "plain": lambda: handwritten_epoch(model, opt, x, y, batch_size, gen, "off"),
    }
    for _ in range(2):  # warm-up: allocator, autograd graph caches, first-batch checks
        for run in runs.values():
            run()
    times = {k: [] for k in runs}
    order = list(runs)
    for r in range(reps):
        for which in order[r % 3:] + order[:r % 3]:
            c0 = time.process_time()
            runs[which]()
            times[which].append(time.process_time() - c0)
    steps = -(-x.shape[0] // batch_size)
    return {
        "hand_ms": 1e3 * statistics.median(times["plain"]) / steps,
        "fit_ms": 1e3 * statistics.median(times["fit"]) / steps,
        "fit/hand": statistics.median(a / b for a, b in zip(times["fit"], times["hand"])),
        "cost": statistics.median(a / b for a, b in zip(times["fit"], times["plain"])),
        "us_more": 1e6 * (statistics.median(times["fit"]) - statistics.median(times["hand"])) / steps,
    }


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    configs = (("Tiny", tiny, (8,), 8, 5), ("MLP", small_mlp, (256,), 64, 1),
               ("CNN", small_cnn, (3, 32, 32), 32, 1))
    for name, make, shape, batch, more_steps in configs:
        n = args.steps * batch * more_steps
        x, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
        features = ("off", "+accuracy") if name == "Tiny" else FEATURES
        for feature in features:
            results[f"{name} {feature}"] = bench(make, x, y, batch, args.reps, feature)
    return results


def _fmt(values: list, spec: str) -> str:
    mid = statistics.median(values)
    if len(values) == 1:
        return format(mid, spec)
    return f"{format(mid, spec)} [{format(min(values), spec)}-{format(max(values), spec)}]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--steps", type=int, default=30, help="steps per epoch")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine quiet)")
    p.add_argument("--processes", type=int, default=1, help="repeat the measurement in this many processes")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return
    if args.processes == 1:
        runs = [measure(args)]
    else:
        cmd = [sys.executable, __file__, "--worker", "--reps", str(args.reps), "--steps", str(args.steps),
               "--threads", str(args.threads)]
        runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                for _ in range(args.processes)]
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.reps} interleaved epochs per "
          f"process, {len(runs)} process(es): median [min-max] over processes")
    print(f"{'config':<22} {'hand ms/step':>14} {'fit ms/step':>14} {'fit/hand':>20} {'cost':>20} "
          f"{'us/step more':>20}")
    for key in runs[0]:
        rows = [r[key] for r in runs]
        hand, fit = _fmt([r["hand_ms"] for r in rows], ".3f"), _fmt([r["fit_ms"] for r in rows], ".3f")
        print(f"{key:<22} {hand:>14} {fit:>14} "
              f"{_fmt([r['fit/hand'] for r in rows], '.3f'):>20} {_fmt([r['cost'] for r in rows], '.3f'):>20} "
              f"{_fmt([r['us_more'] for r in rows], '+.1f'):>20}")
    worst = max(statistics.median(r[k]["fit/hand"] for r in runs) for k in runs[0] if k.endswith(" off")
                and not k.startswith("Tiny"))
    print(f"worst fit/hand with features off on MLP/CNN (median over processes): {worst:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
