"""``add_relu``: ``relu(a + b)`` in one pass (the ResNet residual)."""

from __future__ import annotations

import torch

from .. import _extension
from ._common import (call_op, check_float_dtype, dense_format, is_tensor, no_double_backward, references_check,
                      use_kernel)

__all__ = ["add_relu", "reference_add_relu"]


def _check_add_relu(a, b, *, kernel: bool) -> None:
    if not is_tensor(a, b):
        return
    if kernel:
        check_float_dtype("add_relu", "a", a)
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


def reference_add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch :func:`add_relu`: ``relu(a + b)``."""
    if references_check():  # NOTE: [Checks under compile]
        _check_add_relu(a, b, kernel=False)
    return torch.relu(a + b)


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
    if use_kernel(a):
        return call_op(torch.ops.torchgraph.add_relu.default, a, b)
    return reference_add_relu(a, b)


# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::add_relu")
    def _add_relu_fake(a, b):
        _check_add_relu(a, b, kernel=True)
        return torch.empty_like(a, memory_format=dense_format(a))

    @torch.library.register_fake("torchgraph::add_relu_backward")
    def _add_relu_backward_fake(grad, out):
        check_float_dtype("add_relu_backward", "out", out)
        torch._check(
            grad.shape == out.shape,
            lambda: f"add_relu_backward: grad must have out's shape {list(out.shape)}, "
            f"got {list(grad.shape)}",
        )
        return torch.empty_like(out, memory_format=dense_format(out))

    def _add_relu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    def _add_relu_backward(ctx, grad):
        (out,) = ctx.saved_tensors
        grad_in = torch.ops.torchgraph.add_relu_backward.default(grad, out)
        return grad_in, grad_in

    torch.library.register_autograd(
        "torchgraph::add_relu", _add_relu_backward, setup_context=_add_relu_setup_context
    )

    no_double_backward("add_relu")
