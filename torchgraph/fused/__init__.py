"""Run-time call targets of optimized graphs: linear/convolution + bias + activation, and attention.

``tg.optimize`` replaces ``nn.Linear``/``nn.Conv2d`` calls (and the activation after them) by calls
to :func:`linear_act` and :func:`conv2d_act` (:func:`conv2d_add_act` when a residual add follows,
:func:`conv2d_expand_depthwise` for an inverted residual block's expansion and depthwise convolution,
:func:`global_avg_pool2d` for a global average pool of a channels_last map),
and self-attention on a packed projection by :func:`qkv_attention`. One module per concept:
``linear``, ``conv``, ``attention``, ``weights`` (the reordered and packed weight caches) and
``_common`` (the activation table and when oneDNN applies). Each picks its implementation when it runs, from the tensors it receives, so
an optimized model keeps working after ``.to(device)``, ``.double()``, under autograd,
``torch.compile`` or an exporter:

* oneDNN's fused ops (``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise``): float32
  CPU tensors, eager mode. Without gradients they run the whole layer (GEMM + bias + activation;
  their GEMMs measured 12-19% faster than MKL's here); with gradients, linear layers run through
  ``_TrainableLinearAct`` (NOTE: [oneDNN GEMMs in training]). Convolutions keep their layout.
* otherwise standard ops: ``F.linear``/``F.conv2d`` without bias, then
  :func:`torchgraph.ops.bias_act` (one pass, with a backward), which itself falls back to plain
  PyTorch where no kernel exists. Traced programs (``torch.compile``, ``torch.export``, ONNX) only
  ever see this path, so exporters get standard ops (``bias_act`` is swapped for its reference).
* :func:`qkv_attention`: the ``ops.qkv_attention`` kernel for short sequences on eager CPU tensors,
  else the head split + ``F.scaled_dot_product_attention`` + merge it replaced;
  :func:`scaled_dot_product_attention`: ``ops.attention_inference`` for CPU inference where oneDNN's
  GEMMs beat MKL's, else ``F.scaled_dot_product_attention``;
  :func:`qkv_attention_with_padding`, :func:`padded_output_as_nested` and the token rows
  (:func:`token_rows`, :func:`gather_rows`, :func:`qkv_attention_on_rows`, :func:`scatter_rows`):
  ``nn.TransformerEncoder``'s key padding mask as its inference fast path applies it (``key_padding``).

Example:
    >>> import torch
    >>> from torchgraph.fused import linear_act
    >>> x, w, b = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
    >>> torch.allclose(linear_act(x, w, b, "relu"), torch.relu(x @ w.T + b), atol=1e-5)
    True
"""

from __future__ import annotations

from ._common import ACTIVATIONS_AFTER_ONEDNN, ONEDNN_ACTIVATIONS, use_onednn
from .attention import (ATTENTION_INFERENCE_MAX_SCORES, ATTENTION_INFERENCE_MAX_SEQ, ATTENTION_KERNEL_MIN_WORK,
                        QKV_ATTENTION_MAX_SEQ, TILED_ATTENTION_MAX_SEQ, attention_with_additive_mask, qkv_attention,
                        scaled_dot_product_attention)
from .conv import (CONV_GEMM_MAX_ROWS, CONV_IM2COL_MAX_ROWS, CONV_IM2COL_MAX_WIDTH, ONEDNN_F32_CONV_GEMM_MAX_ROWS,
                   ONEDNN_F32_IM2COL_MAX_WIDTH, RESIDUAL_ACTIVATIONS, conv2d_act, conv2d_add_act)
from .conv_expand import conv2d_expand_depthwise
from .key_padding import (gather_rows, native_fast_path_enabled, padded_output_as_nested, qkv_attention_on_rows,
                          qkv_attention_with_padding, scatter_rows, token_rows)
from .pool import global_avg_pool2d
from .linear import MKL_PACKED_MAX_ROWS, MKL_PACKED_MIN_WEIGHT, ONEDNN_LINEAR_MIN_MACS, linear_act
from .weights import MKL_PACKED_ROW_COUNTS

# NOTE: each threshold lives in the submodule that reads it (fused.linear, fused.conv,
# fused.weights, fused.attention, fused._common): to move one (as tests do), set it there; the names
# here are for reading.
__all__ = ["ACTIVATIONS_AFTER_ONEDNN", "ATTENTION_INFERENCE_MAX_SCORES", "ATTENTION_INFERENCE_MAX_SEQ",
           "ATTENTION_KERNEL_MIN_WORK", "CONV_GEMM_MAX_ROWS", "CONV_IM2COL_MAX_ROWS", "CONV_IM2COL_MAX_WIDTH", "MKL_PACKED_MAX_ROWS",
           "MKL_PACKED_MIN_WEIGHT", "MKL_PACKED_ROW_COUNTS", "ONEDNN_ACTIVATIONS", "ONEDNN_F32_CONV_GEMM_MAX_ROWS",
           "ONEDNN_F32_IM2COL_MAX_WIDTH", "ONEDNN_LINEAR_MIN_MACS",
           "QKV_ATTENTION_MAX_SEQ", "RESIDUAL_ACTIVATIONS", "TILED_ATTENTION_MAX_SEQ", "conv2d_act", "conv2d_add_act",
           "conv2d_expand_depthwise", "global_avg_pool2d", "linear_act",
           "attention_with_additive_mask", "gather_rows", "native_fast_path_enabled", "padded_output_as_nested",
           "qkv_attention", "qkv_attention_on_rows", "qkv_attention_with_padding", "scaled_dot_product_attention",
           "scatter_rows", "token_rows", "use_onednn"]
