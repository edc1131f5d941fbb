"""torchgraph's own layers: what a graph needs where ``torch.nn`` has no layer.

``ScaledDotProductAttention`` is ``F.scaled_dot_product_attention`` whose attention dropout follows the
layer's mode, as ``nn.Dropout`` is ``F.dropout`` that follows it. ``tg.from_module`` records attention
written the community way (``dropout_p=self.dropout if self.training else 0``) as this layer
(NOTE: [Mode-following dropout as a layer] in ``mode_dropout.py``). It is registered for configs and
files under ``"torchgraph.layers.ScaledDotProductAttention"``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer_config import register_layer

__all__ = ["ScaledDotProductAttention"]


@register_layer(name="torchgraph.layers.ScaledDotProductAttention")
class ScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` with ``dropout_p`` in train mode and no dropout in eval mode.

    The forward is the call nanoGPT and HuggingFace write, ``F.scaled_dot_product_attention(query,
    key, value, attn_mask, dropout_p=p if self.training else 0.0, ...)``: in train mode it draws the
    same random numbers as that call under the same seed, in eval mode it is plain SDPA. It has no
    parameters; ``model.eval()`` and ``model.train()`` switch its dropout like ``nn.Dropout``'s.

    Args:
        dropout_p (float): the attention dropout probability in train mode, in ``[0, 1]``.

    Example:
        >>> import torch, torchgraph as tg
        >>> attention = tg.layers.ScaledDotProductAttention(dropout_p=0.1)
        >>> q = k = v = torch.randn(2, 4, 6, 8)          # (batch, heads, positions, head dim)
        >>> attention(q, k, v, is_causal=True).shape
        torch.Size([2, 4, 6, 8])
        >>> out = attention.eval()(q, k, v)             # eval: no dropout, plain SDPA
        >>> torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
        True
    """

    def __init__(self, dropout_p: float = 0.0):
        super().__init__()
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
            raise ValueError(f"ScaledDotProductAttention: dropout_p must be a probability. Expected a number in "
                             f"[0, 1]; received {dropout_p!r:.60}. Pass the attention dropout rate, e.g. 0.1.")
        self.dropout_p = float(dropout_p)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                is_causal: bool = False, scale: float | None = None, **kwargs) -> torch.Tensor:
        """Attention of ``query`` over ``key``/``value``; ``attn_mask``, ``is_causal``, ``scale`` and
        ``enable_gqa`` (where this torch has it) are passed to ``F.scaled_dot_product_attention``."""
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                              dropout_p=self.dropout_p if self.training else 0.0,
                                              is_causal=is_causal, scale=scale, **kwargs)

    def get_config(self) -> dict:
        """The constructor arguments: ``{"dropout_p": p}``."""
        return {"dropout_p": self.dropout_p}

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}"
