"""Export time of tg.export_onnx for ResNet-50 and a GPT stack: dynamo vs legacy exporter.

Run: ``PYTHONPATH=. python benchmarks/bench_export.py [--repeats 2] [--no-verify]``.
Each configuration is exported ``--repeats`` times in this process (the first dynamo export also
pays the one-off import and registry set-up, reported separately as "first").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import torchgraph as tg
from torchgraph.applications import gpt_stack, resnet50

__all__ = ["main"]


def _time_export(model, path, exporter, verify, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tg.export_onnx(model, path, exporter=exporter, verify=verify)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-verify", action="store_true", help="time the export alone")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    models = {
        "ResNet-50 (3x224x224, dynamic batch)": resnet50(),
        "GPT stack (4 blocks, d=256, dynamic batch+seq)": gpt_stack(4, 256, 4, seq_len=None),
    }
    verify = not args.no_verify
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, verify={verify}")
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: imports and the ONNX op registry (a one-off cost of the first dynamo export).
        x = tg.Input(shape=(4,))
        start = time.perf_counter()
        tg.export_onnx(tg.Model(x, torch.nn.Linear(4, 2)(x)), os.path.join(tmp, "warm.onnx"))
        print(f"first dynamo export in the process (tiny model): {time.perf_counter() - start:.2f} s")
        print(f"{'model':50s} {'exporter':8s} {'seconds (each run)':>22s} {'MB':>8s}")
        for name, model in models.items():
            for exporter in ("dynamo", "legacy"):
                path = os.path.join(tmp, "model.onnx")
                times = _time_export(model, path, exporter, verify, args.repeats)
                size = os.path.getsize(path) / 2**20
                runs = ", ".join(f"{t:.2f}" for t in times)
                print(f"{name:50s} {exporter:8s} {runs:>22s} {size:8.1f}", flush=True)


if __name__ == "__main__":
    main()
