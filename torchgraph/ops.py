"""Fused kernels as PyTorch custom ops (``torch.ops.torchgraph.*``).

Each op ``X`` comes as four pieces:

* ``X(...)``: the public wrapper. It runs the compiled kernel when one exists for
  the input's device and dtype, otherwise ``reference_X``.
* a fake (meta) kernel, so ``torch.compile``, ``torch.export`` and FakeTensor
  shape propagation see the op as one node with the right output metadata;
* an autograd formula built on a separate ``X_backward`` op;
* ``reference_X(...)``: the same computation in plain PyTorch. It is the
  fallback when the kernels are not built and the oracle in the tests.
  ``REFERENCES`` / :func:`reference_for` map each op to it, so a graph pass can
  swap fused nodes back to standard ops (e.g. before ONNX export).

Design constraints:

* The schemas live in ``csrc/torchgraph.cpp``; the fake kernels and autograd
  formulas are registered here, and only when ``torchgraph._C`` is loaded
  (without it the ops do not exist).
* The ``_check_*`` helpers repeat the C++ checks in ``csrc/common.h`` with the
  same messages, and both the fake kernels and the references call them, so a
  bad argument fails the same way on every path.
* Kernels exist for float32, float64 and bfloat16 on the CPU (and on CUDA when
  built with CUDA). Other dtypes (e.g. float16) and devices go to the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import _extension

__all__ = [
    "ACTIVATIONS",
    "REFERENCES",
    "add_layer_norm",
    "add_relu",
    "bias_act",
    "max_pool2d_inference",
    "qkv_attention",
    "reference_add_layer_norm",
    "reference_add_relu",
    "reference_bias_act",
    "reference_for",
    "reference_max_pool2d_inference",
    "reference_qkv_attention",
]

#: Activations accepted by :func:`bias_act`.
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")

_KERNEL_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16})


def _kernel_devices() -> frozenset[str]:
    if not _extension.HAS_C_OPS:
        return frozenset()
    # "meta" runs the fake kernels registered below.
    devices = {"cpu", "meta"}
    op = torch.ops.torchgraph.bias_act.default
    if op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CUDA):
        devices.add("cuda")
    return frozenset(devices)


_KERNEL_DEVICES = _kernel_devices()


def _use_kernel(x) -> bool:
    """Whether the wrapper should call the compiled op for input ``x``."""
    if not _extension.HAS_C_OPS:
        return False
    if not isinstance(x, torch.Tensor):
        # e.g. a torch.fx.Proxy during symbolic_trace: record the op itself.
        return True
    return x.device.type in _KERNEL_DEVICES and x.dtype in _KERNEL_DTYPES


# --------------------------------------------------------------------------- checks
# NOTE: [Shared checks] Twins of csrc/common.h. Tensors print their shapes as
# lists so the text matches the C++ one ("[7, 13]"); dtypes print as torch
# dtypes here and as C++ scalar types there ("torch.float32" vs "Float").


def _is_tensor(*values) -> bool:
    # Checks need concrete (or fake) tensors; an fx Proxy cannot answer them.
    return all(isinstance(v, torch.Tensor) for v in values)


# NOTE: [Checks under compile] The references check their arguments with torch._check(cond, lambda:
# msg). torch 2.11's dynamo cannot trace a message lambda that closes over local variables, so the
# references skip the checks while being compiled (the compiled graph's shapes come from eager-checked
# calls, and the fake kernels still check).
def _check_float_dtype(op: str, name: str, t: torch.Tensor) -> None:
    torch._check(
        t.dtype in _KERNEL_DTYPES,
        lambda: f"{op}: {name} must be float32, float64 or bfloat16, got {t.dtype}",
    )


def _check_like(op: str, name: str, other: torch.Tensor, x: torch.Tensor) -> None:
    torch._check(
        other.dtype == x.dtype,
        lambda: f"{op}: {name} dtype must equal x dtype {x.dtype}, got {other.dtype}",
    )
    torch._check(
        other.device == x.device,
        lambda: f"{op}: {name} must be on x's device {x.device}, got {other.device}",
    )


def _check_bias_act(x, bias, act: str, dim: int, *, kernel: bool) -> None:
    torch._check(
        act in ACTIVATIONS,
        lambda: "bias_act: act must be one of 'none', 'relu', 'gelu', 'gelu_tanh', 'silu', "
        f"got '{act}'",
    )
    if not _is_tensor(x, bias):
        return
    if kernel:
        _check_float_dtype("bias_act", "x", x)
    _check_like("bias_act", "bias", bias, x)
    ndim = x.dim()
    torch._check(
        ndim >= 1,
        lambda: f"bias_act: x must have at least one dimension, got shape {list(x.shape)}",
    )
    torch._check(
        -ndim <= dim < ndim,
        lambda: f"bias_act: dim must be in [{-ndim}, {ndim - 1}] for x of shape "
        f"{list(x.shape)}, got {dim}",
    )
    size = x.shape[dim]
    torch._check(
        bias.dim() == 1 and bias.shape[0] == size,
        lambda: f"bias_act: bias must have shape [{size}] (x.size({dim})), "
        f"got {list(bias.shape)}",
    )


def _check_add_relu(a, b, *, kernel: bool) -> None:
    if not _is_tensor(a, b):
        return
    if kernel:
        _check_float_dtype("add_relu", "a", a)
    torch._check(
        b.dtype == a.dtype,
        lambda: f"add_relu: b dtype must equal a dtype {a.dtype}, got {b.dtype}",
    )
    torch._check(
        b.device == a.device,
        lambda: f"add_relu: b must be on a's device {a.device}, got {b.device}",
    )
    torch._check(
        a.shape == b.shape,
        lambda: f"add_relu: b must have a's shape {list(a.shape)}, got {list(b.shape)} "
        "(add_relu does not broadcast)",
    )


def _check_add_layer_norm(x, residual, weight, bias, eps: float, *, kernel: bool) -> None:
    if not _is_tensor(x, residual):
        return
    if kernel:
        _check_float_dtype("add_layer_norm", "x", x)
    _check_like("add_layer_norm", "residual", residual, x)
    torch._check(
        x.dim() >= 1,
        lambda: f"add_layer_norm: x must have at least one dimension, got shape {list(x.shape)}",
    )
    torch._check(
        residual.shape == x.shape,
        lambda: f"add_layer_norm: residual must have x's shape {list(x.shape)}, "
        f"got {list(residual.shape)}",
    )
    channels = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        _check_like("add_layer_norm", name, param, x)
        torch._check(
            param.dim() == 1 and param.shape[0] == channels,
            lambda: f"add_layer_norm: {name} must have shape [{channels}] (x.size(-1)), "
            f"got {list(param.shape)}",
        )
    torch._check(eps >= 0, lambda: f"add_layer_norm: eps must be non-negative, got {eps}")


def _check_qkv_attention(qkv, heads: int, *, kernel: bool) -> None:
    if not _is_tensor(qkv):
        return
    if kernel:
        _check_float_dtype("qkv_attention", "qkv", qkv)
    torch._check(
        qkv.dim() == 3,
        lambda: f"qkv_attention: qkv must be 3-D (batch, seq, 3 * embed), got shape {list(qkv.shape)}",
    )
    torch._check(heads > 0, lambda: f"qkv_attention: heads must be positive, got {heads}")
    torch._check(
        qkv.shape[2] % (3 * heads) == 0 and qkv.shape[2] > 0,
        lambda: f"qkv_attention: qkv.size(2) must be 3 * heads * head_dim with head_dim >= 1, "
        f"got {qkv.shape[2]} for heads={heads}",
    )


def _check_qkv_attention_backward(grad_out, qkv, out, probs, heads: int) -> None:
    _check_qkv_attention(qkv, heads, kernel=True)
    b, t, width = qkv.shape
    for name, tensor in (("grad_out", grad_out), ("out", out)):
        _check_like("qkv_attention_backward", name, tensor, qkv)
        torch._check(
            list(tensor.shape) == [b, t, width // 3],
            lambda: f"qkv_attention_backward: {name} must have shape {[b, t, width // 3]}, "
            f"got {list(tensor.shape)}",
        )
    torch._check(
        list(probs.shape) == [b, heads, t, t] and probs.device == qkv.device,
        lambda: f"qkv_attention_backward: probs must have shape {[b, heads, t, t]} on {qkv.device}, "
        f"got {list(probs.shape)} on {probs.device}",
    )


def _pair(value: int | Sequence[int]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def _pool_output_size(size, kernel, stride, pad, dilation, ceil_mode: bool):
    # Same formula as ATen's pooling_output_shape (and csrc/common.h).
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out = out - 1
    return out


def _check_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode: bool, *, kernel: bool):
    """Validates the arguments; returns the output (height, width), or None for a Proxy."""
    op = "max_pool2d_inference"
    if not _is_tensor(x):
        return None
    if kernel:
        _check_float_dtype(op, "x", x)
    torch._check(
        x.dim() in (3, 4) and x.shape[-1] > 0 and x.shape[-2] > 0 and x.shape[-3] > 0,
        lambda: f"{op}: x must be 3-D (C, H, W) or 4-D (N, C, H, W) with non-zero C, H, W, "
        f"got shape {list(x.shape)}",
    )
    if stride is None or (not isinstance(stride, int) and len(stride) == 0):
        stride = kernel_size
    args = {"kernel_size": kernel_size, "stride": stride, "padding": padding, "dilation": dilation}
    for name, value in args.items():
        value = _pair(value) if isinstance(value, int) else list(value)
        args[name] = value
        torch._check(
            len(value) in (1, 2),
            lambda: f"{op}: {name} must have 1 or 2 elements, got {value}",
        )
    k, s, p, d = ([v[0], v[-1]] for v in args.values())
    out_size = []
    for i in range(2):
        torch._check(
            k[i] > 0 and s[i] > 0 and d[i] > 0,
            lambda: f"{op}: kernel_size, stride and dilation must be positive, got "
            f"kernel_size={args['kernel_size']}, stride={args['stride']}, "
            f"dilation={args['dilation']}",
        )
        torch._check(
            0 <= p[i] <= k[i] // 2,
            lambda: f"{op}: padding must be non-negative and at most half of kernel_size, "
            f"got padding={args['padding']}, kernel_size={args['kernel_size']}",
        )
        size = x.shape[x.dim() - 2 + i]
        out_size.append(_pool_output_size(size, k[i], s[i], p[i], d[i], ceil_mode))
    torch._check(
        out_size[0] >= 1 and out_size[1] >= 1,
        lambda: f"{op}: output size {out_size[0]}x{out_size[1]} is too small for input of "
        f"shape {list(x.shape)} (kernel_size={args['kernel_size']}, "
        f"dilation={args['dilation']}, padding={args['padding']})",
    )
    return out_size


def _dense_format(x: torch.Tensor) -> torch.memory_format:
    # NOTE: [Memory format rule] in csrc/common.h; the fake kernels must give
    # outputs the exact strides the C++ kernels produce.
    if x.dim() == 4 and not x.is_contiguous():
        if x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


# --------------------------------------------------------------------------- references

_ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda z: z,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}


def reference_bias_act(
    x: torch.Tensor, bias: torch.Tensor, act: str, dim: int = -1
) -> torch.Tensor:
    """Pure-PyTorch :func:`bias_act`: ``act(x + bias)`` with bias along ``dim``."""
    if not torch.compiler.is_compiling():  # see NOTE: [Checks under compile]
        _check_bias_act(x, bias, act, dim, kernel=False)
    # Trailing singleton dims put bias on `dim`; a negative dim needs no x.dim(),
    # which keeps this traceable with a torch.fx.Proxy.
    trailing = -dim - 1 if dim < 0 else x.dim() - dim - 1
    if trailing:
        bias = bias.reshape([-1] + [1] * trailing)
    return _ACTIVATION_FNS[act](x + bias)


def reference_add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch :func:`add_relu`: ``relu(a + b)``."""
    if not torch.compiler.is_compiling():  # see NOTE: [Checks under compile]
        _check_add_relu(a, b, kernel=False)
    return torch.relu(a + b)


def reference_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch :func:`add_layer_norm`: ``(layer_norm(x + residual), x + residual)``."""
    if not torch.compiler.is_compiling():  # see NOTE: [Checks under compile]
        _check_add_layer_norm(x, residual, weight, bias, eps, kernel=False)
    residual_out = x + residual
    out = F.layer_norm(residual_out, residual_out.shape[-1:], weight, bias, eps)
    return out, residual_out


def reference_max_pool2d_inference(
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch :func:`max_pool2d_inference`: ``F.max_pool2d`` (which is differentiable)."""
    if not torch.compiler.is_compiling():  # see NOTE: [Checks under compile]
        _check_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, kernel=False)
    if stride is not None and not isinstance(stride, int) and len(stride) == 0:
        stride = None  # the schema's `stride=[]` means "same as kernel_size"
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def reference_qkv_attention(
    qkv: torch.Tensor, heads: int, causal: bool, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch ``torch.ops.torchgraph.qkv_attention``: ``(out, probs)`` by explicit softmax.

    ``qkv`` is ``(B, T, 3 * E)``: queries, keys and values side by side, each ``heads`` heads of
    ``E // heads`` features. ``out`` is ``(B, T, E)`` (heads side by side again), ``probs`` the
    attention weights ``(B, heads, T, T)`` (float32 for a bfloat16 ``qkv``).
    """
    if not torch.compiler.is_compiling():  # see NOTE: [Checks under compile]
        _check_qkv_attention(qkv, heads, kernel=False)
    b, t, _ = qkv.shape
    q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
    compute = torch.float32 if qkv.dtype == torch.bfloat16 else qkv.dtype
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(t, t, dtype=torch.bool, device=qkv.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, t, qkv.shape[-1] // 3).to(qkv.dtype)
    return out, probs


#: Qualified op name -> pure-PyTorch reference with the op's signature and outputs.
REFERENCES: dict[str, Callable] = {
    "torchgraph::bias_act": reference_bias_act,
    "torchgraph::add_relu": reference_add_relu,
    "torchgraph::add_layer_norm": reference_add_layer_norm,
    "torchgraph::max_pool2d_inference": reference_max_pool2d_inference,
    "torchgraph::qkv_attention": reference_qkv_attention,
}


def reference_for(target) -> Callable | None:
    """Returns the pure-PyTorch reference of a torchgraph op, or None for anything else.

    Accepts what an fx node's ``target`` can be: an ``OpOverload``
    (``torch.ops.torchgraph.bias_act.default``), an ``OpOverloadPacket``
    (``torch.ops.torchgraph.bias_act``), a wrapper from this module
    (``torchgraph.ops.bias_act``) or a name (``"bias_act"``, ``"torchgraph::bias_act"``).

    Example:
        >>> reference_for("bias_act") is reference_bias_act
        True
        >>> reference_for(torch.relu) is None
        True
    """
    if isinstance(target, str):
        name = target if "::" in target else f"torchgraph::{target}"
    elif getattr(target, "__module__", None) == __name__ and callable(target):
        name = f"torchgraph::{target.__name__}"
    else:
        overload = getattr(target, "default", target)  # a packet's default overload
        name_fn = getattr(overload, "name", None)
        name = name_fn() if callable(name_fn) else None
    return REFERENCES.get(name)


# --------------------------------------------------------------------------- public ops


def bias_act(x: torch.Tensor, bias: torch.Tensor, act: str, dim: int = -1) -> torch.Tensor:
    """Adds a bias along one dim and applies an activation, in one pass: ``act(x + bias)``.

    ``dim=-1`` is the epilogue of a linear layer (bias over features); ``dim=1``
    the epilogue of an NCHW convolution (bias per channel). Inputs are read as
    contiguous or channels_last buffers (others are copied first); the output
    has the same layout.

    Example:
        >>> x = torch.tensor([[-2.0, 0.0], [1.0, -3.0]])
        >>> bias_act(x, torch.tensor([1.0, 1.0]), "relu")
        tensor([[0., 1.],
                [2., 0.]])
        >>> bias_act(torch.zeros(2, 3, 4, 4), torch.ones(3), "none", dim=1).shape
        torch.Size([2, 3, 4, 4])

    Args:
        x: Input of any shape with at least one dim.
        bias: 1-D tensor of size ``x.shape[dim]``, same dtype and device as ``x``.
        act: One of ``"none"``, ``"relu"``, ``"gelu"`` (exact, erf-based),
            ``"gelu_tanh"`` (tanh approximation) and ``"silu"``.
        dim: The dim of ``x`` that ``bias`` runs along.

    Returns:
        A tensor shaped like ``x``. Differentiable with respect to ``x`` and ``bias``.

    Raises:
        RuntimeError: On an unknown ``act``, an out-of-range ``dim``, or a bias
            whose shape, dtype or device does not match.
    """
    if _use_kernel(x):
        return torch.ops.torchgraph.bias_act.default(x, bias, act, dim)
    return reference_bias_act(x, bias, act, dim)


def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Residual add followed by ReLU, in one pass: ``relu(a + b)``.

    Both inputs must have the same shape (no broadcasting). The output has
    ``a``'s layout when that is contiguous or channels_last.

    Example:
        >>> add_relu(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-2.0, 1.0, 1.0]))
        tensor([0., 0., 4.])

    Args:
        a: Input tensor.
        b: Tensor with ``a``'s shape, dtype and device.

    Returns:
        ``relu(a + b)``. Differentiable with respect to ``a`` and ``b``.

    Raises:
        RuntimeError: If the shapes, dtypes or devices differ.
    """
    if _use_kernel(a):
        return torch.ops.torchgraph.add_relu.default(a, b)
    return reference_add_relu(a, b)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by LayerNorm over the last dim, returning both results.

    Computes ``residual_out = x + residual`` and ``out = layer_norm(residual_out)``
    in one pass. A pre-LN transformer block feeds ``out`` to the next sub-layer
    and keeps ``residual_out`` as its residual stream. Outputs are contiguous.

    Example:
        >>> x, residual = torch.ones(2, 4), torch.arange(8.0).reshape(2, 4)
        >>> out, residual_out = add_layer_norm(x, residual)
        >>> residual_out
        tensor([[1., 2., 3., 4.],
                [5., 6., 7., 8.]])
        >>> out.mean(-1).abs().max() < 1e-6
        tensor(True)

    Args:
        x: Input of shape ``(..., C)``.
        residual: Tensor with ``x``'s shape, dtype and device.
        weight: Optional LayerNorm scale of shape ``(C,)``.
        bias: Optional LayerNorm shift of shape ``(C,)``.
        eps: Added to the variance for numerical stability.

    Returns:
        ``(out, residual_out)``, both shaped like ``x``. Differentiable with
        respect to ``x``, ``residual``, ``weight`` and ``bias``.

    Raises:
        RuntimeError: If shapes, dtypes or devices do not match, or ``eps < 0``.
    """
    if _use_kernel(x):
        return torch.ops.torchgraph.add_layer_norm.default(x, residual, weight, bias, eps)
    return reference_add_layer_norm(x, residual, weight, bias, eps)


def max_pool2d_inference(
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """2-D max pooling for inference: same values as ``F.max_pool2d``, no indices.

    ``F.max_pool2d`` on the CPU computes the argmax indices that its backward
    needs even in inference. This op skips them, so it has no backward: calling
    ``.backward()`` through it raises a RuntimeError (use ``F.max_pool2d`` for
    training). NaN propagates as in ``F.max_pool2d``. A channels_last input
    gives a channels_last output.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> max_pool2d_inference(x, kernel_size=2)
        tensor([[[[ 5.,  7.],
                  [13., 15.]]]])

    Args:
        x: Input of shape ``(N, C, H, W)`` or ``(C, H, W)``.
        kernel_size: Window size, an int or a pair ``(kH, kW)``.
        stride: Window stride; defaults to ``kernel_size``.
        padding: Implicit ``-inf`` padding on both sides, at most half the kernel.
        dilation: Spacing between window elements.
        ceil_mode: Use ceil instead of floor for the output size.

    Returns:
        The pooled tensor.

    Raises:
        RuntimeError: On invalid pooling arguments, or if gradients are requested.
    """
    if _use_kernel(x):
        stride_arg = [] if stride is None else stride
        return torch.ops.torchgraph.max_pool2d_inference.default(
            x, kernel_size, stride_arg, padding, dilation, ceil_mode
        )
    return reference_max_pool2d_inference(x, kernel_size, stride, padding, dilation, ceil_mode)


def qkv_attention(
    qkv: torch.Tensor, heads: int, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Multi-head attention straight from a packed ``q | k | v`` projection.

    The same as splitting ``qkv`` into heads, calling ``F.scaled_dot_product_attention`` and
    merging the heads back (``transpose(1, 2).reshape(B, T, E)``), without the copies: the
    kernel reads each head in place and writes it into its columns of the output. Its backward
    writes the gradient of ``qkv`` as one tensor. It keeps the attention weights for the backward
    (``B * heads * T * T`` floats), so it suits short sequences; :func:`torchgraph.fused.qkv_attention`
    picks it only for those. CPU kernel only; other devices run the reference.

    Example:
        >>> import torch.nn.functional as F
        >>> qkv = torch.randn(2, 5, 3 * 8)
        >>> q, k, v = (z.view(2, 5, 2, 4).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        >>> expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> out = qkv_attention(qkv, heads=2, causal=True)
        >>> torch.allclose(out, expected.transpose(1, 2).reshape(2, 5, 8), atol=1e-6)
        True

    Args:
        qkv: ``(B, T, 3 * E)``; queries, keys, values side by side, each ``heads`` heads wide.
        heads: Number of heads; ``E`` must be a multiple of it.
        causal: Mask future keys (``is_causal=True`` in SDPA).
        scale: Score scale; defaults to ``1 / sqrt(E / heads)``.

    Returns:
        ``(B, T, E)``. Differentiable with respect to ``qkv``.

    Raises:
        RuntimeError: If ``qkv`` is not 3-D or its last dim is not ``3 * heads * head_dim``.
    """
    if _use_kernel(qkv) and (not isinstance(qkv, torch.Tensor) or qkv.device.type in ("cpu", "meta")):
        return torch.ops.torchgraph.qkv_attention.default(qkv, heads, causal, scale)[0]
    return reference_qkv_attention(qkv, heads, causal, scale)[0]


# --------------------------------------------------------------------------- registrations
# NOTE: [Registration needs _C] torch.library can only attach fake kernels and
# autograd formulas to ops that exist, and the schemas come from _C.

if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::bias_act")
    def _bias_act_fake(x, bias, act, dim=-1):
        _check_bias_act(x, bias, act, dim, kernel=True)
        return torch.empty_like(x, memory_format=_dense_format(x))

    @torch.library.register_fake("torchgraph::bias_act_backward")
    def _bias_act_backward_fake(grad, x, bias, act, dim):
        _check_bias_act(x, bias, act, dim, kernel=True)
        return torch.empty_like(x, memory_format=_dense_format(x)), torch.empty_like(bias)

    def _bias_act_setup_context(ctx, inputs, output):
        x, bias, act, dim = inputs
        ctx.save_for_backward(x, bias)
        ctx.act, ctx.dim = act, dim

    def _bias_act_backward(ctx, grad):
        x, bias = ctx.saved_tensors
        grad_x, grad_bias = torch.ops.torchgraph.bias_act_backward.default(
            grad, x, bias, ctx.act, ctx.dim
        )
        return grad_x, grad_bias, None, None

    torch.library.register_autograd(
        "torchgraph::bias_act", _bias_act_backward, setup_context=_bias_act_setup_context
    )

    @torch.library.register_fake("torchgraph::add_relu")
    def _add_relu_fake(a, b):
        _check_add_relu(a, b, kernel=True)
        return torch.empty_like(a, memory_format=_dense_format(a))

    @torch.library.register_fake("torchgraph::add_relu_backward")
    def _add_relu_backward_fake(grad, out):
        _check_float_dtype("add_relu_backward", "out", out)
        torch._check(
            grad.shape == out.shape,
            lambda: f"add_relu_backward: grad must have out's shape {list(out.shape)}, "
            f"got {list(grad.shape)}",
        )
        return torch.empty_like(out, memory_format=_dense_format(out))

    def _add_relu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    def _add_relu_backward(ctx, grad):
        (out,) = ctx.saved_tensors
        grad_in = torch.ops.torchgraph.add_relu_backward.default(grad, out)
        return grad_in, grad_in

    torch.library.register_autograd(
        "torchgraph::add_relu", _add_relu_backward, setup_context=_add_relu_setup_context
    )

    @torch.library.register_fake("torchgraph::add_layer_norm")
    def _add_layer_norm_fake(x, residual, weight, bias, eps=1e-5):
        _check_add_layer_norm(x, residual, weight, bias, eps, kernel=True)
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake("torchgraph::add_layer_norm_backward")
    def _add_layer_norm_backward_fake(grad_out, grad_residual_out, residual_out, weight, eps):
        _check_float_dtype("add_layer_norm_backward", "residual_out", residual_out)
        channels = residual_out.shape[-1]
        return (
            residual_out.new_empty(residual_out.shape),
            residual_out.new_empty((channels,)),
            residual_out.new_empty((channels,)),
        )

    def _add_layer_norm_setup_context(ctx, inputs, output):
        _, _, weight, bias, eps = inputs
        ctx.save_for_backward(output[1], weight)
        ctx.has_bias, ctx.eps = bias is not None, eps

    def _add_layer_norm_backward(ctx, grad_out, grad_residual_out):
        residual_out, weight = ctx.saved_tensors
        if grad_out is None:  # only residual_out was used downstream
            grad_out = torch.zeros_like(residual_out)
        grad_sum, grad_weight, grad_bias = torch.ops.torchgraph.add_layer_norm_backward.default(
            grad_out, grad_residual_out, residual_out, weight, ctx.eps
        )
        return (
            grad_sum,
            grad_sum,
            grad_weight if weight is not None else None,
            grad_bias if ctx.has_bias else None,
            None,
        )

    torch.library.register_autograd(
        "torchgraph::add_layer_norm",
        _add_layer_norm_backward,
        setup_context=_add_layer_norm_setup_context,
    )

    @torch.library.register_fake("torchgraph::max_pool2d_inference")
    def _max_pool2d_inference_fake(
        x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False
    ):
        out_h, out_w = _check_max_pool2d(
            x, kernel_size, stride, padding, dilation, ceil_mode, kernel=True
        )
        if x.dim() == 3:
            return x.new_empty((x.shape[0], out_h, out_w))
        return torch.empty(
            (x.shape[0], x.shape[1], out_h, out_w),
            dtype=x.dtype,
            device=x.device,
            memory_format=_dense_format(x),
        )

    def _max_pool2d_inference_setup_context(ctx, inputs, output):
        pass

    def _max_pool2d_inference_backward(ctx, grad):
        raise RuntimeError(
            "max_pool2d_inference has no backward: it does not record the argmax indices "
            "that a gradient needs. Use torch.nn.functional.max_pool2d where gradients are "
            "required (e.g. training), or run inference under torch.no_grad()."
        )

    # NOTE: registering a backward that raises (rather than none) turns PyTorch's
    # generic "no autograd formula" warning into an error that says what to do.
    torch.library.register_autograd(
        "torchgraph::max_pool2d_inference",
        _max_pool2d_inference_backward,
        setup_context=_max_pool2d_inference_setup_context,
    )

    @torch.library.register_fake("torchgraph::qkv_attention")
    def _qkv_attention_fake(qkv, heads, causal, scale=None):
        _check_qkv_attention(qkv, heads, kernel=True)
        b, t, width = qkv.shape
        probs_dtype = torch.float32 if qkv.dtype == torch.bfloat16 else qkv.dtype
        return qkv.new_empty((b, t, width // 3)), qkv.new_empty((b, heads, t, t), dtype=probs_dtype)

    @torch.library.register_fake("torchgraph::qkv_attention_backward")
    def _qkv_attention_backward_fake(grad_out, qkv, out, probs, heads, causal, scale):
        _check_qkv_attention_backward(grad_out, qkv, out, probs, heads)
        return qkv.new_empty(qkv.shape)

    def _qkv_attention_setup_context(ctx, inputs, output):
        qkv, heads, causal, scale = inputs
        out, probs = output
        ctx.mark_non_differentiable(probs)
        ctx.save_for_backward(qkv, out, probs)
        ctx.heads, ctx.causal, ctx.scale = heads, causal, scale

    def _qkv_attention_backward(ctx, grad_out, _grad_probs):
        qkv, out, probs = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None
        grad_qkv = torch.ops.torchgraph.qkv_attention_backward.default(
            grad_out, qkv, out, probs, ctx.heads, ctx.causal, ctx.scale
        )
        return grad_qkv, None, None, None

    torch.library.register_autograd(
        "torchgraph::qkv_attention", _qkv_attention_backward, setup_context=_qkv_attention_setup_context
    )

    # NOTE: [No double backward] The *_backward ops have no autograd formula of their own, so a
    # second-order gradient through a fused op (torch.autograd.grad(..., create_graph=True), then
    # backward again) would silently come out as None or zeros. Registering a formula that raises
    # turns that into an error saying what to do; first-order training never reaches it.
    def _no_double_backward(op: str):
        def backward(ctx, *grads):
            raise RuntimeError(
                f"torchgraph::{op} is not twice differentiable: second-order gradients (e.g. a "
                "gradient penalty) through torchgraph's fused ops are not implemented. Where "
                "they are needed, use the original model rather than the tg.optimize(...) result."
            )

        return backward

    for _op in ("bias_act", "add_relu", "add_layer_norm", "qkv_attention"):
        torch.library.register_autograd(
            f"torchgraph::{_op}_backward",
            _no_double_backward(_op),
            setup_context=lambda ctx, inputs, output: None,
        )
