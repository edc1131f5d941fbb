"""A global average pool of a channels_last map: :func:`global_avg_pool2d`."""

from __future__ import annotations

import torch
import torch.fx

__all__ = ["global_avg_pool2d"]


# NOTE: [Global pools of channels_last maps] A CNN's head averages its last map, ``F.adaptive_avg_pool2d(x, 1)``,
# ``nn.AdaptiveAvgPool2d(1)`` or ``x.mean((2, 3))``. On a channels_last map torch reduces it on one thread, and
# the map was just written by a GEMM that split its channels between the threads: each half is in another core's
# cache. MobileNetV2's pool, 1 x 1280 x 7 x 7 after the GEMM kernel, cost ~150 us of the model's time at batch 1
# (8.01 against 7.86 ms with the pool left out, one process, interleaved medians, ad hoc). Reduced as the
# (N, H*W, C) rows the map is, torch splits the channels between the threads: 7.94 ms, the same values (bitwise
# on the shapes measured), though 5-7 us slower alone in a loop, where one core holds the whole map (squeeze-
# excitation pools of 7x7 to 112x112 maps too). So tg.optimize pools this way only the maps of 1x1 convolutions
# (passes.use_global_avg_pool).
def global_avg_pool2d(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    """``x.mean((-2, -1), keepdim=keepdim)``, over the rows of a channels_last map where ``x`` is one.

    ``tg.optimize`` calls it for the global average pools of 1x1 convolutions' channels_last maps
    (``passes.use_global_avg_pool``).

    Args:
        x: ``(N, C, H, W)`` (or ``(C, H, W)``).
        keepdim: keep the pooled dimensions (as ``F.adaptive_avg_pool2d(x, 1)`` does).

    Returns:
        ``(N, C, 1, 1)``, or ``(N, C)`` without ``keepdim``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
        >>> torch.allclose(global_avg_pool2d(x), F.adaptive_avg_pool2d(x, 1))
        True
    """
    if isinstance(x, torch.fx.Proxy):  # torch.fx tracing (e.g. unpickling): record this call
        return x.tracer.create_proxy("call_function", global_avg_pool2d, (x, keepdim), {})
    if (type(x) is torch.Tensor and x.dim() == 4 and x.is_cpu  # noqa: E721 - fakes and proxies take the other path
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
        n, c, h, w = x.shape
        y = x.permute(0, 2, 3, 1).reshape(n, h * w, c).mean(1)
        return y.view(n, c, 1, 1) if keepdim else y
    return x.mean((-2, -1), keepdim=keepdim)
