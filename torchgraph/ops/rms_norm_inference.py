"""``rms_norm_inference``: RMSNorm as LLaMA's code writes it (or torch's ``nn.RMSNorm``), in one pass over each row."""

from __future__ import annotations

import torch

from .. import _extension
from ._common import is_tensor, references_check

__all__ = ["reference_rms_norm_inference", "rms_norm_in_primitives", "rms_norm_inference"]

_DTYPES = (torch.float32, torch.bfloat16)


def _check_rms_norm_inference(x, weight) -> None:
    """The twin of ``check_rms_norm_inference`` in csrc/cpu/rms_norm_inference.cpp (same messages)."""
    if not is_tensor(x) or not (weight is None or is_tensor(weight)):
        return
    op = "rms_norm_inference"
    torch._check(x.dtype in _DTYPES, lambda: f"{op}: x must be float32 or bfloat16, got {x.dtype}")
    torch._check(x.dim() >= 1 and x.shape[-1] > 0,
                 lambda: f"{op}: x must have a non-empty last dim, got shape {list(x.shape)}")
    if weight is None:
        return
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                 lambda: f"{op}: weight must have shape [{x.shape[-1]}] (x's last dim), got {list(weight.shape)}")
    torch._check(weight.dtype == x.dtype,
                 lambda: f"{op}: weight dtype must equal x dtype {x.dtype}, got {weight.dtype}")


def rms_norm_in_primitives(input, normalized_shape, weight=None, eps=None):
    """``F.rms_norm`` as torch computes it on CPU, in plain ops (every ONNX opset has them): in float32
    (float64 for float64 inputs), ``eps=None`` that type's epsilon, the weight multiplied before the one
    rounding to the input's dtype.

    Example:
        >>> import torch.nn.functional as F
        >>> x, w = torch.randn(2, 3, 8), torch.rand(8)
        >>> torch.allclose(rms_norm_in_primitives(x, (8,), w, 1e-6), F.rms_norm(x, (8,), w, 1e-6), atol=1e-6)
        True
    """
    dims = tuple(range(-len(normalized_shape), 0))
    acc = torch.promote_types(input.dtype, torch.float32)
    x = input.to(acc)
    eps = torch.finfo(acc).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(input.dtype)


def reference_rms_norm_inference(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                                 weight_in_float32: bool = False) -> torch.Tensor:
    """Pure-PyTorch :func:`rms_norm_inference`: HF ``LlamaRMSNorm.forward`` op for op, or with
    ``weight_in_float32`` (or no weight) torch's ``F.rms_norm`` on CPU (:func:`rms_norm_in_primitives`)."""
    if references_check():  # NOTE: [Checks under compile]
        _check_rms_norm_inference(x, weight)
    if weight is None or weight_in_float32:
        return rms_norm_in_primitives(x, (x.shape[-1],), weight, eps)
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype)


def rms_norm_inference(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                       weight_in_float32: bool = False) -> torch.Tensor:
    """RMSNorm as HF ``LlamaRMSNorm`` computes it: ``weight * (x * rsqrt(mean(x**2, -1) + eps)).to(x.dtype)``
    with the normalisation in float32, in one pass over each row; with ``weight_in_float32``, as torch's
    ``nn.RMSNorm`` / ``F.rms_norm`` compute it on CPU: ``(weight * x * rsqrt(...))`` all in float32,
    rounded to ``x``'s dtype once (in float32 the two are the same).

    The written-out form is seven elementwise ops and two casts per norm, and torch's own ``F.rms_norm``
    is composite on CPU; ``tg.optimize`` rewrites both to this op (inference only: it has no backward).
    float32 and bfloat16 CPU tensors run the kernel, the rest the reference.

    Example:
        >>> x, weight = torch.randn(2, 5, 8), torch.rand(8)
        >>> variance = x.pow(2).mean(-1, keepdim=True)
        >>> torch.allclose(rms_norm_inference(x, weight, 1e-6), weight * (x * torch.rsqrt(variance + 1e-6)),
        ...                atol=1e-6)
        True

    Args:
        x: ``(..., C)``, float32 or bfloat16.
        weight: ``(C,)``, x's dtype, or None (no scale).
        eps: Added to the mean of squares.
        weight_in_float32: Multiply by the weight before rounding to x's dtype (torch's rounding), not after
            (HF's).

    Returns:
        ``x``'s shape and dtype.

    Raises:
        RuntimeError: On other shapes or dtypes, or if gradients are requested.
    """
    if (_extension.HAS_C_OPS and isinstance(x, torch.Tensor) and x.device.type in ("cpu", "meta")
            and x.dtype in _DTYPES):
        return torch.ops.torchgraph.rms_norm_inference.default(x, weight, eps, weight_in_float32)
    return reference_rms_norm_inference(x, weight, eps, weight_in_float32)


# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::rms_norm_inference")
    def _rms_norm_inference_fake(x, weight, eps, weight_in_float32=False):
        _check_rms_norm_inference(x, weight)
        return x.new_empty(x.shape)

    # Its backward raises: registered in C++ (NOTE: [No backward in C++], csrc/no_backward.cpp).
