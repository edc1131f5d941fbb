"""torchgraph's own layers: what a graph needs where ``torch.nn`` has no layer.

``ScaledDotProductAttention`` is ``F.scaled_dot_product_attention`` whose attention dropout follows the
layer's mode, as ``nn.Dropout`` is ``F.dropout`` that follows it. ``tg.from_module`` records attention
written the community way (``dropout_p=self.dropout if self.training else 0``) as this layer
(NOTE: [Mode-following dropout as a layer] in ``mode_dropout.py``). It is registered for configs and
files under ``"torchgraph.layers.ScaledDotProductAttention"``.

``DropPath`` is stochastic depth as timm, torchvision and HuggingFace compute it. ``tg.save`` stores
an unregistered drop path module of those libraries (or a copy of their code) as this layer, once it
has checked by running it that the module computes exactly this (NOTE: [Drop path at save time] in
``drop_paths.py``). It is registered under ``"torchgraph.layers.DropPath"``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer_config import register_layer

__all__ = ["ScaledDotProductAttention", "DropPath"]


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


_NOISES = ("bernoulli", "uniform_floor")
_MODES = ("row", "batch")


@register_layer(name="torchgraph.layers.DropPath")
class DropPath(nn.Module):
    """Stochastic depth (drop path): in train mode, zero whole samples with probability ``drop_prob``.

    In eval mode, or when ``drop_prob`` is 0, it returns its input object itself. In train mode it
    multiplies the input by a random mask, computed exactly as one of the community spellings (the same
    random numbers and the same rounding under the same seed):

    - ``noise="bernoulli"``: timm's ``drop_path`` and torchvision's ``stochastic_depth``:
      ``mask = x.new_empty(shape).bernoulli_(keep)``, divided in place by ``keep`` when
      ``scale_by_keep`` (and ``keep > 0``), then ``x * mask``.
    - ``noise="uniform_floor"``: HuggingFace's ``XxxDropPath`` (and timm's older ``drop_path``):
      ``mask = floor(rand(shape) + keep)``, then ``x.div(keep) * mask`` (``x * mask`` without
      ``scale_by_keep``).

    where ``keep = 1 - drop_prob`` and ``shape`` is ``(batch, 1, ..., 1)`` for ``mode="row"`` (one
    draw per sample) or ``(1, ..., 1)`` for ``mode="batch"`` (one draw for the whole batch,
    torchvision's ``mode="batch"``). It has no parameters; ``model.eval()`` switches it off.

    Args:
        drop_prob (float): the probability of dropping a sample's path in train mode, in ``[0, 1]``.
        scale_by_keep (bool): divide the kept samples by ``1 - drop_prob`` (timm's argument; always
            done by torchvision and HuggingFace).
        mode (str): ``"row"`` (per sample) or ``"batch"`` (whole batch).
        noise (str): how the mask is drawn: ``"bernoulli"`` (timm, torchvision) or ``"uniform_floor"``
            (HuggingFace).

    Example:
        >>> import torch, torchgraph as tg
        >>> drop = tg.layers.DropPath(drop_prob=0.5)
        >>> x = torch.ones(6, 3)
        >>> y = drop(x)                                   # each sample kept (scaled by 1 / 0.5) or dropped
        >>> set(y.unique().tolist()) <= {0.0, 2.0} and bool((y == y[:, :1]).all())
        True
        >>> drop.eval()(x) is x                           # eval: the input itself
        True
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True, mode: str = "row",
                 noise: str = "bernoulli"):
        super().__init__()
        fix = "e.g. tg.layers.DropPath(0.1, scale_by_keep=True, mode='row', noise='bernoulli')."
        if isinstance(drop_prob, bool) or not isinstance(drop_prob, (int, float)) or not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"DropPath: drop_prob must be a probability. Expected a number in [0, 1]; received "
                             f"{drop_prob!r:.60}. Pass the stochastic depth rate, {fix}")
        if not isinstance(scale_by_keep, bool):
            raise ValueError(f"DropPath: scale_by_keep must be a bool. Expected True or False; received "
                             f"{scale_by_keep!r:.60}. {fix}")
        if mode not in _MODES:
            raise ValueError(f"DropPath: unknown mode. Expected one of {list(_MODES)}; received {mode!r:.60}. {fix}")
        if noise not in _NOISES:
            raise ValueError(f"DropPath: unknown noise. Expected one of {list(_NOISES)}; received {noise!r:.60}. "
                             f"{fix}")
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep
        self.mode = mode
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` itself in eval mode or at ``drop_prob == 0``; else ``x`` times the random mask."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1) if self.mode == "row" else (1,) * x.ndim
        if self.noise == "bernoulli":
            mask = x.new_empty(shape).bernoulli_(keep_prob)
            if keep_prob > 0.0 and self.scale_by_keep:
                mask.div_(keep_prob)
            return x * mask
        mask = torch.floor(torch.rand(shape, dtype=x.dtype, device=x.device) + keep_prob)
        return (x.div(keep_prob) if self.scale_by_keep else x) * mask

    def get_config(self) -> dict:
        """The constructor arguments, all four by keyword."""
        return {"drop_prob": self.drop_prob, "scale_by_keep": self.scale_by_keep, "mode": self.mode,
                "noise": self.noise}

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, scale_by_keep={self.scale_by_keep}, mode={self.mode!r}, " \
               f"noise={self.noise!r}"
