"""Probe layouts: meta probes get the strides that the CPU kernels give their outputs.

NOTE: [Meta strides] A probe's strides decide what the build answers for ``x.is_contiguous()``,
``x.stride()`` and whether ``x.view(...)`` is possible, so they must be the strides the model's
tensors will have when it runs. The meta kernels of a few ops lay their outputs out differently from
the CPU kernels, for the inputs people give them (a transposed or permuted tensor):

- batch norm returns a dense tensor in the input's suggested memory format (contiguous for a
  transposed input) on CPU and CUDA; its meta kernel keeps the input's strides, so
  ``bn(v.transpose(2, 3)).view(n, -1)`` ran in eager but failed to build;
- convolutions, group norm, reflection/replication padding and channel shuffle keep a channels-last
  input (or, for a convolution, weight) channels-last on CPU; their meta kernels return a
  contiguous tensor, so a ``.view`` that eager refuses was built;
- ``log_sigmoid``, ``rrelu`` and ``max_pool1d`` (without indices or autograd) return a contiguous
  tensor on CPU; their meta kernels keep the input's layout;
- ``scaled_dot_product_attention`` on CPU's flash kernel (4-D inputs with a unit last-dim stride, one
  head dim, no dropout) lays its output out like the query: for ``q = x.view(B, T, nh, hs).transpose(1,
  2)``, ``y.transpose(1, 2)`` is contiguous and ``.view(B, T, C)`` works in eager; the meta kernel
  returns a contiguous (B, nh, T, hs) tensor. (CUDA's flash and efficient kernels answer the same way
  for that layout.)

:func:`match_cpu_layout` re-lays each such meta output out the way the CPU kernel would (tests/
test_recording_strides.py compares every case with eager). Shapes and values are unaffected: only
the meta probes' strides change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

__all__ = ["match_cpu_layout"]


# A rule answers the output's layout on CPU: a memory format, a dim order, or None (meta's is right).

def _suggested(args, kwargs, out):
    """Dense in the input's suggested memory format (channels-last stays channels-last)."""
    return suggest_memory_format(args[0])


def _channels_last_kept(args, kwargs, out):
    """Channels-last when the input (or a convolution's weight) is channels-last, else as meta says."""
    for t in args[:2]:
        if isinstance(t, torch.Tensor) and t.dim() == out.dim():
            fmt = suggest_memory_format(t)
            if fmt is not torch.contiguous_format:
                return fmt
    return None


def _padding_mode(args, kwargs, out):
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    return _channels_last_kept(args, kwargs, out) if mode in ("reflect", "replicate") else None


def _contiguous(args, kwargs, out):
    return torch.contiguous_format


def _attention(args, kwargs, out):
    """The query's dim order where CPU's flash kernel runs (sdp_utils_cpp's checks), else as meta says."""
    names = ("query", "key", "value", "attn_mask", "dropout_p")
    given = dict(zip(names, args), **kwargs)
    q, k, v = given.get("query"), given.get("key"), given.get("value")
    if given.get("dropout_p", 0.0) or not torch.backends.cuda.flash_sdp_enabled():
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v)):
        return None
    if not q.size(-1) == k.size(-1) == v.size(-1):
        return None
    return _dim_order(q)


def _dim_order(t: torch.Tensor) -> tuple:
    """``t``'s dims from outermost to innermost in memory (ties kept in dim order)."""
    return tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def _max_pool1d(args, kwargs, out):
    # NOTE: on CPU, without autograd, max_pool1d has its own kernel (contiguous output); with autograd
    # it goes through max_pool2d_with_indices, whose meta kernel matches.
    if kwargs.get("return_indices") or (len(args) > 6 and args[6]):
        return None
    if args[0].requires_grad and torch.is_grad_enabled():
        return None
    return torch.contiguous_format


_RULES = {
    torch.batch_norm: _suggested,
    F.batch_norm: _suggested,
    torch.group_norm: _channels_last_kept,
    F.group_norm: _channels_last_kept,
    torch.channel_shuffle: _channels_last_kept,
    torch.native_channel_shuffle: _channels_last_kept,
    F.pad: _padding_mode,
    F.logsigmoid: _contiguous,
    torch.rrelu: _contiguous,
    F.rrelu: _contiguous,
    torch.max_pool1d: _max_pool1d,
    F.max_pool1d: _max_pool1d,
    F.scaled_dot_product_attention: _attention,
}
for _conv in (torch.conv1d, torch.conv2d, torch.conv3d,
              torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d):
    _RULES[_conv] = _channels_last_kept


def match_cpu_layout(func, args: tuple, kwargs: dict, out):
    """``out`` (a meta result of ``func(*args, **kwargs)``) with the strides the CPU kernel gives it.

    Example:
        >>> import torch
        >>> x = torch.empty(2, 4, 6, 5, device="meta").transpose(2, 3)
        >>> out = torch.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, False)
        >>> match_cpu_layout(torch.batch_norm, (x, None, None, None, None, True, 0.1, 1e-5, False), {}, out).stride()
        (120, 30, 6, 1)
    """
    rule = _RULES.get(func)
    if rule is None or not isinstance(out, torch.Tensor) or out.device.type != "meta" \
            or not args or not isinstance(args[0], torch.Tensor):
        return out
    layout = rule(args, kwargs, out)  # a memory format, a dim order (outermost first) or None
    if layout is None:
        return out
    if isinstance(layout, torch.memory_format):
        return out if out.is_contiguous(memory_format=layout) else out.contiguous(memory_format=layout)
    if _dim_order(out) == layout:
        return out
    inverse = tuple(layout.index(d) for d in range(out.dim()))
    return out.permute(layout).contiguous().permute(inverse)  # dense, its dims in that order
