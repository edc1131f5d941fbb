"""fit's per-step overhead against a handwritten loop doing the same work.

Same model, same optimizer object, same batches (a fresh permutation per epoch, gathered by index),
same loss; the "+accuracy" rows also accumulate accuracy on the device in both loops. Each
repetition is one epoch of each loop, interleaved (fit, hand, hand, fit, ...), and the figures are
medians (the ratio is the median of the ratios of adjacent runs), which keeps a shared, noisy
machine from favouring either side. Both clocks are reported:
process CPU time (default ratio; steady when other jobs share the cores, as torch runs on one
thread here) and wall time. The "Tiny" row (Linear(8, 10), batch 8) shows fit's absolute
overhead in microseconds per step, where the work itself is almost nothing.

Run: python benchmarks/bench_fit.py [--reps 21] [--steps 40] [--threads 1]
Target: fit / handwritten <= 1.05 on the MLP and the CNN.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg


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


def handwritten_epoch(model, opt, x, y, batch_size, gen, with_accuracy):
    """The loop one writes by hand: the same work as fit(..., epochs=1, verbose=0)."""
    model.train()
    n = x.shape[0]
    perm = torch.randperm(n, generator=gen)
    total = torch.zeros(())
    correct = torch.zeros(())
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        xb, yb = x[idx], y[idx]
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total.add_(loss.detach(), alpha=xb.shape[0])
        if with_accuracy:
            with torch.no_grad():
                correct.add_((out.argmax(1) == yb).float().mean(), alpha=xb.shape[0])
    return (total / n).item(), (correct / n).item()


def bench(name, model, x, y, batch_size, reps, with_accuracy):
    model.compile(optimizer="sgd", loss="cross_entropy", metrics=["accuracy"] if with_accuracy else None)
    opt = model.optimizer
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # warm-up: allocator, autograd graph caches, first-batch checks
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
        handwritten_epoch(model, opt, x, y, batch_size, gen, with_accuracy)
    fit_t, hand_t, fit_w, hand_w = [], [], [], []
    for r in range(reps):
        order = ("fit", "hand") if r % 2 == 0 else ("hand", "fit")
        for which in order:
            c0, w0 = time.process_time(), time.perf_counter()
            if which == "fit":
                model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
                fit_t.append(time.process_time() - c0)
                fit_w.append(time.perf_counter() - w0)
            else:
                handwritten_epoch(model, opt, x, y, batch_size, gen, with_accuracy)
                hand_t.append(time.process_time() - c0)
                hand_w.append(time.perf_counter() - w0)
    steps = -(-x.shape[0] // batch_size)
    f, h = statistics.median(fit_t), statistics.median(hand_t)
    # Ratios of adjacent (paired) runs cancel slow drifts in machine load; report their median.
    ratio = statistics.median(a / b for a, b in zip(fit_t, hand_t))
    wall_ratio = statistics.median(a / b for a, b in zip(fit_w, hand_w))
    label = name + (" +accuracy" if with_accuracy else "")
    print(f"{label:<16} {steps:>5} {1e3 * h / steps:>12.3f} {1e3 * f / steps:>11.3f} {ratio:>9.3f} "
          f"{1e6 * (f - h) / steps:>+12.1f} {wall_ratio:>10.3f}")
    return ratio


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--steps", type=int, default=40, help="steps per epoch")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine quiet)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.reps} "
          "interleaved epochs")
    print(f"{'config':<16} {'steps':>5} {'hand ms/step':>12} {'fit ms/step':>11} {'cpu ratio':>9} "
          f"{'us/step more':>12} {'wall ratio':>10}")
    ratios = []
    configs = (("Tiny", tiny, (8,), 8, 5), ("MLP", small_mlp, (256,), 64, 1),
               ("CNN", small_cnn, (3, 32, 32), 32, 1))
    for name, make, shape, batch, more_steps in configs:
        n = args.steps * batch * more_steps
        x, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
        for with_accuracy in (False, True):
            ratio = bench(name, make(), x, y, batch, args.reps, with_accuracy)
            if name != "Tiny":
                ratios.append(ratio)
    print(f"worst cpu ratio on MLP/CNN: {max(ratios):.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
