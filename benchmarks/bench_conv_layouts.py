"""Per-layer benchmark: how each convolution of a ResNet runs fastest on this CPU.

For every distinct convolution of ResNet-18 or ResNet-50 (batch 8, 64x64 images, as in
``bench_optimize.py``) it times, in one run with interleaved repetitions (medians, inference mode,
bias + ReLU fused where the op allows):

* ``F.conv2d``:          contiguous input, then an in-place ReLU (what eager PyTorch does);
* ``packed``:            oneDNN's fused op with weights prepacked in its blocked layout, contiguous
                         input, answer copied back to contiguous (``tg.optimize(channels_last=False)``);
* ``packed channels_last``: the same on a channels_last input, answering in channels_last, nothing
                         copied (``tg.optimize``'s default inside a conv stack);
* ``F.conv2d channels_last``: ``F.conv2d`` on a channels_last input.

The last column is ``F.conv2d`` time / ``packed channels_last`` time. This is the measurement behind
``NOTE: [Packed channels_last convs]`` in ``torchgraph/fused.py``.

Usage: python benchmarks/bench_conv_layouts.py [--arch resnet18|resnet50] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchgraph import fused  # noqa: E402
from torchgraph.applications import build_resnet, resnet_layers  # noqa: E402


def distinct_convolutions(arch: str) -> dict:
    """(weight shape, input shape, stride, padding) -> how many layers have it."""
    model = build_resnet(resnet_layers(arch, 10), (3, 64, 64)).eval()
    found: dict = {}

    def record(module, inputs, output):
        key = (tuple(module.weight.shape), tuple(inputs[0].shape), module.stride, module.padding)
        found[key] = found.get(key, 0) + 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    return found


def variants(weight_shape, input_shape, stride, padding) -> dict:
    weight, bias = torch.randn(weight_shape), torch.randn(weight_shape[0])
    x = torch.randn(input_shape)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    packed = fused._pack_conv_weight(weight, padding, stride, (1, 1), input_shape)
    conv = torch.ops.mkldnn._convolution_pointwise
    args = (list(padding), list(stride), [1, 1], 1, "relu", [], "")
    return {
        "F.conv2d": lambda: F.conv2d(x, weight, bias, stride, padding).relu_(),
        "packed": lambda: conv(x, packed, bias, *args).contiguous(),
        "packed channels_last": lambda: conv(x_cl, packed, bias, *args),
        "F.conv2d channels_last": lambda: F.conv2d(x_cl, weight, bias, stride, padding).relu_(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.arch}, batch 8, 64x64; ms")
    names = list(variants((4, 4, 1, 1), (1, 4, 2, 2), (1, 1), (0, 0)))
    print(f"{'weight':<20} {'input':<18} {'stride':>6} {'layers':>6} "
          + " ".join(f"{n:>22}" for n in names) + f" {'speed-up':>9}")
    with torch.inference_mode():
        for (w_shape, x_shape, stride, padding), count in distinct_convolutions(args.arch).items():
            fns = variants(w_shape, x_shape, stride, padding)
            times = {name: [] for name in fns}
            for fn in fns.values():
                fn()
            for _ in range(args.reps):  # interleaved
                for name, fn in fns.items():
                    start = time.perf_counter()
                    for _ in range(4):
                        fn()
                    times[name].append((time.perf_counter() - start) / 4 * 1e3)
            med = {name: statistics.median(t) for name, t in times.items()}
            print(f"{str(w_shape):<20} {str(x_shape):<18} {stride[0]:>6} {count:>6} "
                  + " ".join(f"{med[n]:>22.3f}" for n in names)
                  + f" {med['F.conv2d'] / med['packed channels_last']:>8.2f}x")


if __name__ == "__main__":
    main()
