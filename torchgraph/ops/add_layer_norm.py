"""``add_layer_norm``: residual add + LayerNorm, returning both (the pre-LN transformer's stream)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extension
from ._common import (call_op, check_float_dtype, check_like, is_tensor, no_double_backward, references_check,
                      use_kernel)

__all__ = ["add_layer_norm", "reference_add_layer_norm"]


def _check_add_layer_norm(x, residual, weight, bias, eps: float, *, kernel: bool) -> None:
    if not is_tensor(x, residual):
        return
    if kernel:
        check_float_dtype("add_layer_norm", "x", x)
    check_like("add_layer_norm", "residual", residual, x)
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
        check_like("add_layer_norm", name, param, x)
        torch._check(
            param.dim() == 1 and param.shape[0] == channels,
            lambda: f"add_layer_norm: {name} must have shape [{channels}] (x.size(-1)), "
            f"got {list(param.shape)}",
        )
    torch._check(eps >= 0, lambda: f"add_layer_norm: eps must be non-negative, got {eps}")


def reference_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch :func:`add_layer_norm`: ``(layer_norm(x + residual), x + residual)``."""
    if references_check():  # NOTE: [Checks under compile]
        _check_add_layer_norm(x, residual, weight, bias, eps, kernel=False)
    residual_out = x + residual
    # the feature size as a plain int: under torch.jit.trace (the legacy ONNX exporter) a size read from the
    # tensor is a traced value, which F.layer_norm's normalized_shape cannot take
    out = F.layer_norm(residual_out, (int(residual_out.shape[-1]),), weight, bias, eps)
    return out, residual_out


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
    if use_kernel(x):
        return call_op(torch.ops.torchgraph.add_layer_norm.default, x, residual, weight, bias, eps)
    return reference_add_layer_norm(x, residual, weight, bias, eps)

# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::add_layer_norm")
    def _add_layer_norm_fake(x, residual, weight, bias, eps=1e-5):
        _check_add_layer_norm(x, residual, weight, bias, eps, kernel=True)
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake("torchgraph::add_layer_norm_backward")
    def _add_layer_norm_backward_fake(grad_out, grad_residual_out, residual_out, weight, eps):
        check_float_dtype("add_layer_norm_backward", "residual_out", residual_out)
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

    no_double_backward("add_layer_norm")
