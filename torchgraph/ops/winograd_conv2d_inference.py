"""``winograd_conv2d_inference``: a stride-1 3x3 convolution with its bias, residual and activation by Winograd's minimal
filtering F(2x2, 3x3), on channels_last maps, from filters transformed once (:func:`winograd_filters`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _extension
from ._common import (ACTIVATION_FNS, check_float32_bias, check_padded_map, check_padding, is_tensor, pair,
                      references_check)
from .gemm_act_inference import GEMM_ACTIVATIONS, GEMM_PANEL, _weight_from_panels, gemm_panels

__all__ = ["WINOGRAD_ACTIVATIONS", "reference_winograd_conv2d_inference", "winograd_conv2d_inference",
           "winograd_filters"]

#: Activations the kernel applies after the bias (their PyTorch functions: ``ACTIVATION_FNS``).
WINOGRAD_ACTIVATIONS = GEMM_ACTIVATIONS

# F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): the 2x2 outputs of a
# 4x4 input tile d are A^T [(G g G^T) * (B^T d B)] A. The kernel applies B and A with additions only.
_B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_A_T = ((1, 1, 1, 0), (0, 1, -1, -1))


def winograd_filters(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``(K, C, 3, 3)`` as the kernel reads it: ``(16, ceil(K / 16), C, 16)``, the ``(i, j)`` elements
    of ``G g G^T`` for every filter ``g = weight[k, c]`` (computed in float64, rounded once) at ``[4i + j]``, as
    ops.gemm_panels lays out a ``(K, C)`` weight (output channel ``k`` at ``[:, k // 16, :, k % 16]``, zeros
    beyond ``K``). Built once per weight (``tg.optimize``'s convolution plans keep it).

    Example:
        >>> w = torch.zeros(1, 1, 3, 3)
        >>> w[0, 0, 1, 1] = 1.0  # the identity filter
        >>> winograd_filters(w)[:, 0, 0, 0].view(4, 4)[1:3, 1:3].tolist()
        [[0.25, -0.25], [-0.25, 0.25]]
    """
    torch._check(weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3),
                 lambda: f"winograd_filters: weight must be (out_channels, in_channels, 3, 3), got shape "
                 f"{list(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    out_channels, in_channels = weight.shape[:2]
    transformed = torch.einsum("ij,kcjl,ml->imkc", g, weight.detach().double(), g)  # (4, 4, K, C)
    matrices = transformed.reshape(16, out_channels, in_channels)
    return torch.stack([gemm_panels(matrix) for matrix in matrices]).to(weight.dtype)


def _products(filters: torch.Tensor, out_channels: int) -> torch.Tensor:
    """:func:`winograd_filters`' panels as the 16 ``(C, K)`` matrices they hold."""
    return torch.stack([_weight_from_panels(panels, out_channels).T for panels in filters])


def _check_winograd_conv2d_inference(x, filters, bias, out_channels, padding, act, residual=None) -> None:
    """The twin of ``check_winograd_conv2d_inference`` in csrc/cpu/winograd_conv2d_inference.cpp (same messages)."""
    op = "winograd_conv2d_inference"
    torch._check(act in WINOGRAD_ACTIVATIONS,
                 lambda: f"{op}: act must be one of {', '.join(WINOGRAD_ACTIVATIONS)}, got '{act}'")
    if not is_tensor(x, filters) or not (bias is None or is_tensor(bias)):
        return
    torch._check(x.dtype == torch.float32, lambda: f"{op}: x must be float32, got {x.dtype}")
    torch._check(x.dim() == 4 and x.shape[1] > 0 and x.shape[2] > 0 and x.shape[3] > 0,
                 lambda: f"{op}: x must be 4-D (N, C, H, W) with non-zero C, H, W, got shape {list(x.shape)}")
    torch._check(filters.dtype == torch.float32, lambda: f"{op}: filters must be float32, got {filters.dtype}")
    channels, panels = x.shape[1], -(-out_channels // GEMM_PANEL)
    torch._check(out_channels > 0 and tuple(filters.shape) == (16, panels, channels, GEMM_PANEL),
                 lambda: f"{op}: filters must have shape [16, {panels}, {channels}, 16] for {out_channels} output "
                 f"channels and {channels} input channels (ops.winograd_filters(weight)), got {list(filters.shape)}")
    check_float32_bias(op, "bias", bias, out_channels)
    padding = list(padding)
    check_padding(op, padding)
    height, width = check_padded_map(op, x, padding, 3, 3)
    if residual is not None and is_tensor(residual):
        shape = [x.shape[0], out_channels, height - 2, width - 2]
        torch._check(list(residual.shape) == shape,
                     lambda: f"{op}: residual must have the output's shape {shape}, got {list(residual.shape)}")
        torch._check(residual.dtype == torch.float32, lambda: f"{op}: residual must be float32, got {residual.dtype}")


def reference_winograd_conv2d_inference(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None,
                                        out_channels: int, padding: Sequence[int], act: str = "none",
                                        residual: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch :func:`winograd_conv2d_inference`: the same F(2x2, 3x3) arithmetic (input tiles, the 16
    products, output tiles) with standard ops, then the bias, the residual and the activation, answered in
    channels_last."""
    padding = pair(padding) if isinstance(padding, int) else list(padding)
    if references_check():  # NOTE: [Checks under compile]
        _check_winograd_conv2d_inference(x, filters, bias, out_channels, padding, act, residual)
    n, channels, height, width = x.shape
    ph, pw = padding
    out_h, out_w = height + 2 * ph - 2, width + 2 * pw - 2
    tiles_h, tiles_w = (out_h + 1) // 2, (out_w + 1) // 2
    padded = F.pad(x, (pw, pw + 2 * tiles_w - out_w, ph, ph + 2 * tiles_h - out_h))
    d = padded.unfold(2, 4, 2).unfold(3, 4, 2)  # (n, C, tiles_h, tiles_w, 4, 4)
    b_t = torch.tensor(_B_T, dtype=x.dtype, device=x.device)
    a_t = torch.tensor(_A_T, dtype=x.dtype, device=x.device)
    v = torch.einsum("ij,ncyxjk,lk->ilnyxc", b_t, d, b_t).reshape(16, -1, channels)
    m = torch.bmm(v, _products(filters, out_channels)).reshape(4, 4, n, tiles_h, tiles_w, out_channels)
    y = torch.einsum("ij,jlnyxk,ml->nkyixm", a_t, m, a_t).reshape(n, out_channels, 2 * tiles_h, 2 * tiles_w)
    y = y[:, :, :out_h, :out_w]
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return ACTIVATION_FNS[act](y).contiguous(memory_format=torch.channels_last)


def winograd_conv2d_inference(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, out_channels: int,
                              padding: int | Sequence[int] = 1, act: str = "none",
                              residual: torch.Tensor | None = None) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, stride=1, padding) + residual)`` for a 3x3 ``weight`` given as
    ``winograd_filters(weight)``, by Winograd's F(2x2, 3x3) on channels_last maps (inference only: it has no
    backward).

    Each 2x2 block of outputs comes from a 4x4 tile of inputs with 16 products per input-output channel pair
    instead of 36: the tiles' transforms are additions, and the products are 16 GEMMs over the input channels.
    ``tg.optimize`` runs the stride-1 3x3 convolutions of ResNets with it where that is faster (NOTE: [Winograd
    convolutions] in torchgraph/fused/conv.py). float32 CPU tensors run the kernel, the rest the reference.
    The output is channels_last; its rounding differs from a direct convolution's (float32 sums in another
    order), by as much as a direct convolution's own error against float64 or less.

    Example:
        >>> import torch.nn.functional as F
        >>> x, w, b = torch.randn(2, 16, 9, 9), torch.randn(8, 16, 3, 3), torch.randn(8)
        >>> y = winograd_conv2d_inference(x, winograd_filters(w), b, 8, padding=1, act="relu")
        >>> torch.allclose(y, F.relu(F.conv2d(x, w, b, padding=1)), atol=1e-4)
        True

    Args:
        x: ``(N, C, H, W)`` float32.
        filters: ``winograd_filters(weight)`` for ``weight`` ``(K, C, 3, 3)``: ``(16, ceil(K / 16), C, 16)``.
        bias: ``(K,)`` or None.
        out_channels: ``K``.
        padding: an int or a pair (zeros around the map; the stride is 1).
        act: ``"none"``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"``, ``"gelu"`` or ``"gelu_tanh"``,
            applied after the residual.
        residual: a float32 tensor of the output's shape added before the activation (a ResNet basic block's
            identity), or None.

    Returns:
        ``(N, K, H + 2 * padding - 2, W + 2 * padding - 2)`` in channels_last.

    Raises:
        RuntimeError: On other shapes, dtypes or activations, or if gradients are requested.
    """
    padding = pair(padding) if isinstance(padding, int) else list(padding)
    if (_extension.HAS_C_OPS and isinstance(x, torch.Tensor) and x.device.type in ("cpu", "meta")
            and x.dtype == torch.float32):
        return torch.ops.torchgraph.winograd_conv2d_inference.default(x, filters, bias, out_channels, padding, act,
                                                                      residual)
    return reference_winograd_conv2d_inference(x, filters, bias, out_channels, padding, act, residual)


# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::winograd_conv2d_inference")
    def _winograd_conv2d_inference_fake(x, filters, bias, out_channels, padding, act="none", residual=None):
        _check_winograd_conv2d_inference(x, filters, bias, out_channels, padding, act, residual)
        height, width = x.shape[2] + 2 * padding[0] - 2, x.shape[3] + 2 * padding[1] - 2
        return torch.empty((x.shape[0], out_channels, height, width), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    # Its backward raises: registered in C++ (NOTE: [No backward in C++], csrc/no_backward.cpp).
