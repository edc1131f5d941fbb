"""The GEMMs of a trainable linear layer on MKL (addmm/mm) vs oneDNN, on the GPT block's shapes.

For the four linear layers of the benchmark GPT block (d=256, 1024 token rows: qkv 256->768, proj
256->256, fc1 256->1024, fc2 1024->256) it times, in one run with interleaved repetitions (medians,
no autograd), the three products of a training step:

* forward      y = x @ W^T + b      MKL ``torch.addmm``  vs oneDNN ``mkldnn._linear_pointwise``
* input grad   g @ W                MKL ``torch.mm``     vs oneDNN (``W.t()`` as the weight)
* weight grad  g^T @ x              MKL ``torch.mm``     vs oneDNN (``x.t()`` as the weight)

and prints MKL time / oneDNN time (> 1: oneDNN faster). This is the measurement behind
``NOTE: [oneDNN GEMMs in training]`` in ``torchgraph/fused/linear.py``.

With ``--inference`` it times instead the inference forward of each layer (with the GELU of fc1),
three ways: ``F.linear`` (MKL ``addmm``) then the activation, MKL's prepacked GEMM
(``mkl._mkl_linear``, what inductor's freezing uses for float32) then the activation, and oneDNN's
fused ``_linear_pointwise``, from the plain weight and from the weight reordered once for it (what
``tg.optimize`` runs, NOTE: [Packed linear weights]); the encoder's feed-forward shapes (256 -> 2048
-> 256) are added. With ``--vit`` the shapes are ViT-S's at batch 1 instead (197 token rows, d=384:
qkv 384->1152, proj 384->384, fc1 384->1536 + GELU, fc2 1536->384), where MKL's packed GEMM is what
``tg.optimize`` runs (NOTE: [MKL for a few hundred rows]). ``--cpu-time`` times process CPU time
instead of wall-clock time, for a machine loaded by others (run it with ``OMP_WAIT_POLICY=PASSIVE``
so that waiting threads sleep instead of spinning).

With ``--small`` it times the small linears of NOTE: [Small linears] in ``torchgraph/fused/linear.py``
(8 and 64 rows, 16 to 1024 features in and out): ``F.linear`` then an in-place ReLU against oneDNN's
fused ``_linear_pointwise`` with the ReLU in its epilogue, and prints oneDNN time / F.linear time
beside the multiply-adds per call (rows x in x out; ``ONEDNN_LINEAR_MIN_MACS`` is the cut).

With ``--epilogues`` it times each activation in oneDNN's epilogue against oneDNN with no post-op and ATen's
activation in place after it, for a linear and a convolution (NOTE: [Activations after oneDNN on AVX2] in
``torchgraph/fused/_common.py``), and prints after / fused (below 1: running it after is faster).

With ``--kernel`` it times ``tg.optimize``'s float32 inference linear (``fused.linear_act``) two ways, on
torchgraph's GEMM kernel (``ops.gemm_act_inference``, the activation in its epilogue) and on oneDNN's fused
linear from the reordered weight, for the GPT block, nn.TransformerEncoderLayer, BERT-base, ViT-S at batch 1
and ViT-B at batch 8 and short sums, and prints kernel time / oneDNN time with the quartiles of the
repetitions' paired ratios and whether ``tg.optimize`` routes the shape to the kernel on an AVX2 CPU
(NOTE: [Linears on the GEMM kernel] in ``torchgraph/fused/linear.py``; needs torchgraph._C).

Usage: python benchmarks/bench_gemm.py [--threads 2] [--reps 15] [--inference [--bf16] [--vit] | --small | --epilogues
       | --kernel] [--cpu-time]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {"qkv": (256, 768), "proj": (256, 256), "fc1": (256, 1024), "fc2": (1024, 256)}
ROWS = 8 * 128


def products(n_in: int, n_out: int) -> dict:
    x, w, b, g = torch.randn(ROWS, n_in), torch.randn(n_out, n_in), torch.randn(n_out), torch.randn(ROWS, n_out)
    onednn = torch.ops.mkldnn._linear_pointwise
    return {
        "forward": (lambda: torch.addmm(b, x, w.t()), lambda: onednn(x, w, b, "none", [], "")),
        "input grad": (lambda: torch.mm(g, w), lambda: onednn(g, w.t(), None, "none", [], "")),
        "weight grad": (lambda: torch.mm(g.t(), x), lambda: onednn(g.t(), x.t(), None, "none", [], "")),
    }


INFERENCE_SHAPES = dict(SHAPES, ff1=(256, 2048), ff2=(2048, 256))
VIT_SHAPES = {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)}
VIT_ROWS = 197
_clock = time.perf_counter


def inference_variants(n_in: int, n_out: int, act: str, dtype=torch.float32, rows: int = ROWS) -> dict:
    x, w, b = (t.to(dtype) for t in (torch.randn(rows, n_in), torch.randn(n_out, n_in) * n_in ** -0.5,
                                      torch.randn(n_out)))
    reordered = torch.ops.mkldnn._reorder_linear_weight(w)  # what tg.optimize runs (fused/weights.py)
    activation = torch.nn.functional.gelu if act == "gelu" else (lambda y: y)
    variants = {
        "F.linear": lambda: activation(torch.nn.functional.linear(x, w, b)),
        "oneDNN fused": lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, act, [], "none" if act == "gelu" else ""),
        "oneDNN reordered": lambda: torch.ops.mkldnn._linear_pointwise(x, reordered, b, act, [],
                                                                       "none" if act == "gelu" else ""),
    }
    if dtype == torch.float32:  # MKL's packed GEMM is float32 only
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
        variants["MKL packed"] = lambda: activation(torch.ops.mkl._mkl_linear(x, packed, w, b, rows))
    return variants


def _interleaved(cases: dict, reps: int, calls: int, alternate: bool = False) -> dict:
    """``{case: {variant: [seconds per call, one per repetition]}}``: each variant of ``cases``
    (``{case: {variant: fn}}``) run once, then ``reps`` interleaved repetitions of ``calls`` calls each,
    without autograd. ``alternate``: every other repetition runs each case's variants in reverse order."""
    times = {case: {name: [] for name in fns} for case, fns in cases.items()}
    with torch.no_grad():
        for fns in cases.values():
            for fn in fns.values():
                fn()
        for rep in range(reps):  # interleaved
            for case, fns in cases.items():
                order = list(fns.items())
                for name, fn in (order[::-1] if alternate and rep % 2 else order):
                    start = _clock()
                    for _ in range(calls):
                        fn()
                    times[case][name].append((_clock() - start) / calls)
    return times


def inference_main(reps: int, dtype, shapes: dict = INFERENCE_SHAPES, rows: int = ROWS) -> None:
    cases = {layer: inference_variants(*shape, "gelu" if layer == "fc1" else "none", dtype, rows)
             for layer, shape in shapes.items()}
    names = list(next(iter(cases.values())))
    times = _interleaved(cases, reps, calls=5)
    print(f"{'layer':<6} " + " ".join(f"{n:>16}" for n in names) + "   (ms, medians)")
    for layer, samples in times.items():
        print(f"{layer:<6} " + " ".join(f"{statistics.median(samples[n]) * 1e3:16.3f}" for n in names))


def epilogue_main(reps: int) -> None:
    """Each activation in oneDNN's epilogue against oneDNN with none and ATen's activation in place after it,
    on the GPT block's fc1 (1024 x 256 -> 1024) and a 3x3 64 -> 64 channels_last convolution at 8 x 32 x 32
    (NOTE: [Activations after oneDNN on AVX2] in torchgraph/fused/_common.py)."""
    from torchgraph.fused._common import _IN_PLACE_FNS, ONEDNN_ACTIVATIONS
    from torchgraph.fused.weights import _packed_weight

    x, w, b = torch.randn(ROWS, 256), torch.randn(1024, 256) * 256 ** -0.5, torch.randn(1024)
    reordered = torch.ops.mkldnn._reorder_linear_weight(w)
    image = torch.randn(8, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    filters, conv_bias = torch.randn(64, 64, 3, 3) * 0.05, torch.randn(64)
    packed = _packed_weight(filters, [1, 1], [1, 1], [1, 1], 1, image.shape)
    linear, conv = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._convolution_pointwise
    cases = {}
    for act, post_op in ONEDNN_ACTIVATIONS.items():
        if act == "none":
            continue
        after = _IN_PLACE_FNS[act]
        cases[act] = {
            "linear fused": lambda post_op=post_op: linear(x, reordered, b, *post_op),
            "linear after": lambda after=after: after(linear(x, reordered, b, "none", [], "")),
            "conv fused": lambda post_op=post_op: conv(image, packed, conv_bias, [1, 1], [1, 1], [1, 1], 1, *post_op),
            "conv after": lambda after=after: after(conv(image, packed, conv_bias, [1, 1], [1, 1], [1, 1], 1,
                                                         "none", [], "")),
        }
    # NOTE: the variant timed first in a case ran ~15% slower here, whichever it was, so each case's order
    # alternates from one repetition to the next (each fused / after pair swaps which runs first).
    times = _interleaved(cases, reps, calls=5, alternate=True)
    print(f"{'activation':<12} {'linear fused':>12} {'after':>8} {'after/fused':>11} {'conv fused':>11} {'after':>8} "
          f"{'after/fused':>11}   (ms, medians)")
    for act, samples in times.items():
        m = {name: statistics.median(t) * 1e3 for name, t in samples.items()}
        print(f"{act:<12} {m['linear fused']:12.3f} {m['linear after']:8.3f} {m['linear after'] / m['linear fused']:11.2f} "
              f"{m['conv fused']:11.3f} {m['conv after']:8.3f} {m['conv after'] / m['conv fused']:11.2f}")


SMALL_ROWS = (8, 64)
SMALL_FEATURES = (16, 64, 256, 1024)


def small_main(reps: int) -> None:
    cases = {}
    for rows in SMALL_ROWS:
        for n in SMALL_FEATURES:
            x, w, b = torch.randn(rows, n), torch.randn(n, n) * n ** -0.5, torch.randn(n)
            cases[(rows, n)] = {
                "F.linear+relu_": (lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b).relu_()),
                "oneDNN fused": (lambda x=x, w=w, b=b: torch.ops.mkldnn._linear_pointwise(x, w, b, "relu", [], "")),
            }
    times = _interleaved(cases, reps, calls=20)
    print(f"{'rows':>5} {'features':>8} {'MACs':>10} {'F.linear+relu_ us':>18} {'oneDNN fused us':>16} {'oneDNN/F.linear':>16}")
    for (rows, n), samples in times.items():
        eager, onednn = (statistics.median(samples[k]) * 1e6 for k in ("F.linear+relu_", "oneDNN fused"))
        print(f"{rows:>5} {n:>8} {rows * n * n:>10} {eager:>18.1f} {onednn:>16.1f} {onednn / eager:>16.2f}")


# (name, rows, in_features, out_features, act): what the models run, and where the kernel lost
KERNEL_SHAPES = [
    ("GPT qkv", 1024, 256, 768, "none"), ("GPT proj", 1024, 256, 256, "none"), ("GPT fc1", 1024, 256, 1024, "gelu"),
    ("GPT fc2", 1024, 1024, 256, "none"), ("encoder fc1", 1024, 256, 1024, "relu"),
    ("BERT-base qkv", 1024, 768, 2304, "none"), ("BERT-base fc1", 1024, 768, 3072, "gelu"),
    ("BERT-base fc2", 1024, 3072, 768, "none"), ("ViT-S b1 qkv", 197, 384, 1152, "none"),
    ("ViT-S b1 fc1", 197, 384, 1536, "gelu"), ("head b8", 8, 2048, 1000, "none"),
    ("ViT-B b8 qkv", 1576, 384, 1152, "none"), ("ViT-B b8 fc1", 1576, 384, 1536, "gelu"),
    ("2048 rows", 2048, 256, 768, "none"), ("short 32", 1024, 32, 128, "relu"), ("short 128", 1024, 128, 512, "none"),
    ("short 16", 1024, 16, 64, "relu"), ("short 64", 1024, 64, 256, "gelu"), ("8192 rows", 8192, 256, 256, "none"),
    ("4096 x 512", 4096, 512, 2048, "gelu"), ("ViT-Ti b8 qkv", 520, 192, 576, "none"),
    ("ViT-Ti b8 fc1", 520, 192, 768, "gelu"), ("ViT-Ti b8 fc2", 520, 768, 192, "none"),
]


def kernel_main(reps: int) -> None:
    from torchgraph import _extension, fused

    if not _extension.HAS_C_OPS:
        raise SystemExit("--kernel needs torchgraph._C (python -m torchgraph build-kernels)")
    knobs = ("KERNEL_MAX_ROWS", "KERNEL_MIN_FEATURES", "KERNEL_MAX_OUTPUT")
    saved = {knob: getattr(fused.linear, knob) for knob in knobs}
    routed = {name: fused.linear._on_gemm_kernel(rows, n_in, n_out) if saved["KERNEL_MAX_ROWS"] else "not AVX2"
              for name, rows, n_in, n_out, _ in KERNEL_SHAPES}
    forced = {True: dict(KERNEL_MAX_ROWS=1 << 62, KERNEL_MIN_FEATURES=0, KERNEL_MAX_OUTPUT=1 << 62),
              False: dict(saved, KERNEL_MAX_ROWS=0)}

    def on(kernel: bool, x, w, b, act):
        def run():
            for knob, value in forced[kernel].items():
                setattr(fused.linear, knob, value)
            try:
                return fused.linear_act(x, w, b, act)
            finally:
                for knob, value in saved.items():
                    setattr(fused.linear, knob, value)
        return run

    cases = {}
    for name, rows, n_in, n_out, act in KERNEL_SHAPES:
        x, w, b = torch.randn(rows, n_in), torch.randn(n_out, n_in) * n_in ** -0.5, torch.randn(n_out)
        cases[name] = {"kernel": on(True, x, w, b, act), "oneDNN": on(False, x, w, b, act)}
    times = _interleaved(cases, reps, calls=5, alternate=True)
    print(f"{'layer':<14} {'rows x in -> out':>18} {'kernel ms':>10} {'oneDNN ms':>10} {'kernel/oneDNN':>14} "
          f"{'paired q1-q3':>13}  routed to the kernel")
    for name, rows, n_in, n_out, act in KERNEL_SHAPES:
        kernel, onednn = times[name]["kernel"], times[name]["oneDNN"]
        ratios = sorted(k / o for k, o in zip(kernel, onednn))
        ratio = statistics.median(kernel) / statistics.median(onednn)
        print(f"{name:<14} {f'{rows} x {n_in} -> {n_out}':>18} {statistics.median(kernel) * 1e3:10.3f} "
              f"{statistics.median(onednn) * 1e3:10.3f} {ratio:13.2f}x {ratios[len(ratios) // 4]:6.2f}-"
              f"{ratios[3 * len(ratios) // 4]:.2f}  {routed[name]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--inference", action="store_true", help="inference forward: F.linear, MKL packed, oneDNN")
    parser.add_argument("--bf16", action="store_true", help="with --inference: bfloat16 tensors (no MKL column)")
    parser.add_argument("--small", action="store_true", help="small linears: F.linear + ReLU vs oneDNN fused")
    parser.add_argument("--vit", action="store_true", help="with --inference: ViT-S's shapes, 197 rows")
    parser.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall-clock time")
    parser.add_argument("--epilogues", action="store_true",
                        help="each activation in oneDNN's epilogue vs after it (linear and convolution)")
    parser.add_argument("--kernel", action="store_true",
                        help="float32 inference linears on torchgraph's GEMM kernel vs oneDNN's fused linear")
    args = parser.parse_args()
    global _clock
    _clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.epilogues:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}")
        epilogue_main(args.reps)
        return
    if args.kernel:
        import torchgraph

        torchgraph.retain_freed_memory()  # as bench_peers.py: no page faults from freed outputs
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}")
        kernel_main(args.reps)
        return
    if args.small:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        small_main(args.reps)
        return
    rows = VIT_ROWS if args.vit and args.inference else ROWS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rows} rows; ms")
    if args.inference:
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        inference_main(args.reps, dtype, *((VIT_SHAPES, VIT_ROWS) if args.vit else ()))
        return
    cases = {(layer, kind): dict(zip(("MKL", "oneDNN"), pair))
             for layer, shape in SHAPES.items() for kind, pair in products(*shape).items()}
    times = _interleaved(cases, args.reps, calls=5)
    totals: dict = {}
    print(f"{'layer':<6} {'product':<12} {'MKL':>8} {'oneDNN':>8} {'MKL/oneDNN':>11}")
    for (layer, kind), samples in times.items():
        a, b = (statistics.median(samples[name]) * 1e3 for name in ("MKL", "oneDNN"))
        total = totals.setdefault(kind, [0.0, 0.0])
        total[0], total[1] = total[0] + a, total[1] + b
        print(f"{layer:<6} {kind:<12} {a:8.3f} {b:8.3f} {a / b:10.2f}x")
    for kind, (a, b) in totals.items():
        print(f"{'all':<6} {kind:<12} {a:8.3f} {b:8.3f} {a / b:10.2f}x")


if __name__ == "__main__":
    main()
