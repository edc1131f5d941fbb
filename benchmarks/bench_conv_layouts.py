"""Per-layer benchmark: how each convolution of a ResNet runs fastest on this CPU.

For every distinct convolution of ResNet-18 or ResNet-50 (batch 8, 64x64 images by default, as in
``bench_optimize.py``; ``--batch 1 --size 224`` for ImageNet-sized single images) it times, in one run with interleaved repetitions (medians, inference mode,
bias + ReLU fused where the op allows):

* ``F.conv2d``:          contiguous input, then an in-place ReLU (what eager PyTorch does);
* ``packed``:            oneDNN's fused op with weights prepacked in its blocked layout, contiguous
                         input, answer copied back to contiguous (``tg.optimize(channels_last=False)``);
* ``packed channels_last``: the same on a channels_last input, answering in channels_last, nothing
                         copied (``tg.optimize``'s default inside a conv stack);
* ``F.conv2d channels_last``: ``F.conv2d`` on a channels_last input;
* ``GEMM channels_last``: the convolution as one MKL GEMM with prepacked weights on the NHWC rows
  (im2col for kernels > 1x1), answering in channels_last (``fused.conv._conv_gemm``);
* ``Winograd channels_last`` (stride-1 3x3 layers, float32, where torchgraph's kernels are built):
  ``ops.winograd_conv2d_inference`` with the filters transformed once (``NOTE: [Winograd convolutions]``).

The ``speed-up`` column is ``F.conv2d`` time / ``packed channels_last`` time, the measurement behind
``NOTE: [Packed channels_last convs]`` in ``torchgraph/fused/weights.py``; ``GEMM/packed`` is ``GEMM
channels_last`` time / ``packed channels_last`` time (below 1: the GEMM is faster), with the output
pixels (``rows``) and whether ``tg.optimize`` picks the GEMM (``NOTE: [Convolutions on few pixels]``);
``Winograd/packed`` the same for Winograd, and ``tiles`` its 2x2 output tiles (``fused.conv.WINOGRAD_MIN_TILES``).

Usage: python benchmarks/bench_conv_layouts.py [--arch resnet18|resnet50] [--threads 2] [--batch 8 --size 64]
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

from torchgraph import _extension, fused, ops  # noqa: E402
from torchgraph.applications import build_resnet, resnet_layers  # noqa: E402


def distinct_convolutions(arch: str, batch: int = 8, size: int = 64) -> dict:
    """(weight shape, input shape, stride, padding) -> how many layers have it."""
    model = build_resnet(resnet_layers(arch, 10), (3, size, size)).eval()
    found: dict = {}

    def record(module, inputs, output):
        key = (tuple(module.weight.shape), tuple(inputs[0].shape), module.stride, module.padding)
        found[key] = found.get(key, 0) + 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size))
    for hook in hooks:
        hook.remove()
    return found


def variants(weight_shape, input_shape, stride, padding) -> dict:
    weight, bias = torch.randn(weight_shape), torch.randn(weight_shape[0])
    x = torch.randn(input_shape)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    packed = fused.weights._pack_conv_weight(weight, padding, stride, (1, 1), 1, input_shape)
    conv = torch.ops.mkldnn._convolution_pointwise
    args = (list(padding), list(stride), [1, 1], 1, "relu", [], "")
    rows = _output_pixels(weight_shape, input_shape, stride, padding)
    fns = {
        "F.conv2d": lambda: F.conv2d(x, weight, bias, stride, padding).relu_(),
        "packed": lambda: conv(x, packed, bias, *args).contiguous(),
        "packed channels_last": lambda: conv(x_cl, packed, bias, *args),
        "F.conv2d channels_last": lambda: F.conv2d(x_cl, weight, bias, stride, padding).relu_(),
        "GEMM channels_last": lambda: fused.conv._conv_gemm(x_cl, weight, bias, stride, padding, rows).relu_(),
    }
    if _winograd_shape(weight_shape, stride):
        filters = ops.winograd_filters(weight)
        fns["Winograd channels_last"] = lambda: ops.winograd_conv2d_inference(
            x_cl, filters, bias, weight_shape[0], padding=padding[0], act="relu")
    return fns


def _winograd_shape(weight_shape, stride) -> bool:
    return _extension.HAS_C_OPS and tuple(weight_shape[2:]) == (3, 3) and tuple(stride) == (1, 1)


def _tiles(weight_shape, input_shape, stride, padding) -> int:
    """2x2 output tiles of a stride-1 3x3 layer (what ``fused.conv.WINOGRAD_MIN_TILES`` counts)."""
    height, width = _output_size(weight_shape, input_shape, stride, padding)
    return input_shape[0] * ((height + 1) // 2) * ((width + 1) // 2)


def _output_size(weight_shape, input_shape, stride, padding) -> tuple[int, int]:
    return tuple((input_shape[i] + 2 * padding[i - 2] - weight_shape[i]) // stride[i - 2] + 1 for i in (2, 3))


def _output_pixels(weight_shape, input_shape, stride, padding) -> int:
    height, width = _output_size(weight_shape, input_shape, stride, padding)
    return input_shape[0] * height * width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.arch}, batch {args.batch}, "
          f"{args.size}x{args.size}; ms")
    names = list(variants((4, 4, 3, 3), (1, 4, 4, 4), (1, 1), (1, 1)))
    print(f"{'weight':<20} {'input':<18} {'stride':>6} {'layers':>6} "
          + " ".join(f"{n:>22}" for n in names) + f" {'speed-up':>9} {'rows':>5} {'GEMM/packed':>11} "
          + f"{'tiles':>5} {'Winograd/packed':>15} picked")
    # no_grad, not inference_mode: weights made under inference_mode are never cached packed (fused/weights.py)
    with torch.no_grad():
        for (w_shape, x_shape, stride, padding), count in distinct_convolutions(args.arch, args.batch,
                                                                                 args.size).items():
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
            winograd = "Winograd channels_last" in med
            print(f"{str(w_shape):<20} {str(x_shape):<18} {stride[0]:>6} {count:>6} "
                  + " ".join(f"{med[n]:>22.3f}" if n in med else f"{'-':>22}" for n in names)
                  + f" {med['F.conv2d'] / med['packed channels_last']:>8.2f}x"
                  + f" {_output_pixels(w_shape, x_shape, stride, padding):>5}"
                  + f" {med['GEMM channels_last'] / med['packed channels_last']:>11.2f}"
                  + (f" {_tiles(w_shape, x_shape, stride, padding):>5}"
                     f" {med['Winograd channels_last'] / med['packed channels_last']:>15.2f}" if winograd
                     else f" {'-':>5} {'-':>15}")
                  + f" {_picked(w_shape, x_shape, stride, padding)}")


def _picked(weight_shape, input_shape, stride, padding) -> str:
    """The kernel ``tg.optimize``'s plan runs for this layer (channels_last, ReLU)."""
    x, weight = torch.empty(input_shape, device="meta"), torch.empty(weight_shape, device="meta")
    if fused.conv._runs_winograd_kernel(x, weight, stride, padding, (1, 1), 1, "relu", True):
        return "Winograd"
    rows = fused.conv._conv_gemm_rows(x, weight, stride, padding, (1, 1), 1)
    return "GEMM" if rows else "oneDNN"


if __name__ == "__main__":
    main()
