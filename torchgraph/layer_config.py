"""Layers as data: the constructor arguments of a layer, and the layer rebuilt from them.

A module's constructor arguments cannot be read back from an arbitrary ``nn.Module``. So:

- ``torch.nn`` built-ins are described by a table: for each supported class, the arguments to read
  and, where the module does not keep an argument as an attribute of the same name, how to recover it
  (``Linear.bias`` is a tensor or ``None``; the constructor wants a bool). Every entry is verified by a
  round trip in ``tests/test_config.py``: rebuild, compare ``repr`` and ``state_dict`` shapes.
- User classes opt in with :func:`register_layer`, which records the arguments each instance was
  created with (by wrapping the class's own ``__init__``; nothing global is patched).
- A nested ``tg.Model`` is described by its own config.

Loading resolves a class name only in that table, in the registry, or as ``torchgraph.Model``: a name
in a file is never imported.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config_functions import check_repeats
from .config_values import decode_value, dtype_name, encode_value, resolve_dtype
from .untrusted import BuildLimitError

__all__ = ["register_layer", "registered_layers", "layer_to_config", "layer_from_config",
           "supported_builtin_layers", "model_class", "model_class_key", "registered_model_class", "MAX_NESTING"]

MODEL_CLASS = "torchgraph.Model"
SEQUENTIAL_CLASS = "torchgraph.Sequential"
# Layers inside layers (a layer argument, a nested model) in a config: at most this deep.
MAX_NESTING = 16

# --------------------------------------------------------------------------------------------
# The registry of user classes
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type] = {}
_KEYS: dict[type, str] = {}
_HOOKS: dict[type, tuple[Callable, Callable | None]] = {}  # class -> (get_config, from_config)


def register_layer(cls: type | None = None, *, name: str | None = None,
                   get_config: Callable[[nn.Module], dict] | None = None,
                   from_config: Callable[[dict], nn.Module] | None = None):
    """Make an ``nn.Module`` class storable in configs and files (a class decorator, or a call).

    Each instance created after registration remembers the arguments it was created with; its layer
    config is ``{"class": <name>, "args": [...], "kwargs": {...}}``, and loading calls the class with
    them. Arguments may be JSON values, tuples, dtypes, torch functions, other storable modules, or
    objects of types registered with :func:`tg.register_value_type <torchgraph.register_value_type>`
    (a Hugging Face ``BertConfig``, say). A class that defines ``get_config()`` (returning the keyword
    arguments) and optionally a ``from_config(config)`` classmethod is described by those instead;
    for a class you cannot edit (a third-party module), pass them as ``get_config=`` and
    ``from_config=``, which also covers instances created before registration.

    A ``tg.Model`` subclass registered here comes back from configs and files as itself: the
    entries its ``get_config`` adds to the model config are passed to its ``__init__``.

    Loading a file finds the class by its registered name only, so register the class (import the
    module that defines it) before calling :func:`torchgraph.load`.

    Args:
        cls: the class (when used as ``@tg.register_layer``, or ``tg.register_layer(SomeClass)``).
        name (str): the name stored in configs; defaults to ``"<module>.<qualname>"``.
        get_config: ``layer -> dict`` of keyword arguments (instead of recording them).
        from_config: ``dict -> layer`` (default: ``cls(**kwargs)``).

    Returns:
        The class itself (with a wrapped ``__init__`` when arguments are recorded), or a decorator
        when called without a class.

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> @tg.register_layer
        ... class Scale(nn.Module):
        ...     def __init__(self, factor: float = 2.0):
        ...         super().__init__()
        ...         self.factor = factor
        ...     def forward(self, x):
        ...         return x * self.factor
        >>> x = tg.Input(shape=(4,))
        >>> model = tg.Model(x, Scale(3.0)(x))
        >>> model.get_config()["layers"][0]["kwargs"]
        {'factor': 3.0}
        >>> class Shift(nn.Module):          # a class you cannot edit, instances made before
        ...     def __init__(self, amount):
        ...         super().__init__()
        ...         self.amount = amount
        ...     def forward(self, x):
        ...         return x + self.amount
        >>> shift = Shift(1.5)
        >>> _ = tg.register_layer(Shift, get_config=lambda m: {"amount": m.amount})
        >>> tg.Model.from_config(tg.Model(x, shift(x)).get_config()).shift.amount
        1.5
    """
    def wrap(c):
        from .model import Model

        if not (isinstance(c, type) and issubclass(c, nn.Module)):
            raise TypeError(f"tg.register_layer: expected an nn.Module subclass; received {c!r}.")
        key = name if name is not None else f"{c.__module__}.{c.__qualname__}"
        if not isinstance(key, str) or not key or any(ch.isspace() for ch in key) or key in (
                MODEL_CLASS, SEQUENTIAL_CLASS) or key.startswith("torch.nn."):
            raise ValueError(f"tg.register_layer: invalid name {key!r} for {c.__qualname__}. Expected a "
                             "non-empty string without spaces, not 'torch.nn.*' or 'torchgraph.Model'.")
        for what, hook in (("get_config", get_config), ("from_config", from_config)):
            if hook is not None and not callable(hook):
                raise TypeError(f"tg.register_layer: {what} must be callable; received {hook!r:.60}.")
        if from_config is not None and get_config is None:
            raise TypeError("tg.register_layer: from_config= needs get_config= (how to describe a layer).")
        old = _REGISTRY.get(key)
        if old is not None and old is not c:
            _KEYS.pop(old, None)  # a redefinition (a re-run cell or module): the newest class wins
        _REGISTRY[key] = c
        _KEYS[c] = key
        if get_config is not None:
            _HOOKS[c] = (get_config, from_config)
        elif not issubclass(c, Model) and not _has_own_get_config(c) and \
                not getattr(c.__init__, "__tg_records__", None) is c:
            _wrap_init(c)
        return c

    return wrap(cls) if cls is not None else wrap
def registered_layers() -> dict[str, type]:
    """The registered classes by name (a copy)."""
    return dict(_REGISTRY)


def _has_own_get_config(c: type) -> bool:
    return callable(getattr(c, "get_config", None))


def model_class(model) -> type:
    """The class of a tg.Model as users know it (fx gives every instance its own GraphModuleImpl)."""
    return next(t for t in type(model).__mro__ if t.__qualname__.split(".")[-1] != "GraphModuleImpl")


def model_class_key(model) -> str | None:
    """The ``"class"`` of a model's config: None for tg.Model (and unregistered subclasses)."""
    from .model import Model
    from .sequential import Sequential

    cls = model_class(model)
    if cls is Model:
        return None
    key = _KEYS.get(cls)
    if key is not None:
        return key
    return SEQUENTIAL_CLASS if cls is Sequential else None


def registered_model_class(key: Any, where: str) -> type:
    """The tg.Model subclass a config's ``"class"`` names (tg.Sequential or a registered one)."""
    from .model import Model
    from .sequential import Sequential

    if key == SEQUENTIAL_CLASS:
        return Sequential
    c = _REGISTRY.get(key) if isinstance(key, str) else None
    if c is None or not issubclass(c, Model):
        raise ValueError(f"{where}: unknown model class {key!r:.80}. Classes are never imported from names "
                         "in a config: register the tg.Model subclass with @tg.register_layer (import the "
                         "module that defines it) before loading.")
    return c


def _wrap_init(c: type) -> None:
    original = c.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is c:  # a subclass records its own arguments (if registered itself)
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError:
                return
            bound.apply_defaults()
            self.__dict__["_tg_init_args"] = _split_bound(bound)

    __init__.__tg_records__ = c
    c.__init__ = __init__


def _split_bound(bound: inspect.BoundArguments) -> tuple[list, dict]:
    """Positional and keyword arguments that recreate a call, from bound arguments (minus self)."""
    params = list(bound.signature.parameters.values())[1:]
    has_var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    args: list = []
    kwargs: dict = {}
    for p in params:
        if p.name not in bound.arguments:
            continue
        value = bound.arguments[p.name]
        if p.kind is p.POSITIONAL_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and has_var_positional):
            args.append(value)
        elif p.kind is p.VAR_POSITIONAL:
            args.extend(value)
        elif p.kind is p.VAR_KEYWORD:
            kwargs.update(value)
        else:
            kwargs[p.name] = value
    return args, kwargs


# --------------------------------------------------------------------------------------------
# The torch.nn table
# --------------------------------------------------------------------------------------------

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
_BUILTIN: dict[type, tuple[tuple[str, ...], dict[str, Callable]]] = {}


def _add(classes, params: tuple[str, ...], **readers: Callable) -> None:
    for c in classes:
        _BUILTIN[c] = (params, readers)


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
_add([nn.Sequential], ())  # its children are its arguments: see _builtin_arguments

_BY_NAME: dict[str, type] = {f"torch.nn.{c.__name__}": c for c in _BUILTIN}


def supported_builtin_layers() -> list[type]:
    """The ``torch.nn`` classes whose constructor arguments get_config can read."""
    return list(_BUILTIN)


def _accepted(c: type) -> set[str] | None:
    """Parameter names of ``c``'s constructor, or None if it takes ``*args``/``**kwargs`` only."""
    params = list(inspect.signature(c.__init__).parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return {p.name for p in params}


def _builtin_arguments(module: nn.Module) -> tuple[list, dict]:
    c = type(module)
    if c is nn.Sequential:
        names = list(module._modules)
        if names == [str(i) for i in range(len(names))]:
            return list(module._modules.values()), {}
        return [dict(module._modules)], {}
    params, readers = _BUILTIN[c]
    accepted = _accepted(c)  # torch 2.11 and 2.13 differ (e.g. BatchNorm's `bias`)
    kwargs = {}
    for p in params:
        if accepted is not None and p not in accepted:
            continue
        reader = readers.get(p)
        kwargs[p] = reader(module) if reader is not None else getattr(module, p)
    return [], kwargs


# --------------------------------------------------------------------------------------------
# Layer <-> config
# --------------------------------------------------------------------------------------------

def _float_dtype(module: nn.Module) -> torch.dtype | None:
    """The one floating dtype of all parameters and buffers, if it is not the default."""
    dtypes = {t.dtype for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()}
    if len(dtypes) == 1:
        (d,) = dtypes
        return None if d == torch.get_default_dtype() else d
    return None


def layer_to_config(module: nn.Module, where: str) -> dict:
    """``{"class": ..., "args": [...], "kwargs": {...}}`` (plus ``"dtype"``) for one layer.

    Raises:
        ValueError: the layer's class is neither a supported ``torch.nn`` class, nor registered, nor a
            ``tg.Model``; or one of its arguments cannot be stored.
    """
    from .model import Model

    if isinstance(module, Model):
        return {"class": MODEL_CLASS, "config": module.get_config()}
    c = type(module)
    key = _KEYS.get(c)
    if key is not None:
        if c in _HOOKS:
            try:
                config = _HOOKS[c][0](module)
            except Exception as exc:  # noqa: BLE001 - the user's hook failing: say which layer
                raise ValueError(f"{where}: the get_config given to tg.register_layer for {c.__qualname__} "
                                 f"failed: {type(exc).__name__}: {exc}") from None
            if not isinstance(config, dict):
                raise ValueError(f"{where}: the get_config given to tg.register_layer for {c.__qualname__} "
                                 f"must return a dict of keyword arguments; received {type(config).__name__}.")
            args, kwargs = [], config
        elif _has_own_get_config(c):
            config = module.get_config()
            if not isinstance(config, dict):
                raise ValueError(f"{where}: {c.__qualname__}.get_config() must return a dict of keyword "
                                 f"arguments; received {type(config).__name__}.")
            args, kwargs = [], config
        else:
            recorded = module.__dict__.get("_tg_init_args")
            if recorded is None:
                raise ValueError(f"{where}: this {c.__qualname__} has no recorded constructor arguments "
                                 "(was it created before @tg.register_layer ran?). Create the layer after "
                                 "registering its class, or register it with get_config= (a function that "
                                 "reads its arguments back from the layer).")
            args, kwargs = recorded
    elif c in _BUILTIN:
        key = f"torch.nn.{c.__name__}"
        args, kwargs = _builtin_arguments(module)
    else:
        qual = f"{c.__module__}.{c.__qualname__}"
        if c.__module__.startswith("torch."):
            hint = (f"torch.nn.{c.__name__} is not in torchgraph's table of built-in layers; wrap it in a "
                    "small nn.Module subclass decorated with @tg.register_layer.")
        else:
            hint = ("Decorate the class with @tg.register_layer (it records each instance's constructor "
                    "arguments), or give it get_config() and register it.")
        raise ValueError(f"{where}: get_config cannot describe a {qual}: its constructor arguments are "
                         f"unknown. {hint}")

    def encode_layer(m, w):
        return layer_to_config(m, f"{w} -> {type(m).__name__}")

    out: dict[str, Any] = {"class": key}
    try:
        out["args"] = [encode_value(a, where, encode_layer=encode_layer) for a in args]
        out["kwargs"] = {k: encode_value(v, f"{where}, argument '{k}'", encode_layer=encode_layer)
                         for k, v in kwargs.items()}
    except RecursionError:
        raise ValueError(f"{where}: its constructor arguments are nested too deeply.") from None
    dtype = _float_dtype(module)
    if dtype is not None:
        out["dtype"] = dtype_name(dtype, where)
    return out


# Count arguments of built-in layers whose constructors loop over them (checked before they run).
_REPEATS: dict[type, tuple[str, ...]] = {
    nn.RNN: ("num_layers",), nn.LSTM: ("num_layers",), nn.GRU: ("num_layers",),
    nn.TransformerEncoder: ("num_layers",), nn.TransformerDecoder: ("num_layers",),
    nn.Transformer: ("num_encoder_layers", "num_decoder_layers"),
}


def _check_builtin_repeats(c: type, args: list, kwargs: dict, where: str) -> None:
    named = dict(zip(_BUILTIN[c][0], args))  # constructor argument names, in order (nn.LSTM takes *args)
    named.update(kwargs)
    check_repeats({n: named.get(n) for n in _REPEATS[c]}, where)


class _Nesting(threading.local):
    def __init__(self):
        self.depth = 0


_NESTING = _Nesting()


def layer_from_config(entry: Any, where: str) -> nn.Module:
    """The layer an entry of ``config["layers"]`` describes (fresh weights).

    Raises:
        ValueError: unknown class (never imported by name), bad arguments, a constructor that fails,
            or layers nested more than :data:`MAX_NESTING` deep.
    """
    if _NESTING.depth >= MAX_NESTING:
        raise ValueError(f"{where}: layers and models are nested more than {MAX_NESTING} deep in this config.")
    _NESTING.depth += 1
    try:
        return _layer_from_config(entry, where)
    finally:
        _NESTING.depth -= 1


def _layer_from_config(entry: Any, where: str) -> nn.Module:
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
        raise ValueError(f"{where}: a layer must be an object with a string 'class'; received "
                         f"{type(entry).__name__}.")
    extra = set(entry) - {"class", "args", "kwargs", "dtype", "config", "name"}
    if extra:
        raise ValueError(f"{where}: unexpected keys {sorted(map(str, extra))[:8]} in a layer entry.")
    key = entry["class"]
    if key == MODEL_CLASS:
        from .config import from_config
        return from_config(entry.get("config"))
    c = _BY_NAME.get(key) if key.startswith("torch.nn.") else _REGISTRY.get(key)
    if c is None:
        if key.startswith("torch.nn."):
            raise ValueError(f"{where}: '{key:.80}' is not a supported torch.nn layer.")
        raise ValueError(
            f"{where}: unknown layer class '{key:.80}'. Classes are never imported from names in a config: "
            "import the module that defines it (so that @tg.register_layer runs) before loading."
        )
    args = entry.get("args", [])
    kwargs = entry.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError(f"{where}: 'args' must be a list and 'kwargs' an object.")
    for k in kwargs:
        if not isinstance(k, str) or not k.isidentifier():
            raise ValueError(f"{where}: argument name {k!r:.40} is not an identifier.")

    def decode_layer(body, w):
        return layer_from_config(body, f"{w} -> {body.get('class', '?')!s:.80}")

    args = [decode_value(a, where, decode_layer=decode_layer) for a in args]
    kwargs = {k: decode_value(v, f"{where}, argument '{k}'", decode_layer=decode_layer)
              for k, v in kwargs.items()}
    dtype = resolve_dtype(entry["dtype"], where) if "dtype" in entry else None
    if c in _REPEATS:
        _check_builtin_repeats(c, args, kwargs, where)
    if c is nn.Sequential and len(args) == 1 and isinstance(args[0], dict):
        args = [OrderedDict(args[0])]

    def build() -> nn.Module:
        hooks = _HOOKS.get(c)
        if hooks is not None:
            m = hooks[1](kwargs) if hooks[1] is not None else c(**kwargs)
        elif _has_own_get_config(c) and callable(getattr(c, "from_config", None)):
            m = c.from_config(kwargs)
        else:
            m = c(*args, **kwargs)
        if not isinstance(m, nn.Module):
            raise TypeError(f"it returned a {type(m).__name__}, not a module")
        return m.to(dtype) if dtype is not None else m

    try:
        module = build()
    except BuildLimitError:
        raise
    except ValueError as exc:
        if str(exc).startswith(where):
            raise
        raise ValueError(f"{where}: {key} could not be built from its config: {exc}") from None
    except RecursionError:
        raise ValueError(f"{where}: {key} could not be built from its config: its arguments are nested "
                         "too deeply.") from None
    except Exception as exc:  # noqa: BLE001 - any constructor failure is a bad config
        raise ValueError(f"{where}: {key} could not be built from its config: {type(exc).__name__}: "
                         f"{exc}") from None
    return module
