"""``act(conv2d(x) + residual)`` in one call: :func:`conv2d_add_act` (the plans and paths of
:func:`torchgraph.fused.conv.conv2d_act`, with the residual add in the convolution's epilogue)."""

from __future__ import annotations

import torch
import torch.fx

from ._common import _activation, _activation_, _needs_grad, use_onednn
from . import conv as _conv  # NOTE: read through the module, so that tests and benchmarks can patch conv's names
from .weights import _packed_weight

__all__ = ["RESIDUAL_ACTIVATIONS", "conv2d_add_act"]


#: Activations :func:`conv2d_add_act` applies after the residual add.
RESIDUAL_ACTIVATIONS = ("none", "relu")


# NOTE: [Residual in the convolution] oneDNN adds the residual inside the convolution's epilogue
# (``_convolution_pointwise.binary``, "add" then the activation), so the sum never makes a second
# pass over memory: measured here for the last 1x1 convolution of ResNet-50's bottlenecks (batch 8,
# 64x64; 1 and 2 threads, interleaved medians) it took 0.71-0.96x the time of the convolution then
# ``ops.add_relu``, with identical values.
def conv2d_add_act(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: list, padding: list, dilation: list, groups: int, act: str = "none",
                   channels_last: bool = False) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, ...) + residual)`` in one fused call where possible.

    ``tg.optimize`` (inference) writes this for a ResNet block's ``relu(bn3(conv3(out)) + identity)``
    and MobileNetV2's ``x + conv(x)``. The paths are :func:`~torchgraph.fused.conv.conv2d_act`'s: oneDNN's convolution with
    the add and activation in its epilogue (NOTE: [Residual in the convolution]), the MKL GEMM for
    few output pixels (then the add and activation in place), and standard ops everywhere else
    (gradients, other devices and dtypes, traced programs and exporters).

    Args:
        x: input ``(N, C, H, W)``.
        residual: a tensor of the convolution output's shape (no broadcasting).
        weight, bias, stride, padding, dilation, groups: the convolution's, as for :func:`~torchgraph.fused.conv.conv2d_act`.
        act: ``"none"`` or ``"relu"`` (``RESIDUAL_ACTIVATIONS``), applied after the add.
        channels_last: answer in channels_last on the oneDNN path.

    Returns:
        ``act(conv + residual)``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x, w, r = torch.randn(2, 8, 5, 5), torch.randn(8, 8, 1, 1), torch.randn(2, 8, 5, 5)
        >>> with torch.no_grad():
        ...     y = conv2d_add_act(x, r, w, None, [1, 1], [0, 0], [1, 1], 1, "relu", channels_last=True)
        >>> torch.allclose(y, F.relu(F.conv2d(x, w) + r), atol=1e-5)
        True
    """
    if isinstance(x, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        args = (x, residual, weight, bias, stride, padding, dilation, groups, act)
        kwargs = {"channels_last": True} if channels_last else {}
        return x.tracer.create_proxy("call_function", conv2d_add_act, args, kwargs)
    if act not in RESIDUAL_ACTIVATIONS:
        raise ValueError(f"conv2d_add_act: act must be one of {RESIDUAL_ACTIVATIONS}; received {act!r}.")
    key = (stride, padding, dilation, groups, act, channels_last, *_conv._limits())
    plan = _conv._ADD_PLANS.get(id(weight))
    if (plan is not None and type(x) is torch.Tensor and type(residual) is torch.Tensor  # noqa: E721
            and plan.holds(x, weight, bias, key) and plan.takes_residual(residual)):
        return plan.run_add(x, residual, bias)
    # The fused paths need the residual in the output's shape; a broadcasting one (a direct call;
    # tg.optimize never writes one) takes the standard path, which broadcasts as eager does.
    if (use_onednn(x, weight, bias, residual) and x.dim() == 4 and type(residual) is torch.Tensor  # noqa: E721
            and not _needs_grad(residual)
            and tuple(residual.shape) == _conv._output_shape(x, weight, stride, padding, dilation)):
        plan = _conv._new_plan(_conv._ADD_PLANS, x, weight, bias, key, residual=True)
        if plan is not None:
            return plan.run_add(x, residual, bias)
        rows = _conv._conv_gemm_rows(x, weight, stride, padding, dilation, groups)
        y = _conv._conv_gemm(x, weight, bias, stride, padding, rows) if rows else None
        if y is not None:
            y = _activation_(y.add_(residual), act)  # y is new: nobody else holds it
            return y if channels_last else y.contiguous()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            packed = _packed_weight(weight, padding, stride, dilation, groups, x.shape)
            unary = "relu" if act == "relu" else None  # the binary op refuses "none"
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual.contiguous(memory_format=torch.channels_last), packed, bias, padding, stride,
                dilation, groups, "add", 1.0, unary, [], "")
            return y
    y = _conv.conv2d_act(x, weight, bias, stride, padding, dilation, groups, "none", channels_last) + residual
    return _activation(y, act)
