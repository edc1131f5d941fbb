"""``tg.optimize`` beside what users would pick instead, on models written the way people write them.

For each model, in one process, with interleaved repetitions (medians), it times:

* ``eager``: the handwritten module (torchvision / timm / nn.TransformerEncoder style, float32);
* ``tg.Model``: ``tg.Model(x, module(x))``, the module recorded as a torchgraph model;
* ``tg.optimize``: ``tg.optimize(model)`` (float32) and ``tg.optimize bf16``:
  ``tg.optimize(model, dtype=torch.bfloat16)`` (float32 in and out, bfloat16 inside);
* ``compile``: ``torch.compile(module)`` (inductor, default) and ``compile freezing`` (with
  ``torch._inductor.config.freezing = True``); their first call is reported apart;
* ``onnxruntime``: ONNX Runtime on ``tg.export_onnx``'s file, all graph optimisations, intra-op
  threads = ``--threads``, spinning off (``session.intra_op.allow_spinning=0``, or its threads steal
  the CPU from the next variant);
* ``openvino f32`` / ``openvino default`` (if ``openvino`` is installed): the same ONNX file,
  ``INFERENCE_PRECISION_HINT=f32`` and the CPU plugin's default (bf16 on AMX CPUs).

With ``--ablate NAME`` (repeatable, or ``all``), each named optimisation of ``tg.optimize`` (float32)
is also timed switched off, as one more interleaved variant ``tg.optimize -NAME``: what that one
optimisation is worth inside the whole model, measured beside everything else (see ``ABLATIONS``).

Variants are interleaved: each repetition times ``--iters`` calls of one variant right after the
other variants ran, so the first call finds the caches full of their weights. ``--warm N`` makes
``N`` untimed calls first, which times each variant back to back, as a serving loop calls one model
(both are reported in docs/optimize.md). Every variant runs under ``torch.inference_mode()``; ``--no-grad``
times them under ``torch.no_grad()`` instead, as most inference code calls a model (autograd's dispatch
then runs on every op: NOTE: [No backward in C++] in csrc/no_backward.cpp).

The process keeps freed memory for reuse (``tg.retain_freed_memory()``, as preloading jemalloc or
tcmalloc would), so that no variant pays for page faults that depend on what ran before it (NOTE:
[Page faults from freed memory]: the GPT stack took 33-36 ms instead of 20-22 ms in tg.optimize, 49-54
instead of 41-45 ms in eager, with glibc's defaults in some processes); ``--default-malloc`` keeps
glibc's defaults, and ``--large-blocks`` keeps blocks above glibc's 32 MiB cap too (NOTE: [Blocks above
glibc's cap]: LLM logits).

With ``--device cuda`` every variant runs on the GPU: the modules are recorded on the CPU, moved there,
and ``tg.optimize`` is called on the moved model (as a user who moved the model first would call it);
timings wait for the GPU (``torch.cuda.synchronize``) after each repetition's calls, and ``--threads`` is
moot. There the GPU's other choices are timed beside its defaults (NOTE: [Passes on a GPU]): the other
layout (``channels_last``), the conv/linear + activation wrappers skipped too, and every pass run as on the
CPU; and ``eager TF32 off``, eager with TF32 disabled, whose error column shows how far TF32 (cuDNN's default
for convolutions) moves eager itself (NOTE: [TF32 control]).
ONNX Runtime runs only if its CUDA provider is installed (inputs and outputs through host memory, as
``session.run`` does); OpenVINO is CPU-only and skipped.

Every variant's output is compared with eager float32 on the same input: max abs error, max error
relative to the largest eager output, and (classifiers) top-1 agreement. Speed-up = eager time /
variant time (> 1 is faster).

Usage::

    python benchmarks/bench_peers.py                      # every model, 2 threads
    python benchmarks/bench_peers.py --community all      # the community models: eager vs tg.optimize
    python benchmarks/bench_peers.py --only resnet50_b8 --only gpt --reps 15
    python benchmarks/bench_peers.py --no-compile --no-openvino --markdown
    python benchmarks/bench_peers.py --only resnet50_b8 --no-compile --no-onnx --no-openvino --ablate all
    python benchmarks/bench_peers.py --device cuda --no-openvino       # on the GPU

Models: ``resnet50_b8`` (torchvision ResNet-50, b8 64x64), ``resnet50_b1`` (b1 224x224),
``mobilenetv2_b8`` / ``mobilenetv2_b1`` (torchvision MobileNetV2, same sizes), ``gpt`` (4 pre-LN
blocks d256, t128, b8), ``encoder`` (4 x nn.TransformerEncoderLayer d256, t128, b8), ``vit_s``
(timm-style ViT-S/16, b1 224x224).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torchgraph as tg  # noqa: E402
from torchgraph.fused import cpu_profile  # noqa: E402
from handwritten import (EncoderClassifier, HandGPT, TimmViT, TorchvisionMobileNetV2,  # noqa: E402
                         TorchvisionResNet, randomize_batchnorm)
from peer_ablations import (ABLATIONS, _ablated_variants, _CalledUnder, _never, _no_pass, _no_plan,  # noqa: E402, F401
                            _patched)
from torchgraph.applications import GPTBlock  # noqa: E402
from torchgraph.passes import bfloat16_supported  # noqa: E402

OPTIMIZE = sys.modules["torchgraph.optimize"]  # the module (tg.optimize is the function)


def _no_autograd(args):
    """What every variant is timed under: ``torch.inference_mode()``, or ``torch.no_grad()`` with ``--no-grad``
    (autograd's dispatch still runs there: NOTE: [No backward in C++] in csrc/no_backward.cpp)."""
    return torch.no_grad() if getattr(args, "no_grad", False) else torch.inference_mode()


def _models() -> dict:
    """name -> (build the eager module, input shape without batch, batch, is a classifier)."""
    return {
        "resnet50_b8": (lambda: randomize_batchnorm(TorchvisionResNet()), (3, 64, 64), 8, True),
        "resnet50_b1": (lambda: randomize_batchnorm(TorchvisionResNet()), (3, 224, 224), 1, True),
        "mobilenetv2_b8": (lambda: randomize_batchnorm(TorchvisionMobileNetV2()), (3, 64, 64), 8, True),
        "mobilenetv2_b1": (lambda: randomize_batchnorm(TorchvisionMobileNetV2()), (3, 224, 224), 1, True),
        "gpt": (lambda: HandGPT([GPTBlock(256, 4) for _ in range(4)]), (128, 256), 8, False),
        "encoder": (lambda: EncoderClassifier(256, 4, 4), (128, 256), 8, False),
        "vit_s": (lambda: TimmViT(), (3, 224, 224), 1, True),
    }


def _timed_first_call(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def _onnx_variants(model: tg.Model, x: torch.Tensor, args, tmp: str) -> tuple[dict, dict]:
    fns, first = {}, {}
    path = os.path.join(tmp, "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        tg.export_onnx(model.cpu() if x.device.type != "cpu" else model, path, verify=False)
        model.to(x.device)
    export_s = time.perf_counter() - start
    feed_name = None
    if args.onnx:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        on_gpu = x.device.type == "cuda"
        if on_gpu and "CUDAExecutionProvider" not in ort.get_available_providers():
            print("  (onnxruntime has no CUDA provider here: pip install onnxruntime-gpu; skipped)")
        else:
            provider = "CUDAExecutionProvider" if on_gpu else "CPUExecutionProvider"
            session = ort.InferenceSession(path, options, providers=[provider])
            feed_name = session.get_inputs()[0].name
            data = x.cpu().numpy()
            label = "onnxruntime cuda" if on_gpu else "onnxruntime"
            fns[label] = lambda _: torch.from_numpy(session.run(None, {feed_name: data})[0]).to(x.device)
            first[label] = export_s
    if args.openvino and x.device.type != "cpu":
        print("  (openvino runs on the CPU: skipped on the GPU)")
    elif args.openvino:
        try:
            import openvino as ov
        except ImportError:
            print("  (openvino not installed: pip install openvino)")
            return fns, first
        core = ov.Core()
        for label, config in (("openvino f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("openvino default", {})):
            config = dict(config, INFERENCE_NUM_THREADS=args.threads)
            start = time.perf_counter()
            compiled = core.compile_model(path, "CPU", config)
            first[label] = export_s + time.perf_counter() - start
            request = compiled.create_infer_request()
            data = x.numpy()
            fns[label] = (lambda req: lambda _: torch.from_numpy(req.infer([data])[0].copy()))(request)
    return fns, first


def _gpu_variants() -> list:
    """The GPU's other choices, timed beside its defaults (NOTE: [Passes on a GPU] in torchgraph/optimize.py):
    (label, tg.optimize's keyword arguments, patches held while it runs)."""
    without_wrappers = dict(OPTIMIZE.GPU_SKIPPED_PASSES, fuse_conv_act="", fuse_linear_act="")
    return [(f"tg.optimize channels_last={not OPTIMIZE.GPU_CHANNELS_LAST}",
             {"channels_last": not OPTIMIZE.GPU_CHANNELS_LAST}, []),
            ("tg.optimize -conv/linear wrappers", {}, [(OPTIMIZE, "GPU_SKIPPED_PASSES", without_wrappers)]),
            ("tg.optimize CPU passes", {"channels_last": True}, [(OPTIMIZE, "GPU_SKIPPED_PASSES", {})])]


@contextlib.contextmanager
def _tf32_off():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _tf32_control(eager, device: str) -> dict:
    """``{"eager TF32 off": eager called with TF32 disabled}`` on a GPU where TF32 is on, else nothing.

    NOTE: [TF32 control] cuDNN convolutions default to TF32 (10-bit mantissas): every variant's error
    against eager includes TF32's rounding, which this row shows for eager itself."""
    if device == "cuda" and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return {"eager TF32 off": _CalledUnder(eager, _tf32_off)}
    return {}


def _accuracy(out: torch.Tensor, ref: torch.Tensor, classifier: bool) -> str:
    out, ref = out.float().reshape(ref.shape), ref.float()
    err = (out - ref).abs().max().item()
    rel = err / max(ref.abs().max().item(), 1e-12)
    text = f"{err:9.1e} {rel:8.1e}"
    if classifier:
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        text += f" {agree * 100:5.0f}%"
    return text


def bench(name: str, args) -> list[tuple]:
    build, shape, batch, classifier = _models()[name]
    torch.manual_seed(0)
    eager = build().eval()
    x_sym = tg.Input(shape=shape)
    model = tg.Model(x_sym, eager(x_sym)).eval()
    eager.to(args.device)
    model.to(args.device)
    fns = {"eager": eager, "tg.Model": model}
    first = {}
    variants = [("tg.optimize", {}, []), ("tg.optimize bf16", {"dtype": torch.bfloat16}, [])]
    if args.device != "cpu":
        variants += _gpu_variants()
    for label, options, patches in variants:
        start = time.perf_counter()
        with _patched(patches):
            fns[label] = tg.optimize(model, **options)
        first[label] = time.perf_counter() - start
    x = torch.randn(batch, *shape).to(args.device)
    fns.update(_tf32_control(eager, args.device))
    more, more_first = _ablated_variants(model, args.ablate)
    fns.update(more)
    first.update(more_first)
    with tempfile.TemporaryDirectory() as tmp, _no_autograd(args):
        if args.compile:
            import torch._inductor.config as inductor_config

            for label, freezing in (("compile", False), ("compile freezing", True)):
                torch._dynamo.reset()
                with inductor_config.patch(freezing=freezing):
                    compiled = torch.compile(eager)
                    first[label] = _timed_first_call(compiled, x)
                fns[label] = _CalledUnder(compiled, lambda freezing=freezing: inductor_config.patch(freezing=freezing))
        if args.onnx or args.openvino:
            more, more_first = _onnx_variants(model, x, args, tmp)
            fns.update(more)
            first.update(more_first)
        ref = eager(x)
        outputs = {k: fn(x) for k, fn in fns.items()}
        for fn in fns.values():
            fn(x)
        times = _interleaved({k: (lambda fn=fn: fn(x)) for k, fn in fns.items()}, args)
        _check_device(outputs, args.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["eager"]
    rows = []
    for k in fns:
        spread = (base / max(times[k]), base / min(times[k]))
        rows.append((name, k, med[k] * 1e3, base / med[k], spread, first.get(k),
                     _accuracy(outputs[k], ref, classifier)))
    return rows


def _leaves(out) -> list:
    if isinstance(out, torch.Tensor) or type(out).__name__ == "SymbolicTensor":
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [leaf for item in out for leaf in _leaves(item)]
    return []


def bench_community(name: str, args) -> list[tuple]:
    """One community architecture (tests/community_models, benchmark size): eager, tg.Model and
    tg.optimize (float32 and bf16, and the ``--ablate`` variants) only, for the "never slower" rows."""
    from community_models import BENCHMARK_ARCHITECTURES, input_symbol

    arch = BENCHMARK_ARCHITECTURES[name]
    eager = arch.make_model().eval()
    inputs = [tg.Input(shape=tuple(arch.seq_len if d is None else d for d in spec.shape), dtype=spec.dtype,
                       name=input_symbol(spec.name)) for spec in arch.inputs]
    outs = _leaves(eager(*inputs))
    model = tg.Model(inputs if len(inputs) > 1 else inputs[0], outs if len(outs) > 1 else outs[0]).eval()
    eager.to(args.device)
    model.to(args.device)
    first = {}
    start = time.perf_counter()
    fast = tg.optimize(model)
    first["tg.optimize"] = time.perf_counter() - start
    start = time.perf_counter()
    fast_bf16 = tg.optimize(model, dtype=torch.bfloat16)
    first["tg.optimize bf16"] = time.perf_counter() - start
    data = [t.to(args.device) for t in arch.make_inputs()]
    fns = {"eager": lambda: _leaves(eager(*data))[0], "tg.Model": lambda: _first(model(*data)),
           "tg.optimize": lambda: _first(fast(*data)), "tg.optimize bf16": lambda: _first(fast_bf16(*data))}
    fns.update(_tf32_control(fns["eager"], args.device))
    ablated, ablated_first = _ablated_variants(model, args.ablate)
    fns.update({k: (lambda fn=fn: _first(fn(*data))) for k, fn in ablated.items()})
    first.update(ablated_first)
    with _no_autograd(args):
        ref = fns["eager"]()
        outputs = {k: fn() for k, fn in fns.items()}
        times = _interleaved(fns, args)
        _check_device(outputs, args.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["eager"]
    classifier = ref.dim() == 2
    return [(name, k, med[k] * 1e3, base / med[k], (base / max(times[k]), base / min(times[k])), first.get(k),
             _accuracy(outputs[k], ref, classifier)) for k in fns]


def _interleaved(fns: dict, args) -> dict:
    """``{variant: [seconds per call, one per repetition]}`` for zero-argument ``fns``: ``args.reps``
    repetitions, every variant in turn (the same machine state for all), each ``args.warm`` untimed
    calls (this variant's weights back in the caches) then ``args.iters`` timed ones.

    NOTE: [Rotated order] Each repetition starts one variant later (the order rotates), so that every
    variant runs in every position and none always follows the same neighbour. Even so, variants doing
    identical work (ablations of rewrites a model does not use) read up to ~8% apart in one run on this
    2-core VM (2026-12-02, ViT: full tg.optimize 1.86x, ablations that change nothing 1.92-1.98x, in a
    fixed order 1.76-1.89x against 1.87-2.01x), while four identical optimized copies timed alone read
    within 3%: ablation effects below ~8% need several processes, and the control rows beside them."""
    sync = torch.cuda.synchronize if args.device == "cuda" else _no_pass
    times = {k: [] for k in fns}
    order = list(fns)
    for rep in range(args.reps):
        shift = rep % len(order)
        for k in order[shift:] + order[:shift]:
            fn = fns[k]
            for _ in range(args.warm):
                fn()
            sync()
            start = time.perf_counter()
            for _ in range(args.iters):
                fn()
            sync()
            times[k].append((time.perf_counter() - start) / args.iters)
    return times


def _check_device(outputs: dict, device: str) -> None:
    """Every variant answered on ``device``: one that ran on the CPU behind the caller's back is a bug."""
    wrong = {k: str(out.device) for k, out in outputs.items() if out.device.type != device}
    if wrong:
        raise SystemExit(f"bench_peers: variants answered on another device than {device}: {wrong}")


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _print(rows: list[tuple], markdown: bool) -> None:
    if markdown:
        print("| model | variant | ms | speed-up (range) | first call / optimize s | max abs err | max rel err | top-1 |")
        print("|---|---|---|---|---|---|---|---|")
    for name, variant, ms, speedup, (low, high), first, accuracy in rows:
        first_text = f"{first:.2f}" if first is not None else "-"
        fields = accuracy.split()
        if markdown:
            top1 = fields[2] if len(fields) > 2 else "-"
            print(f"| {name} | {variant} | {ms:.2f} | {speedup:.2f}x ({low:.2f}-{high:.2f}) | {first_text} | "
                  f"{fields[0]} | {fields[1]} | {top1} |")
        else:
            print(f"  {variant:<30} {ms:9.2f} ms  {speedup:5.2f}x ({low:4.2f}-{high:4.2f})  "
                  f"first {first_text:>6}  err {accuracy}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(_models()), help="models to run (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where every variant runs (cuda: the models are moved there, then optimized)")
    parser.add_argument("--reps", type=int, default=11, help="interleaved repetitions (median)")
    parser.add_argument("--iters", type=int, default=3, help="calls per repetition")
    parser.add_argument("--warm", type=int, default=0,
                        help="untimed calls before each repetition's timed calls (0: every repetition starts "
                             "with the other variants' weights in the caches; 1 or more: back-to-back timing)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false")
    parser.add_argument("--no-openvino", dest="openvino", action="store_false")
    parser.add_argument("--markdown", action="store_true", help="print one markdown table")
    parser.add_argument("--community", action="append", default=None, metavar="NAME",
                        help="a tests/community_models benchmark architecture (eager vs tg.optimize only; "
                             "'all' for every one); repeatable")
    parser.add_argument("--ablate", action="append", default=[], choices=sorted(ABLATIONS) + ["all"],
                        help="also time tg.optimize with this optimisation switched off (repeatable; "
                             "'all' for every one): " + "; ".join(f"{k}: {v[0]}" for k, v in ABLATIONS.items()))
    parser.add_argument("--no-grad", action="store_true",
                        help="time every variant under torch.no_grad() (how most inference code calls a model) "
                             "instead of torch.inference_mode(), which skips autograd's dispatch altogether")
    parser.add_argument("--default-malloc", dest="retain", action="store_false",
                        help="keep glibc's malloc defaults (freed memory given back to the OS, page faults on reuse)")
    parser.add_argument("--large-blocks", action="store_true",
                        help="also keep blocks above glibc's 32 MiB cap (retain_freed_memory(large_blocks=True): "
                             "a language model's logits)")
    args = parser.parse_args()
    args.ablate = list(ABLATIONS) if "all" in args.ablate else list(dict.fromkeys(args.ablate))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    torch.set_num_threads(args.threads)
    retained = args.retain and tg.retain_freed_memory(large_blocks=args.large_blocks)
    load = os.getloadavg()
    _, why = bfloat16_supported()
    vendor = cpu_profile.cpu_vendor() or "unknown vendor"
    routes = "MKL and oneDNN" if cpu_profile.MKL_GEMMS_FAST else "oneDNN only"
    print(f"torch {torch.__version__}, {args.threads} threads, bf16: {why}, CPU: {vendor} (GEMMs placed on "
          f"{routes}), freed memory {'retained' if retained else 'given back (glibc defaults)'}"
          f"{' (blocks above 32 MiB too)' if retained and args.large_blocks else ''}, "
          f"load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} ({os.cpu_count()} CPUs)")
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {props.name}, {props.multi_processor_count} SMs, CUDA {torch.version.cuda}, cuDNN "
              f"{torch.backends.cudnn.version()}, TF32 in convolutions {torch.backends.cudnn.allow_tf32}, in "
              f"matmuls {torch.backends.cuda.matmul.allow_tf32}, bf16: {tg.passes.cuda_bfloat16_supported(0)[1]}")
    rows = []
    runs = [(name, bench) for name in (args.only or ([] if args.community else list(_models())))]
    if args.community:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from community_models import BENCHMARK_ARCHITECTURES

        names = list(BENCHMARK_ARCHITECTURES) if "all" in args.community else args.community
        runs += [(name, bench_community) for name in names]
    for name, run in runs:
        result = run(name, args)
        if not args.markdown:
            print(f"\n{name}   (variant, median ms, speed-up over eager (range over reps), first call s, "
                  "max abs err, max rel err, top-1 agreement)")
            _print(result, markdown=False)
        rows += result
    if args.markdown:
        _print(rows, markdown=True)
    load = os.getloadavg()
    print(f"load average at end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
