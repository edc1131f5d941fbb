"""``qkv_attention``: multi-head attention straight from a packed ``q | k | v`` projection."""

from __future__ import annotations

import torch

from .. import _extension
from ._common import (call_op, check_float_dtype, check_like, is_tensor, no_double_backward, references_check,
                      use_kernel)

__all__ = ["merge_heads", "qkv_attention", "reference_qkv_attention", "split_qkv_heads"]


def split_qkv_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v``, each ``(B, heads, T, E // heads)``, as views of a packed ``(B, T, 3E)`` projection (no copies).

    Example:
        >>> import torch
        >>> q, k, v = split_qkv_heads(torch.randn(2, 5, 3 * 8), heads=4)
        >>> q.shape, q.is_contiguous()
        (torch.Size([2, 4, 5, 2]), False)
    """
    return tuple(z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in qkv.chunk(3, dim=-1))


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """Attention's ``(B, heads, T, D)`` output with its heads side by side again: ``(B, T, heads * D)``.

    Example:
        >>> import torch
        >>> merge_heads(torch.randn(2, 4, 5, 2)).shape
        torch.Size([2, 5, 8])
    """
    batch, heads, seq, dim = out.shape
    return out.transpose(1, 2).reshape(batch, seq, heads * dim)


def _check_qkv_attention(qkv, heads: int, *, kernel: bool) -> None:
    if not is_tensor(qkv):
        return
    if kernel:
        check_float_dtype("qkv_attention", "qkv", qkv)
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
        check_like("qkv_attention_backward", name, tensor, qkv)
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


def reference_qkv_attention(
    qkv: torch.Tensor, heads: int, causal: bool, scale: float | None = None, onednn: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch ``torch.ops.torchgraph.qkv_attention``: ``(out, probs)`` by explicit softmax.

    ``onednn`` (which GEMM library the CPU kernel uses) does not change the result and is ignored.

    ``qkv`` is ``(B, T, 3 * E)``: queries, keys and values side by side, each ``heads`` heads of
    ``E // heads`` features. ``out`` is ``(B, T, E)`` (heads side by side again), ``probs`` the
    attention weights ``(B, heads, T, T)`` (float32 for a bfloat16 ``qkv``).
    """
    if references_check():  # NOTE: [Checks under compile]
        _check_qkv_attention(qkv, heads, kernel=False)
    t = qkv.shape[1]
    q, k, v = split_qkv_heads(qkv, heads)
    compute = torch.float32 if qkv.dtype == torch.bfloat16 else qkv.dtype
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(t, t, dtype=torch.bool, device=qkv.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = merge_heads(probs @ v).to(qkv.dtype)
    return out, probs


def qkv_attention(
    qkv: torch.Tensor, heads: int, causal: bool = False, scale: float | None = None, *, onednn: bool = False
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
        onednn: Run the float32 CPU kernel's two products as batched oneDNN matmuls (NOTE:
            [Attention GEMMs on oneDNN] in csrc/cpu/qkv_attention.cpp) instead of per-head BLAS
            calls: faster where MKL is slow (:data:`torchgraph.fused.cpu_profile.MKL_GEMMS_FAST`).
            The same results up to float rounding; ignored by the backward and other dtypes.

    Returns:
        ``(B, T, E)``. Differentiable with respect to ``qkv``.

    Raises:
        RuntimeError: If ``qkv`` is not 3-D or its last dim is not ``3 * heads * head_dim``.
    """
    if use_kernel(qkv) and (not isinstance(qkv, torch.Tensor) or qkv.device.type in ("cpu", "meta")):
        return call_op(torch.ops.torchgraph.qkv_attention.default, qkv, heads, causal, scale, onednn)[0]
    return reference_qkv_attention(qkv, heads, causal, scale)[0]

# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::qkv_attention")
    def _qkv_attention_fake(qkv, heads, causal, scale=None, onednn=False):
        _check_qkv_attention(qkv, heads, kernel=True)
        b, t, width = qkv.shape
        probs_dtype = torch.float32 if qkv.dtype == torch.bfloat16 else qkv.dtype
        return qkv.new_empty((b, t, width // 3)), qkv.new_empty((b, heads, t, t), dtype=probs_dtype)

    @torch.library.register_fake("torchgraph::qkv_attention_backward")
    def _qkv_attention_backward_fake(grad_out, qkv, out, probs, heads, causal, scale):
        _check_qkv_attention_backward(grad_out, qkv, out, probs, heads)
        return qkv.new_empty(qkv.shape)

    def _qkv_attention_setup_context(ctx, inputs, output):
        qkv, heads, causal, scale = inputs[:4]
        out, probs = output
        ctx.mark_non_differentiable(probs)
        ctx.save_for_backward(qkv, out, probs)
        ctx.heads, ctx.causal, ctx.scale = heads, causal, scale

    def _qkv_attention_backward(ctx, grad_out, _grad_probs):
        qkv, out, probs = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None
        grad_qkv = torch.ops.torchgraph.qkv_attention_backward.default(
            grad_out, qkv, out, probs, ctx.heads, ctx.causal, ctx.scale
        )
        return grad_qkv, None, None, None, None

    torch.library.register_autograd(
        "torchgraph::qkv_attention", _qkv_attention_backward, setup_context=_qkv_attention_setup_context
    )

    # NOTE: [No double backward] The *_backward ops have no autograd formula of their own, so a
    # second-order gradient through a fused op (torch.autograd.grad(..., create_graph=True), then
    # backward again) would silently come out as None or zeros. Registering a formula that raises

    no_double_backward("qkv_attention")
