"""``gemm_act_inference``: ``act(x @ weight.T + bias + residual)`` in float32, from filters stored once as
16-channel panels: the GEMM of a 1x1 convolution on channels_last rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extension
from ._common import ACTIVATION_FNS, check_float32_bias, is_tensor, references_check

__all__ = ["GEMM_ACTIVATIONS", "GEMM_PANEL", "gemm_act_inference", "gemm_panels", "reference_gemm_act_inference"]

#: Activations the kernel applies after the bias and residual (their PyTorch functions: ``ACTIVATION_FNS``).
GEMM_ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish", "gelu", "gelu_tanh")
#: Output channels per panel of :func:`gemm_panels`.
GEMM_PANEL = 16


def gemm_panels(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``(N, K)`` as the panels the kernel reads: ``(ceil(N / 16), K, 16)``, panel ``p``
    holding output channels ``16p .. 16p + 15`` for every ``k``, zeros beyond ``N``. Built once per
    weight (``tg.optimize``'s convolution plans and linears keep it).

    Example:
        >>> w = torch.randn(20, 3)
        >>> panels = gemm_panels(w)
        >>> panels.shape, torch.equal(panels[1, :, :4], w[16:].T), bool(panels[1, :, 4:].eq(0).all())
        (torch.Size([2, 3, 16]), True, True)
    """
    torch._check(weight.dim() == 2, lambda: f"gemm_panels: weight must be 2-D (out_features, in_features), "
                 f"got shape {list(weight.shape)}")
    matrix = weight.detach()
    out_features, in_features = matrix.shape
    count = -(-out_features // GEMM_PANEL)
    padded = matrix.new_zeros(count * GEMM_PANEL, in_features)
    padded[:out_features] = matrix
    return padded.view(count, GEMM_PANEL, in_features).transpose(1, 2).contiguous()


def _weight_from_panels(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:out_features]


def _check_gemm_act_inference(x, panels, bias, residual, out_features, act) -> None:
    """The twin of ``check_gemm_act_inference`` in csrc/cpu/gemm_act_inference.cpp (same messages)."""
    op = "gemm_act_inference"
    torch._check(act in GEMM_ACTIVATIONS,
                 lambda: f"{op}: act must be one of {', '.join(GEMM_ACTIVATIONS)}, got '{act}'")
    if not is_tensor(x, panels) or not all(t is None or is_tensor(t) for t in (bias, residual)):
        return
    torch._check(x.dtype == torch.float32, lambda: f"{op}: x must be float32, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D (rows, in_features), got shape {list(x.shape)}")
    torch._check(panels.dtype == torch.float32, lambda: f"{op}: panels must be float32, got {panels.dtype}")
    count, in_features = -(-out_features // GEMM_PANEL), x.shape[1]
    torch._check(out_features > 0 and tuple(panels.shape) == (count, in_features, GEMM_PANEL),
                 lambda: f"{op}: panels must have shape [{count}, {in_features}, 16] for {out_features} output "
                 f"features and {in_features} input features (ops.gemm_panels(weight)), got {list(panels.shape)}")
    check_float32_bias(op, "bias", bias, out_features)
    if residual is not None:
        torch._check(tuple(residual.shape) == (x.shape[0], out_features),
                     lambda: f"{op}: residual must have shape [{x.shape[0]}, {out_features}], got "
                     f"{list(residual.shape)}")
        torch._check(residual.dtype == torch.float32,
                     lambda: f"{op}: residual must be float32, got {residual.dtype}")


def reference_gemm_act_inference(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None,
                                 residual: torch.Tensor | None, out_features: int,
                                 act: str = "none") -> torch.Tensor:
    """Pure-PyTorch :func:`gemm_act_inference`: ``F.linear`` on the weight the panels hold, then the
    residual and the activation."""
    if references_check():  # NOTE: [Checks under compile]
        _check_gemm_act_inference(x, panels, bias, residual, out_features, act)
    y = F.linear(x, _weight_from_panels(panels, out_features), bias)
    return ACTIVATION_FNS[act](y if residual is None else y + residual).contiguous()


def gemm_act_inference(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None,
                       residual: torch.Tensor | None, out_features: int, act: str = "none") -> torch.Tensor:
    """``act(x @ weight.T + bias + residual)`` in float32, ``weight`` given as :func:`gemm_panels` (inference
    only: it has no backward).

    A register-tiled GEMM (6 rows x 16 output channels of sums in AVX2 registers, 12 x 32 on AVX-512) with
    the bias, residual and activation applied before its one store. ``tg.optimize`` runs the GEMMs of 1x1
    convolutions on it where oneDNN's float32 matmul is slow (NOTE: [GEMM kernel] in
    torchgraph/fused/conv.py). float32 CPU tensors run the kernel, the rest the reference.

    Example:
        >>> import torch.nn.functional as F
        >>> x, w, b, r = torch.randn(10, 24), torch.randn(40, 24), torch.randn(40), torch.randn(10, 40)
        >>> y = gemm_act_inference(x, gemm_panels(w), b, r, 40, act="relu6")
        >>> torch.allclose(y, F.relu6(F.linear(x, w, b) + r), atol=1e-5)
        True

    Args:
        x: ``(M, K)`` float32 (any row stride; columns adjacent, else copied).
        panels: ``gemm_panels(weight)`` for ``weight`` ``(N, K)``.
        bias: ``(N,)`` or None.
        residual: ``(M, N)`` added before the activation, or None.
        out_features: ``N`` (the panels hold ``16 * ceil(N / 16)`` channels, the last zero).
        act: ``"none"``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"``, ``"gelu"`` or ``"gelu_tanh"``.

    Returns:
        A new ``(M, N)`` row-major tensor.

    Raises:
        RuntimeError: On other shapes, dtypes or activations, or if gradients are requested.
    """
    if (_extension.HAS_C_OPS and isinstance(x, torch.Tensor) and x.device.type in ("cpu", "meta")
            and x.dtype == torch.float32):
        return torch.ops.torchgraph.gemm_act_inference.default(x, panels, bias, residual, out_features, act)
    return reference_gemm_act_inference(x, panels, bias, residual, out_features, act)


# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::gemm_act_inference")
    def _gemm_act_inference_fake(x, panels, bias, residual, out_features, act="none"):
        _check_gemm_act_inference(x, panels, bias, residual, out_features, act)
        return x.new_empty((x.shape[0], out_features))

    # Its backward raises: registered in C++ (NOTE: [No backward in C++], csrc/no_backward.cpp).
