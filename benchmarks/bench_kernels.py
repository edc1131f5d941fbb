"""Benchmark of the fused kernels in torchgraph.ops against eager PyTorch and torch.compile.

For each fused op at a realistic size this prints the median time of:

* eager:    the same computation in plain PyTorch (what the op replaces);
* fused:    torchgraph.ops.<op> (the compiled C++/CUDA kernel);
* compiled: torch.compile of the eager function (steady state; the first call,
            which includes compilation, is reported separately);
* copy:     Tensor.copy_ moving as many bytes as the op reads plus writes: the
            memory-bandwidth ceiling for an elementwise kernel.

The ops with a backward are also timed as one training step ("fwd+bwd" rows):
forward, then torch.autograd.grad of every input (eager autograd vs the op's
registered backward; the compiled variant differentiates the compiled forward).

Variants run interleaved (one call of each per round) so that machine noise hits
them alike. "GB/s" counts the bytes the op must read and write once; "% copy" is
that bandwidth relative to the copy's. Run from the repository root:

    python benchmarks/bench_kernels.py [--quick] [--no-compile] [--threads N] [--device cuda]

NOTE: every call allocates its outputs. With glibc's default, adaptive malloc
thresholds, multi-MB outputs are sometimes returned to the OS and page-faulted
back in on the next call, which swamps a ~0.5 ms kernel with noise unrelated to
it. The script therefore raises glibc's mmap and trim thresholds for itself
(all variants alike); --default-malloc keeps glibc's defaults.

NOTE: on a machine shared with other busy processes, a 2-thread parallel
region waits for a descheduled thread and every variant reads as one scheduler
time slice (~8 ms here). --threads 1 is the robust setting there.

This is a script that prints, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch._inductor.config
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torchgraph as tg  # noqa: E402
import torchgraph._extension as extension  # noqa: E402
from torchgraph.fused import attention as fused_attention  # noqa: E402
import torchgraph.ops as ops  # noqa: E402


@dataclass
class Case:
    name: str
    shape: str
    eager: Callable[[], torch.Tensor]
    fused: Callable[[], torch.Tensor]
    eager_fn: Callable  # the function torch.compile gets
    args: tuple
    bytes_moved: int  # bytes read + bytes written by one call
    grad: torch.Tensor | None = None  # training cases: the compiled variant is differentiated too


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_cases(device: str) -> list[Case]:
    cases = []
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype=torch.float32, channels_last=False):
        t = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.to(memory_format=torch.channels_last) if channels_last else t

    # GPT MLP: bias + GELU after the first linear, tokens = batch 8 x 128.
    for dtype in (torch.float32, torch.bfloat16):
        x, b = randn(8 * 128, 1024, dtype=dtype), randn(1024, dtype=dtype)

        def gelu_eager(x, b):
            return F.gelu(x + b)

        cases.append(
            Case(
                f"bias_act gelu {str(dtype)[6:]}",
                "(1024, 1024)",
                lambda x=x, b=b: gelu_eager(x, b),
                lambda x=x, b=b: ops.bias_act(x, b, "gelu"),
                gelu_eager,
                (x, b),
                2 * _nbytes(x),
            )
        )

    # Pre-LN GPT block: residual add + LayerNorm (d=1024).
    x, r, w, b = randn(8 * 128, 1024), randn(8 * 128, 1024), randn(1024), randn(1024)

    def add_ln_eager(x, r, w, b):
        s = x + r
        return F.layer_norm(s, (s.shape[-1],), w, b), s

    cases.append(
        Case(
            "add_layer_norm float32",
            "(1024, 1024)",
            lambda: add_ln_eager(x, r, w, b),
            lambda: ops.add_layer_norm(x, r, w, b),
            add_ln_eager,
            (x, r, w, b),
            4 * _nbytes(x),
        )
    )

    # ResNet basic block tail: residual add + ReLU, and the conv epilogue bias + ReLU.
    for channels_last in (False, True):
        layout = "channels_last" if channels_last else "NCHW"
        a = randn(8, 64, 32, 32, channels_last=channels_last)
        c = randn(8, 64, 32, 32, channels_last=channels_last)

        def add_relu_eager(a, c):
            return torch.relu(a + c)

        cases.append(
            Case(
                f"add_relu {layout}",
                "(8, 64, 32, 32)",
                lambda a=a, c=c: add_relu_eager(a, c),
                lambda a=a, c=c: ops.add_relu(a, c),
                add_relu_eager,
                (a, c),
                3 * _nbytes(a),
            )
        )
    a, bias = randn(8, 64, 32, 32), randn(64)

    def conv_bias_relu_eager(a, bias):
        return torch.relu(a + bias[:, None, None])

    cases.append(
        Case(
            "bias_act relu dim=1 NCHW",
            "(8, 64, 32, 32)",
            lambda: conv_bias_relu_eager(a, bias),
            lambda: ops.bias_act(a, bias, "relu", dim=1),
            conv_bias_relu_eager,
            (a, bias),
            2 * _nbytes(a),
        )
    )

    # GPT attention (d=256, 4 heads, t=128, causal) from the packed qkv projection: eager splits the
    # heads, runs SDPA (flash) and merges them back. Forward only (the bench runs in inference mode).
    qkv = randn(8, 128, 3 * 256)

    def attention_eager(qkv):
        q, k, v = (z.view(8, 128, 4, 64).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(8, 128, 256)

    cases.append(
        Case(
            "qkv_attention causal",
            "(8, 128, 768)",
            lambda: attention_eager(qkv),
            # the products' library tg.optimize picks on this CPU (NOTE: [Attention GEMMs on oneDNN])
            lambda: ops.qkv_attention(qkv, 4, True, onednn=fused_attention._ONEDNN_ATTENTION),
            attention_eager,
            (qkv,),
            _nbytes(qkv) * 4 // 3 + 8 * 4 * 128 * 128 * 4,  # qkv in, out and probs written
        )
    )

    # HF LLaMA's attention (rotary embeddings applied to q and k, so no packed projection) with the boolean
    # causal-and-padding mask HF passes: SDPA against ops.attention_inference (what tg.optimize calls where
    # MKL is slow; NOTE: [Attention GEMMs on oneDNN]). Forward only.
    query, key = randn(8, 4, 128, 64), randn(8, 4, 128, 64)
    value = randn(8, 128, 4, 64).transpose(1, 2)
    keep = torch.ones(8, 1, 128, 128, dtype=torch.bool, device=device).tril()
    keep[1::2, ..., 96:] = False  # odd samples padded at the end

    def masked_attention_eager(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    cases.append(
        Case(
            "attention_inference masked",
            "(8, 4, 128, 64)",
            lambda: masked_attention_eager(query, key, value, keep),
            lambda: ops.attention_inference(query, key, value, keep),
            masked_attention_eager,
            (query, key, value, keep),
            _nbytes(query, key, value, keep) + _nbytes(query),  # q, k, v and the mask in, the output written
        )
    )

    # LLaMA's RMSNorm as HF writes it (float32 normalisation, cast back, weight product), float32 and bfloat16.
    for dtype in (torch.float32, torch.bfloat16):
        hidden_in, norm_weight = randn(8, 128, 256, dtype=dtype), randn(256, dtype=dtype)

        def rms_norm_eager(h, w):
            hidden = h.to(torch.float32)
            hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
            return w * hidden.to(h.dtype)

        cases.append(
            Case(
                f"rms_norm_inference {str(dtype).replace('torch.', '')}",
                "(8, 128, 256)",
                lambda h=hidden_in, w=norm_weight: rms_norm_eager(h, w),
                lambda h=hidden_in, w=norm_weight: ops.rms_norm_inference(h, w, 1e-6),
                rms_norm_eager,
                (hidden_in, norm_weight),
                _nbytes(hidden_in) * 2,  # read the input, write the output
            )
        )

    # torch's own nn.RMSNorm (torchtitan's LLaMA): F.rms_norm against the op with torch's rounding.
    for dtype in (torch.float32, torch.bfloat16):
        hidden_in, norm_weight = randn(8, 128, 256, dtype=dtype), randn(256, dtype=dtype)

        def torch_rms_norm_eager(h, w):
            return F.rms_norm(h, (256,), w, 1e-5)

        cases.append(
            Case(
                f"rms_norm_inference F.rms_norm {str(dtype).replace('torch.', '')}",
                "(8, 128, 256)",
                lambda h=hidden_in, w=norm_weight: torch_rms_norm_eager(h, w),
                lambda h=hidden_in, w=norm_weight: ops.rms_norm_inference(h, w, 1e-5, True),
                torch_rms_norm_eager,
                (hidden_in, norm_weight),
                _nbytes(hidden_in) * 2,  # read the input, write the output
            )
        )

    # ResNet stem max-pool, k=3 s=2 p=1 (eager computes argmax indices too).
    for channels_last in (False, True):
        layout = "channels_last" if channels_last else "NCHW"
        p = randn(8, 64, 32, 32, channels_last=channels_last)

        def pool_eager(p):
            return F.max_pool2d(p, 3, 2, 1)

        cases.append(
            Case(
                f"max_pool2d_inference {layout}",
                "(8, 64, 32, 32)",
                lambda p=p: pool_eager(p),
                lambda p=p: ops.max_pool2d_inference(p, 3, 2, 1),
                pool_eager,
                (p,),
                _nbytes(p) * 5 // 4,  # read the input, write a quarter of it
            )
        )
    return cases


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _forward_backward(fn: Callable, args: tuple, grad: torch.Tensor) -> Callable[[], tuple]:
    """One training step of fn: forward, then the gradients of every input that requires grad."""
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return lambda: torch.autograd.grad(_first(fn(*args)), inputs, grad)


def make_training_cases(device: str) -> list[Case]:
    """Forward + backward of the ops with a backward, against eager autograd (float32)."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        t = torch.randn(*shape, generator=gen).to(device)
        return t.requires_grad_()

    cases = []
    x, b = randn(8 * 128, 1024), randn(1024)
    grad = torch.randn(8 * 128, 1024, generator=gen).to(device)

    def gelu_eager(x, b):
        return F.gelu(x + b)

    def gelu_fused(x, b):
        return ops.bias_act(x, b, "gelu")

    cases.append(Case("bias_act gelu fwd+bwd", "(1024, 1024)", _forward_backward(gelu_eager, (x, b), grad),
                      _forward_backward(gelu_fused, (x, b), grad), gelu_eager, (x, b),
                      5 * _nbytes(x), grad))

    def add_ln_eager(x, r, w, lb):
        return F.layer_norm(x + r, (x.shape[-1],), w, lb)

    def add_ln_fused(x, r, w, lb):
        return ops.add_layer_norm(x, r, w, lb)[0]

    # d=1024 as in the forward table, and the GPT stack's d=256.
    for width in (1024, 256):
        x, r, w, lb = randn(8 * 128, width), randn(8 * 128, width), randn(width), randn(width)
        grad_ln = torch.randn(8 * 128, width, generator=gen).to(device)
        args = (x, r, w, lb)
        cases.append(Case("add_layer_norm fwd+bwd", f"(1024, {width})",
                          _forward_backward(add_ln_eager, args, grad_ln),
                          _forward_backward(add_ln_fused, args, grad_ln), add_ln_eager, args,
                          7 * _nbytes(x), grad_ln))

    a, c = randn(8, 64, 32, 32), randn(8, 64, 32, 32)
    grad4 = torch.randn(8, 64, 32, 32, generator=gen).to(device)

    def add_relu_eager(a, c):
        return torch.relu(a + c)

    cases.append(Case("add_relu fwd+bwd", "(8, 64, 32, 32)", _forward_backward(add_relu_eager, (a, c), grad4),
                      _forward_backward(ops.add_relu, (a, c), grad4), add_relu_eager, (a, c),
                      5 * _nbytes(a), grad4))

    qkv = randn(8, 128, 3 * 256)
    grad_out = torch.randn(8, 128, 256, generator=gen).to(device)

    def attention_eager(qkv):
        q, k, v = (z.view(8, 128, 4, 64).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(8, 128, 256)

    def attention_fused(qkv):
        return ops.qkv_attention(qkv, 4, True)

    cases.append(Case("qkv_attention causal fwd+bwd", "(8, 128, 768)",
                      _forward_backward(attention_eager, (qkv,), grad_out),
                      _forward_backward(attention_fused, (qkv,), grad_out), attention_eager, (qkv,),
                      2 * _nbytes(qkv) + 3 * _nbytes(grad_out), grad_out))
    return cases


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn: Callable, device: str, inner: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / inner


def _inner_calls(fn: Callable, device: str) -> int:
    """Calls per timing sample so that one sample lasts about 2 ms."""
    once = _time_once(fn, device, 1)
    return max(1, min(200, int(2e-3 / max(once, 1e-7))))


def bench_case(case: Case, device: str, rounds: int, use_compile: bool) -> dict[str, float]:
    numel = case.bytes_moved // 8  # float32 source and destination: 4 + 4 bytes per element
    copy_src = torch.empty(numel, device=device)
    copy_dst = torch.empty(numel, device=device)
    variants = {"eager": case.eager, "fused": case.fused, "copy": lambda: copy_dst.copy_(copy_src)}
    results: dict[str, float] = {}
    if use_compile:
        torch._dynamo.reset()
        compiled = torch.compile(case.eager_fn)
        call = (lambda: compiled(*case.args)) if case.grad is None else \
            _forward_backward(compiled, case.args, case.grad)
        start = time.perf_counter()
        call()
        _sync(device)
        results["compile_first_call_s"] = time.perf_counter() - start
        variants["compiled"] = call

    for fn in variants.values():  # warm-up: caches, thread pool, allocator
        for _ in range(3):
            fn()
    inner = {name: _inner_calls(fn, device) for name, fn in variants.items()}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(_time_once(fn, device, inner[name]))
    results.update({name: statistics.median(values) for name, values in samples.items()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 4x faster)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's adaptive malloc thresholds"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_note = "glibc defaults"
    # (NOTE: [Page faults from freed memory]; this benchmark has always kept up to 1 GiB at the heap's top)
    if not args.default_malloc and tg.retain_freed_memory(trim_threshold=1 << 30):
        malloc_note = "malloc: no trimming below 32 MB"
    # The first-call column should show a cold compile, not an on-disk cache hit.
    torch._inductor.config.force_disable_caches = True
    warnings.filterwarnings("ignore", message=".*force disabled by torch.compiler.config")
    if not extension.HAS_C_OPS:
        sys.exit(f"torchgraph's compiled kernels are not available: {extension.LOAD_ERROR}")
    if args.device == "cuda" and "cuda" not in ops._KERNEL_DEVICES:
        sys.exit("CUDA kernels are not built (or no GPU): nothing to compare on cuda.")

    rounds = 15 if args.quick else 60
    use_compile = not args.no_compile
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, rounds {rounds} (median), "
        f"{malloc_note}"
    )
    header = (
        f"{'op':<30} {'shape':<16} {'eager us':>9} {'fused us':>9} {'compiled':>9} {'copy us':>8}"
        f" {'vs eager':>8} {'vs comp.':>8} {'GB/s':>6} {'% copy':>6} {'1st compile s':>13}"
    )
    print(header)
    print("-" * len(header))
    cases = [(case, torch.inference_mode) for case in make_cases(args.device)]
    cases += [(case, torch.enable_grad) for case in make_training_cases(args.device)]
    for case, mode in cases:
        with mode():
            r = bench_case(case, args.device, rounds, use_compile)
            us = {k: v * 1e6 for k, v in r.items() if not k.endswith("_s")}
            compiled = f"{us['compiled']:9.1f}" if use_compile else f"{'-':>9}"
            vs_compiled = f"{r['compiled'] / r['fused']:7.2f}x" if use_compile else f"{'-':>8}"
            first = f"{r['compile_first_call_s']:13.1f}" if use_compile else f"{'-':>13}"
            print(
                f"{case.name:<30} {case.shape:<16} {us['eager']:9.1f} {us['fused']:9.1f} {compiled}"
                f" {us['copy']:8.1f} {r['eager'] / r['fused']:7.2f}x {vs_compiled}"
                f" {case.bytes_moved / r['fused'] / 1e9:6.1f} {100 * r['copy'] / r['fused']:5.0f}%"
                f" {first}",
                flush=True,
            )


if __name__ == "__main__":
    main()
