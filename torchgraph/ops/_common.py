"""Shared pieces of the fused ops: kernel availability, argument checks, activations, layouts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import _extension

__all__ = ["ACTIVATIONS", "ACTIVATION_FNS", "KERNEL_DEVICES", "KERNEL_DTYPES", "call_op", "check_float_dtype",
           "check_like", "dense_format", "is_tensor", "kernel_devices", "no_double_backward", "pair",
           "references_check", "traced", "use_kernel"]

#: Activations accepted by :func:`bias_act`.
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")

#: Dtypes with compiled kernels; others (e.g. float16) run the references.
KERNEL_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16})


def kernel_devices() -> frozenset[str]:
    if not _extension.HAS_C_OPS:
        return frozenset()
    # "meta" runs the fake kernels registered beside each op.
    devices = {"cpu", "meta"}
    op = torch.ops.torchgraph.bias_act.default
    if op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CUDA):
        devices.add("cuda")
    return frozenset(devices)


#: Devices with compiled kernels (plus "meta", which runs the fake kernels).
KERNEL_DEVICES = kernel_devices()


def use_kernel(x) -> bool:
    """Whether the wrapper should call the compiled op for input ``x``."""
    if not _extension.HAS_C_OPS:
        return False
    if not isinstance(x, torch.Tensor):
        # e.g. a torch.fx.Proxy during symbolic_trace: record the op itself.
        return True
    return x.device.type in KERNEL_DEVICES and x.dtype in KERNEL_DTYPES


# --------------------------------------------------------------------------- checks
# NOTE: [Shared checks] Twins of csrc/common.h. Tensors print their shapes as
# lists so the text matches the C++ one ("[7, 13]"); dtypes print as torch
# dtypes here and as C++ scalar types there ("torch.float32" vs "Float").


def is_tensor(*values) -> bool:
    # Checks need concrete (or fake) tensors; an fx Proxy cannot answer them.
    return all(isinstance(v, torch.Tensor) for v in values)


# NOTE: [Checks under compile] The references check their arguments with torch._check(cond, lambda:
# msg). torch 2.11's dynamo cannot trace a message lambda that closes over local variables, so the
# references skip the checks while being compiled (the compiled graph's shapes come from eager-checked
# calls, and the fake kernels still check). They skip them under torch.jit.trace too (the legacy ONNX
# exporter runs the references in its place, NOTE: [Frozen inference weights]): there shapes are traced
# tensors, and torch._check refuses a tensor condition.
def traced() -> bool:
    """Whether this call is being traced into a program (torch.compile / torch.export, or torch.jit.trace as the
    legacy ONNX exporter runs it): shapes are symbols or traced values, and data-dependent branches are frozen."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def references_check() -> bool:
    """Whether a reference checks its arguments (not while compiled or traced: NOTE: [Checks under compile])."""
    return not traced()


def check_float_dtype(op: str, name: str, t: torch.Tensor) -> None:
    torch._check(
        t.dtype in KERNEL_DTYPES,
        lambda: f"{op}: {name} must be float32, float64 or bfloat16, got {t.dtype}",
    )


def check_like(op: str, name: str, other: torch.Tensor, x: torch.Tensor) -> None:
    torch._check(
        other.dtype == x.dtype,
        lambda: f"{op}: {name} dtype must equal x dtype {x.dtype}, got {other.dtype}",
    )
    torch._check(
        other.device == x.device,
        lambda: f"{op}: {name} must be on x's device {x.device}, got {other.device}",
    )


# The convolution kernels' shared argument checks: twins of csrc/common.h's, with the same messages.
def check_stride(op: str, stride: list) -> None:
    torch._check(len(stride) == 2 and min(stride) > 0, lambda: f"{op}: stride must be two positive ints, got {stride}")


def check_padding(op: str, padding: list) -> None:
    torch._check(len(padding) == 2 and min(padding) >= 0,
                 lambda: f"{op}: padding must be two non-negative ints, got {padding}")


def check_padded_map(op: str, x: torch.Tensor, padding: list, kh: int, kw: int) -> tuple:
    """``x`` (N, C, H, W) padded by ``padding`` (checked) holds a ``kh`` x ``kw`` filter; returns the padded height
    and width."""
    height, width = x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1]
    torch._check(height >= kh and width >= kw,
                 lambda: f"{op}: the padded input {height}x{width} is smaller than the {kh}x{kw} filter")
    return height, width


def check_float32_bias(op: str, name: str, bias: torch.Tensor | None, channels: int) -> None:
    """A float32 bias of ``channels`` elements, where one is given."""
    if bias is None:
        return
    torch._check(tuple(bias.shape) == (channels,),
                 lambda: f"{op}: {name} must have shape [{channels}], got {list(bias.shape)}")
    torch._check(bias.dtype == torch.float32, lambda: f"{op}: {name} must be float32, got {bias.dtype}")


def pair(value: int | Sequence[int]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def dense_format(x: torch.Tensor) -> torch.memory_format:
    # NOTE: [Memory format rule] in csrc/common.h; the fake kernels must give
    # outputs the exact strides the C++ kernels produce.
    if x.dim() == 4 and not x.is_contiguous():
        if x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


#: Activation name -> the plain PyTorch function (the references' epilogues; each op checks its own
#: names: bias_act's ACTIVATIONS, depthwise_conv2d_inference's DEPTHWISE_ACTIVATIONS).
ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda z: z,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
}


# NOTE: [No backward] The inference ops (gemm_act_inference, depthwise/winograd convolutions,
# attention_inference, max_pool2d_inference, rms_norm_inference) keep nothing a gradient needs; their
# autograd kernel, in C++ so that it costs nothing on inference calls, raises on backward with what to
# use instead (NOTE: [No backward in C++] in csrc/no_backward.cpp).


# NOTE: [Inference calls below autograd] The ops with a backward (bias_act, add_relu, add_layer_norm,
# qkv_attention) have it registered from Python (torch.library.register_autograd), whose kernel runs
# on every call, under torch.no_grad() too, before it dispatches below autograd itself: ~8-10 us a
# call (add_layer_norm on ViT-S's 197 x 384: 38 us under no_grad, 29 us below autograd), 36 calls a
# ViT-S forward. Under no_grad the wrappers go below autograd directly: the same kernel, the same
# result, no graph either way. (The inference-only ops' autograd kernel is C++: NOTE: [No backward].)
def call_op(op, *args):
    """``op(*args)``; with grad mode off (and not under torch.compile), dispatched below autograd."""
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


# NOTE: [No double backward] The *_backward ops have no autograd formula of their own, so a
# second-order gradient through a fused op (torch.autograd.grad(..., create_graph=True), then
# backward again) would silently come out as None or zeros. Registering a formula that raises
# turns that into an error saying what to do; first-order training never reaches it.
def no_double_backward(op: str) -> None:
    """Registers, for ``torchgraph::<op>_backward``, an autograd formula that raises."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"torchgraph::{op} is not twice differentiable: second-order gradients (e.g. a "
            "gradient penalty) through torchgraph's fused ops are not implemented. Where "
            "they are needed, use the original model rather than the tg.optimize(...) result."
        )

    torch.library.register_autograd(
        f"torchgraph::{op}_backward", backward, setup_context=lambda ctx, inputs, output: None
    )
