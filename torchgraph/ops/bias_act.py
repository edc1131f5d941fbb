"""``bias_act``: bias along one dim + activation in one pass (linear and conv epilogues)."""

from __future__ import annotations

import torch

from .. import _extension
from ._common import (ACTIVATIONS, ACTIVATION_FNS, call_op, check_float_dtype, check_like, dense_format, is_tensor,
                      no_double_backward, references_check, use_kernel)

__all__ = ["bias_act", "reference_bias_act"]


def _check_bias_act(x, bias, act: str, dim: int, *, kernel: bool) -> None:
    torch._check(
        act in ACTIVATIONS,
        lambda: "bias_act: act must be one of 'none', 'relu', 'gelu', 'gelu_tanh', 'silu', "
        f"got '{act}'",
    )
    if not is_tensor(x, bias):
        return
    if kernel:
        check_float_dtype("bias_act", "x", x)
    check_like("bias_act", "bias", bias, x)
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


def reference_bias_act(
    x: torch.Tensor, bias: torch.Tensor, act: str, dim: int = -1
) -> torch.Tensor:
    """Pure-PyTorch :func:`bias_act`: ``act(x + bias)`` with bias along ``dim``."""
    if references_check():  # NOTE: [Checks under compile]
        _check_bias_act(x, bias, act, dim, kernel=False)
    # Trailing singleton dims put bias on `dim`; a negative dim needs no x.dim(),
    # which keeps this traceable with a torch.fx.Proxy.
    trailing = -dim - 1 if dim < 0 else x.dim() - dim - 1
    if trailing:
        bias = bias.reshape([-1] + [1] * trailing)
    return ACTIVATION_FNS[act](x + bias)


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
    if use_kernel(x):
        return call_op(torch.ops.torchgraph.bias_act.default, x, bias, act, dim)
    return reference_bias_act(x, bias, act, dim)

# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::bias_act")
    def _bias_act_fake(x, bias, act, dim=-1):
        _check_bias_act(x, bias, act, dim, kernel=True)
        return torch.empty_like(x, memory_format=dense_format(x))

    @torch.library.register_fake("torchgraph::bias_act_backward")
    def _bias_act_backward_fake(grad, x, bias, act, dim):
        _check_bias_act(x, bias, act, dim, kernel=True)
        return torch.empty_like(x, memory_format=dense_format(x)), torch.empty_like(bias)

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

    no_double_backward("bias_act")
