"""The ``torch.nn`` built-ins whose constructor arguments a config can describe: a table.

For each supported class: the arguments to read and, where the module does not keep an argument as an
attribute of the same name, how to recover it (``Linear.bias`` is a tensor or ``None``; the constructor
wants a bool). Every entry is verified by a round trip in ``tests/test_config.py``: rebuild, compare
``repr`` and ``state_dict`` shapes.

Example:
    >>> import torch.nn as nn
    >>> from torchgraph.builtin_layers import builtin_arguments
    >>> builtin_arguments(nn.Linear(4, 2, bias=False))
    ([], {'in_features': 4, 'out_features': 2, 'bias': False})
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BUILTIN", "BY_NAME", "builtin_arguments", "supported_builtin_layers"]


def _has(attr: str) -> Callable:
    return lambda m: getattr(m, attr) is not None


def _path(path: str) -> Callable:
    def read(m):
        for part in path.split("."):
            m = m[int(part)] if part.isdigit() else getattr(m, part)
        return m
    return read


def _activation(m: nn.Module):
    a = m.activation
    if a is F.relu:
        return "relu"
    if a is F.gelu:
        return "gelu"
    return a


def _transformer_layer(prefix: str = "") -> dict[str, Callable]:
    p = _path(prefix) if prefix else (lambda m: m)
    return {
        "d_model": lambda m: p(m).self_attn.embed_dim,
        "nhead": lambda m: p(m).self_attn.num_heads,
        "dim_feedforward": lambda m: p(m).linear1.out_features,
        "dropout": lambda m: p(m).dropout.p,
        "activation": lambda m: _activation(p(m)),
        "layer_norm_eps": lambda m: p(m).norm1.eps,
        "batch_first": lambda m: p(m).self_attn.batch_first,
        "norm_first": lambda m: p(m).norm_first,
        "bias": lambda m: p(m).linear1.bias is not None,
    }


# class -> (argument names in constructor order, {argument: reader}); a missing reader is getattr.
BUILTIN: dict[type, tuple[tuple[str, ...], dict[str, Callable]]] = {}


def _add(classes, params: tuple[str, ...], **readers: Callable) -> None:
    for c in classes:
        BUILTIN[c] = (params, readers)


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
         "padding_mode")
_CONV_T = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups",
           "bias", "dilation", "padding_mode")
_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats", "bias")
_RNN = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")

_add([nn.Identity, nn.Sigmoid, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Softmax2d], ())
_add([nn.ReLU, nn.ReLU6, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.SELU], ("inplace",))
_add([nn.LeakyReLU], ("negative_slope", "inplace"))
_add([nn.ELU, nn.CELU], ("alpha", "inplace"))
_add([nn.GELU], ("approximate",))
_add([nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.GLU], ("dim",))
_add([nn.Hardtanh], ("min_val", "max_val", "inplace"))
_add([nn.Softplus], ("beta", "threshold"))
_add([nn.PReLU], ("num_parameters", "init"))
_add([nn.Threshold], ("threshold", "value", "inplace"))
_add([nn.Hardshrink, nn.Softshrink], ("lambd",))
_add([nn.RReLU], ("lower", "upper", "inplace"))
_add([nn.Linear], ("in_features", "out_features", "bias"), bias=_has("bias"))
_add([nn.Bilinear], ("in1_features", "in2_features", "out_features", "bias"), bias=_has("bias"))
_add([nn.Conv1d, nn.Conv2d, nn.Conv3d], _CONV, bias=_has("bias"))
_add([nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d], _CONV_T, bias=_has("bias"))
_add([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
      nn.InstanceNorm3d], _NORM, bias=lambda m: not m.affine or m.bias is not None)
_add([nn.GroupNorm], ("num_groups", "num_channels", "eps", "affine", "bias"),
     bias=lambda m: not m.affine or m.bias is not None)
_add([nn.LayerNorm], ("normalized_shape", "eps", "elementwise_affine", "bias"),
     bias=lambda m: not m.elementwise_affine or m.bias is not None)
_add([nn.RMSNorm], ("normalized_shape", "eps", "elementwise_affine"))
_add([nn.LocalResponseNorm, nn.CrossMapLRN2d], ("size", "alpha", "beta", "k"))
_add([nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout],
     ("p", "inplace"))
_add([nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d],
     ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"))
_add([nn.AvgPool1d], ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"))
_add([nn.AvgPool2d, nn.AvgPool3d],
     ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"))
_add([nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d], ("output_size",))
_add([nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d], ("output_size", "return_indices"))
_add([nn.LPPool1d, nn.LPPool2d] + ([nn.LPPool3d] if hasattr(nn, "LPPool3d") else []),
     ("norm_type", "kernel_size", "stride", "ceil_mode"))
_add([nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d], ("kernel_size", "stride", "padding"))
_add([nn.Flatten], ("start_dim", "end_dim"))
_add([nn.Unflatten], ("dim", "unflattened_size"))
_add([nn.Embedding], ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                      "scale_grad_by_freq", "sparse"))
_add([nn.EmbeddingBag], ("num_embeddings", "embedding_dim", "max_norm", "norm_type", "scale_grad_by_freq",
                         "mode", "sparse", "include_last_offset", "padding_idx"))
_add([nn.RNN], _RNN[:3] + ("nonlinearity",) + _RNN[3:])
_add([nn.LSTM], _RNN + ("proj_size",))
_add([nn.GRU], _RNN)
_add([nn.RNNCell], ("input_size", "hidden_size", "bias", "nonlinearity"))
_add([nn.LSTMCell, nn.GRUCell], ("input_size", "hidden_size", "bias"))
_add([nn.MultiheadAttention], ("embed_dim", "num_heads", "dropout", "bias", "add_bias_kv", "add_zero_attn",
                               "kdim", "vdim", "batch_first"),
     bias=_has("in_proj_bias"), add_bias_kv=_has("bias_k"))
_add([nn.TransformerEncoderLayer, nn.TransformerDecoderLayer],
     ("d_model", "nhead", "dim_feedforward", "dropout", "activation", "layer_norm_eps", "batch_first",
      "norm_first", "bias"), **_transformer_layer())
_add([nn.TransformerEncoder], ("encoder_layer", "num_layers", "norm", "enable_nested_tensor", "mask_check"),
     encoder_layer=_path("layers.0"))
_add([nn.TransformerDecoder], ("decoder_layer", "num_layers", "norm"), decoder_layer=_path("layers.0"))
_add([nn.Transformer], ("d_model", "nhead", "num_encoder_layers", "num_decoder_layers", "dim_feedforward",
                        "dropout", "activation", "custom_encoder", "custom_decoder", "layer_norm_eps",
                        "batch_first", "norm_first", "bias"),
     **{**_transformer_layer("encoder.layers.0"),
        "num_encoder_layers": _path("encoder.num_layers"),
        "num_decoder_layers": _path("decoder.num_layers"),
        "custom_encoder": lambda m: None if type(m.encoder) is nn.TransformerEncoder else m.encoder,
        "custom_decoder": lambda m: None if type(m.decoder) is nn.TransformerDecoder else m.decoder,
        "layer_norm_eps": _path("encoder.norm.eps")})
_add([nn.Upsample], ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor"))
_add([nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d], ("size", "scale_factor"))
_add([nn.PixelShuffle], ("upscale_factor",))
_add([nn.PixelUnshuffle], ("downscale_factor",))
_add([nn.ChannelShuffle], ("groups",))
_add([getattr(nn, n) for n in dir(nn) if n.endswith(("Pad1d", "Pad2d", "Pad3d")) and not
      n.startswith("Constant")], ("padding",))
_add([nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d], ("padding", "value"))
_add([nn.Fold], ("output_size", "kernel_size", "dilation", "padding", "stride"))
_add([nn.Unfold], ("kernel_size", "dilation", "padding", "stride"))
_add([nn.CosineSimilarity], ("dim", "eps"))
_add([nn.PairwiseDistance], ("p", "eps", "keepdim"), p=lambda m: m.norm)
_add([nn.Sequential], ())  # its children are its arguments: see builtin_arguments

BY_NAME: dict[str, type] = {f"torch.nn.{c.__name__}": c for c in BUILTIN}


def supported_builtin_layers() -> list[type]:
    """The ``torch.nn`` classes whose constructor arguments get_config can read."""
    return list(BUILTIN)


def _accepted(c: type) -> set[str] | None:
    """Parameter names of ``c``'s constructor, or None if it takes ``*args``/``**kwargs`` only."""
    params = list(inspect.signature(c.__init__).parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return {p.name for p in params}


def builtin_arguments(module: nn.Module) -> tuple[list, dict]:
    """``(args, kwargs)`` that rebuild a supported built-in ``module``."""
    c = type(module)
    if c is nn.Sequential:
        names = list(module._modules)
        if names == [str(i) for i in range(len(names))]:
            return list(module._modules.values()), {}
        return [dict(module._modules)], {}
    params, readers = BUILTIN[c]
    accepted = _accepted(c)  # torch 2.11 and 2.13 differ (e.g. BatchNorm's `bias`)
    kwargs = {}
    for p in params:
        if accepted is not None and p not in accepted:
            continue
        reader = readers.get(p)
        kwargs[p] = reader(module) if reader is not None else getattr(module, p)
    return [], kwargs
