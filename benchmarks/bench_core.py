"""Core overhead benchmark: a tg.Model against the same model written by hand (same layer objects).

Prints, side by side in one run (interleaved repetitions, medians):
  1. forward time and peak activation memory, tg.Model / handwritten, for a 200-layer
     Linear(256)+ReLU MLP at batch 1 and a ResNet-18 at batch 8, 64x64 (target <= 1.02);
  2. build overhead (record + validate + emit, layers already constructed) of ResNet-50 at 224x224
     and 64x64 (target <= 100 ms, the same at both sizes), cold (first build at that size) and warm.

Wall-clock and CPU (process) time are both reported: on a shared machine the CPU-time ratios are the
stable ones (time spent waiting for a core is not counted). On a loaded machine, run it with
OMP_NUM_THREADS=1: with two intra-op threads, OpenMP's waiting for a busy core dominates (a call of the
200-layer MLP took ~20 ms on one thread and 0.7-1.2 s on two), which hides the overhead measured here.

Usage: python benchmarks/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torchgraph as tg  # noqa: E402
from handwritten import HandMLP, HandResNet  # noqa: E402
from torchgraph.applications import build_resnet, resnet_layers  # noqa: E402


def _time(fn, x, iters: int) -> tuple[float, float]:
    """Wall-clock and CPU (process) seconds per call. NOTE: on a shared machine the CPU time is the
    robust figure: time spent waiting for a core is not counted, and both variants do the same work."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - start) / iters, (time.process_time() - cpu) / iters


def compare_forward(label: str, model, hand, x, iters: int, reps: int) -> tuple[float, float]:
    with torch.inference_mode():
        for _ in range(3):
            model(x), hand(x)
        a, b = [], []
        for _ in range(reps):  # interleaved: both see the same machine state
            b.append(_time(hand, x, iters))
            a.append(_time(model, x, iters))
    ma, mb = (statistics.median(t[0] for t in a), statistics.median(t[0] for t in b))
    ca, cb = (statistics.median(t[1] for t in a), statistics.median(t[1] for t in b))
    print(f"{label:<34} handwritten {mb * 1e6:9.1f} us   tg.Model {ma * 1e6:9.1f} us   ratio {ma / mb:5.3f}"
          f"   (CPU time: {cb * 1e6:.1f} / {ca * 1e6:.1f} us, ratio {ca / cb:5.3f})")
    return ma / mb, ca / cb


class _PeakMemory(TorchDispatchMode):
    """Tracks bytes of storages created by ops while active; a storage is live while a tensor uses it."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in self.refs:
                    self.refs[key] = 0
                    self.sizes[key] = t.untyped_storage().nbytes()
                    self.current += self.sizes[key]
                    self.peak = max(self.peak, self.current)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def peak_memory(fn, x) -> int:
    """Peak bytes of activations (storages created during ``fn(x)``) alive at once."""
    tracker = _PeakMemory()
    with torch.inference_mode(), tracker:
        out = fn(x)
    del out
    return tracker.peak


def compare_memory(label: str, model, hand, x) -> float:
    pm, ph = peak_memory(model, x), peak_memory(hand, x)
    ratio = pm / ph if ph else float("nan")
    print(f"{label:<34} handwritten {ph / 1e6:9.2f} MB   tg.Model {pm / 1e6:9.2f} MB   ratio {ratio:5.3f}")
    return ratio


def build_times(shape, reps: int) -> tuple[float, float, float]:
    """Cold and warm (median) wall-clock seconds, and the warm CPU seconds, of building ResNet-50."""
    layers = resnet_layers("resnet50")
    times, cpu = [], []
    for _ in range(reps):
        start, c0 = time.perf_counter(), time.process_time()
        build_resnet(layers, shape)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - c0)
    return times[0], statistics.median(times[1:]), statistics.median(cpu[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    reps = 5 if args.quick else 15
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    mlp = tg.applications.mlp(depth=200, width=256).eval()
    hand_mlp = HandMLP([m for m in mlp.layers]).eval()
    x = torch.randn(1, 256)
    torch.testing.assert_close(mlp(x), hand_mlp(x))
    (r1, c1) = compare_forward("MLP-200 forward, batch 1", mlp, hand_mlp, x, iters=50, reps=reps)
    m1 = compare_memory("MLP-200 peak memory, batch 1", mlp, hand_mlp, x)

    layers = resnet_layers("resnet18")
    resnet = build_resnet(layers, (3, 64, 64)).eval()
    hand_resnet = HandResNet(layers).eval()
    x = torch.randn(8, 3, 64, 64)
    torch.testing.assert_close(resnet(x), hand_resnet(x))
    (r2, c2) = compare_forward("ResNet-18 forward, batch 8, 64x64", resnet, hand_resnet, x, iters=10, reps=reps)
    m2 = compare_memory("ResNet-18 peak memory, b8 64x64", resnet, hand_resnet, x)

    cold224, warm224, cpu224 = build_times((3, 224, 224), reps=1 + max(3, reps // 2))
    cold64, warm64, cpu64 = build_times((3, 64, 64), reps=1 + max(3, reps // 2))
    print(f"{'ResNet-50 build, 224x224':<34} cold {cold224 * 1e3:7.1f} ms   warm {warm224 * 1e3:7.1f} ms"
          f"   (warm CPU time {cpu224 * 1e3:.1f} ms)")
    print(f"{'ResNet-50 build, 64x64':<34} cold {cold64 * 1e3:7.1f} ms   warm {warm64 * 1e3:7.1f} ms"
          f"   (warm CPU time {cpu64 * 1e3:.1f} ms)")
    print(f"summary: forward ratios {r1:.3f} (MLP) {r2:.3f} (ResNet-18), CPU time {c1:.3f} / {c2:.3f}, "
          f"target <= 1.02; memory ratios {m1:.3f} {m2:.3f}; build warm {warm224 * 1e3:.0f}/{warm64 * 1e3:.0f} ms "
          f"(CPU {cpu224 * 1e3:.0f}/{cpu64 * 1e3:.0f} ms), target <= 100 ms")


if __name__ == "__main__":
    main()
