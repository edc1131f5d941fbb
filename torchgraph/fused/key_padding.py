"""``nn.TransformerEncoder``'s key padding mask, written out for ``tg.optimize``: self-attention that skips
padded keys (:func:`qkv_attention_with_padding`) and the zeros that the encoder's nested-tensor fast path
leaves at padded positions (:func:`padded_output_as_nested`).

NOTE: [Eager's padded positions] In eval mode under ``no_grad`` (or with frozen weights) torch runs an
encoder on its native fast path, whose results differ from the Python path's in two places, both of
which these functions reproduce (measured on torch 2.13, CPU):

* a post-norm ``nn.TransformerEncoder`` (``use_nested_tensor``) given a left-aligned mask (each sample's
  padding after its tokens) packs the tokens into a nested tensor and returns zeros at every padded
  position (before its final ``norm``); any other mask, and every pre-norm encoder, leave the values
  that the padded queries computed there;
* a sample whose keys are all padding gets NaN from the native attention (masked softmax over no key);
  SDPA, on the Python path, gives zeros.

Both follow the fast path's run-time switches: ``torch.backends.mha.get_fastpath_enabled()`` and autocast.
"""

from __future__ import annotations

import torch
import torch.fx

from .attention import scaled_dot_product_attention

__all__ = ["native_fast_path_enabled", "padded_output_as_nested", "qkv_attention_with_padding"]


def native_fast_path_enabled() -> bool:
    """Whether eager ``nn.TransformerEncoder`` layers would run torch's native fast path now (the
    switches read at each call: ``torch.backends.mha.get_fastpath_enabled()``, autocast off)."""
    return torch.backends.mha.get_fastpath_enabled() and not torch.is_autocast_enabled()


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def qkv_attention_with_padding(qkv: torch.Tensor, heads: int, key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention from a packed ``q | k | v`` projection ``(B, T, 3E)`` -> ``(B, T, E)`` that
    ignores the keys where ``key_padding_mask`` ``(B, T)`` is True, as ``nn.TransformerEncoderLayer`` in
    inference computes it (NOTE: [Eager's padded positions]: a sample whose keys are all padding gives NaN).

    The heads are views of ``qkv`` (no split copies) and the products run on
    :func:`torchgraph.fused.scaled_dot_product_attention` (``ops.attention_inference`` where it applies).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> qkv = torch.randn(2, 5, 3 * 8)
        >>> padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
        >>> q, k, v = (z.unflatten(-1, (2, 4)).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        >>> expected = F.scaled_dot_product_attention(q, k, v, attn_mask=~padding[:, None, None, :])
        >>> out = qkv_attention_with_padding(qkv, 2, padding)
        >>> torch.allclose(out, expected.transpose(1, 2).reshape(2, 5, 8), atol=1e-5)
        True
    """
    if isinstance(qkv, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        return qkv.tracer.create_proxy("call_function", qkv_attention_with_padding, (qkv, heads, key_padding_mask),
                                       {})
    batch, seq, width = qkv.shape
    q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
    attend = key_padding_mask.logical_not().view(batch, 1, 1, seq)
    out = scaled_dot_product_attention(q, k, v, attn_mask=attend).transpose(1, 2).reshape(batch, seq, width // 3)
    if not native_fast_path_enabled():
        return out
    all_padded = key_padding_mask.all(dim=-1).view(batch, 1, 1)
    if _tracing() or bool(all_padded.any()):
        out = out.masked_fill(all_padded, float("nan"))
    return out


def padded_output_as_nested(output: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
    """``output`` ``(B, T, E)`` of an encoder's last layer with zeros at the padded positions when eager's
    ``nn.TransformerEncoder`` (``use_nested_tensor``) would have run its nested-tensor fast path: the
    mask left-aligned (no token after padding in any sample) and the fast path enabled
    (NOTE: [Eager's padded positions]); else ``output`` unchanged.

    Example:
        >>> import torch
        >>> padding = torch.tensor([[False, False, True], [False, False, False]])
        >>> padded_output_as_nested(torch.ones(2, 3, 1), padding)[:, :, 0]
        tensor([[1., 1., 0.],
                [1., 1., 1.]])
        >>> padded_output_as_nested(torch.ones(2, 3, 1), padding.flip(1))[:, :, 0]  # not left-aligned
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
    """
    if isinstance(output, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        return output.tracer.create_proxy("call_function", padded_output_as_nested, (output, key_padding_mask), {})
    if not native_fast_path_enabled():
        return output
    # a token right after padding breaks left alignment (torch._nested_tensor_from_mask_left_aligned's test)
    aligned = ~(key_padding_mask[:, :-1] & ~key_padding_mask[:, 1:]).any()
    return output.masked_fill(key_padding_mask.unsqueeze(-1) & aligned, 0.0)
