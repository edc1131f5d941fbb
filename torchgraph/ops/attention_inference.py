"""``attention_inference``: ``F.scaled_dot_product_attention``'s forward on the CPU, products on oneDNN."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extension
from ._common import is_tensor, references_check

__all__ = ["attention_inference", "reference_attention_inference", "sdpa_with_repeated_heads"]

_DTYPES = (torch.float32, torch.bfloat16)


def _check_attention_inference(query, key, value, attn_mask, is_causal: bool, enable_gqa: bool = False) -> None:
    """The twin of ``check_attention_inference`` in csrc/cpu/attention_inference.cpp (same messages)."""
    if not is_tensor(query, key, value):
        return
    op = "attention_inference"
    torch._check(
        query.dim() == 4 and key.dim() == 4 and value.dim() == 4,
        lambda: f"{op}: query, key and value must be 4-D (batch, heads, seq, head_dim), got shapes "
        f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}",
    )
    torch._check(
        query.dtype == key.dtype == value.dtype and query.dtype in _DTYPES,
        lambda: f"{op}: query, key and value must all be float32 or all bfloat16, got {query.dtype}, "
        f"{key.dtype}, {value.dtype}",
    )
    (b, h, _, d), (kb, kh, s, kd), (vb, vh, vs, _) = query.shape, key.shape, value.shape
    heads_ok = (kh > 0 and vh == kh and h % kh == 0) if enable_gqa else (kh == h and vh == h)
    heads = "Hk" if enable_gqa else "H"
    torch._check(
        kb == b and vb == b and heads_ok and kd == d and s == vs,
        lambda: f"{op}: expected key [B, {heads}, S, D] and value [B, {heads}, S, Dv] for query [B, H, T, D] = "
        f"{list(query.shape)}{' (H a multiple of Hk)' if enable_gqa else ''}, got key {list(key.shape)} and value "
        f"{list(value.shape)}",
    )
    torch._check(
        query.numel() > 0 and key.numel() > 0 and value.numel() > 0,
        lambda: f"{op}: empty query, key or value (shapes {list(query.shape)}, {list(key.shape)}, "
        f"{list(value.shape)})",
    )
    if attn_mask is not None:
        torch._check(not is_causal, lambda: f"{op}: attn_mask and is_causal=True cannot be given together")
        torch._check(
            attn_mask.dtype in (torch.bool, *_DTYPES),
            lambda: f"{op}: attn_mask must be bool, float32 or bfloat16, got {attn_mask.dtype}",
        )
        torch._check(attn_mask.dim() <= 4,
                     lambda: f"{op}: attn_mask must have at most 4 dims, got shape {list(attn_mask.shape)}")


def sdpa_with_repeated_heads(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                             scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, grouped heads (``enable_gqa``) repeated first: the same values (query
    head ``h`` reads key/value head ``h // n_rep`` either way) in ops every ONNX exporter translates (the legacy
    one has no ``enable_gqa``: "conversion of scaled_dot_product_attention not implemented if enable_gqa is True").

    Example:
        >>> q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
        >>> torch.allclose(sdpa_with_repeated_heads(q, k, v, enable_gqa=True),
        ...                F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-6)
        True
    """
    if enable_gqa and key.size(-3) != query.size(-3):
        repeats = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale)


def reference_attention_inference(query, key, value, attn_mask=None, is_causal: bool = False,
                                  scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Pure-PyTorch :func:`attention_inference`: ``F.scaled_dot_product_attention`` (grouped heads repeated, as
    :func:`sdpa_with_repeated_heads`)."""
    if references_check():  # NOTE: [Checks under compile]
        _check_attention_inference(query, key, value, attn_mask, is_causal, enable_gqa)
    return sdpa_with_repeated_heads(query, key, value, attn_mask, is_causal=is_causal, scale=scale,
                                    enable_gqa=enable_gqa)


def attention_inference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                        scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` for inference: the same values, its two products as oneDNN matmuls.

    For CPU float32/bfloat16 tensors with equal batch and head counts (or, with ``enable_gqa``, key/value
    heads that divide the query heads, as SDPA's: NOTE: [Grouped heads] in the kernel) and no dropout.
    ``attn_mask`` is SDPA's: boolean (True: attend) or added to the scores, broadcast to ``(B, H, T, S)``; a query row
    whose keys are all masked gives zeros, as SDPA does. The output has SDPA's layout (NOTE: [SDPA's
    output layout] in csrc/cpu/attention_inference.cpp). bfloat16 computes the scores and softmax in
    float32 and ``P @ V`` in bfloat16 with float32 accumulation. No backward: use
    ``F.scaled_dot_product_attention`` where gradients are needed
    (:func:`torchgraph.fused.scaled_dot_product_attention` picks for you). Other devices run SDPA. On CPUs
    where oneDNN's matmul does not run (AVX2 only), the products run on BLAS, with the same values.

    Example:
        >>> import torch.nn.functional as F
        >>> q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
        >>> mask = torch.rand(2, 1, 6, 5) > 0.3
        >>> expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        >>> torch.allclose(attention_inference(q, k, v, mask), expected, atol=1e-5)
        True

    Args:
        query: ``(B, H, T, D)``.
        key: ``(B, H, S, D)`` (``(B, Hk, S, D)`` with ``enable_gqa``).
        value: ``(B, H, S, Dv)`` (``(B, Hk, S, Dv)`` with ``enable_gqa``).
        attn_mask: None, bool or float, broadcastable to ``(B, H, T, S)``.
        is_causal: Key ``j`` is seen by query ``i`` only when ``j <= i`` (no ``attn_mask`` then).
        scale: Score scale; defaults to ``1 / sqrt(D)``.
        enable_gqa: Query head ``h`` attends with key/value head ``h // (H // Hk)`` (grouped-query attention).

    Returns:
        ``(B, H, T, Dv)`` in ``query``'s dtype.

    Raises:
        RuntimeError: On shapes or dtypes it does not take, or if gradients are requested.
    """
    if (_extension.HAS_C_OPS and isinstance(query, torch.Tensor) and query.device.type in ("cpu", "meta")
            and query.dtype in _DTYPES):
        return torch.ops.torchgraph.attention_inference.default(query, key, value, attn_mask, is_causal, scale,
                                                                enable_gqa)
    return reference_attention_inference(query, key, value, attn_mask, is_causal, scale, enable_gqa)


def sdpa_output_layout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An empty ``(B, H, T, Dv)`` tensor laid out as SDPA's CPU output for these inputs
    (NOTE: [SDPA's output layout] in csrc/cpu/attention_inference.cpp)."""
    shape = (*query.shape[:3], value.shape[3])
    if any(t.stride(3) != 1 for t in (query, key, value)) or value.shape[3] != query.shape[3]:
        return query.new_empty(shape)
    order = sorted(range(4), key=lambda d: -query.stride(d))  # stable: ties in dim order
    return query.new_empty([shape[d] for d in order]).permute([order.index(d) for d in range(4)])


# NOTE: [Registration needs _C] in torchgraph/ops/__init__.py.
if _extension.HAS_C_OPS:

    @torch.library.register_fake("torchgraph::attention_inference")
    def _attention_inference_fake(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
        _check_attention_inference(query, key, value, attn_mask, is_causal, enable_gqa)
        return sdpa_output_layout(query, key, value)

    # Its backward raises: registered in C++ (NOTE: [No backward in C++], csrc/no_backward.cpp).
