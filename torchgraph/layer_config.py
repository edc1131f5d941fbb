"""Layers as data: the constructor arguments of a layer, and the layer rebuilt from them.

A module's constructor arguments cannot be read back from an arbitrary ``nn.Module``. So:

- ``torch.nn`` built-ins are described by a table (``builtin_layers.py``).
- User classes opt in with :func:`register_layer`, which records the arguments each instance was
  created with (by wrapping the class's own ``__init__``), or takes ``get_config``/``from_config``
  hooks; a registered ``tg.Model`` subclass is stored with its class.
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

from .builtin_layers import BUILTIN, BY_NAME, builtin_arguments, supported_builtin_layers
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


def layer_class_key(c: type, where: str) -> str:
    """The name a layer class passed as a value is stored under (torchvision's ``norm_layer=nn.BatchNorm2d``,
    timm's ``act_layer=nn.GELU``): ``"torch.nn.<Name>"`` for torch.nn's table, else its registered name.

    Example:
        >>> import torch.nn as nn
        >>> layer_class_key(nn.BatchNorm2d, "example")
        'torch.nn.BatchNorm2d'
    """
    if BY_NAME.get(f"torch.nn.{c.__name__}") is c:
        return f"torch.nn.{c.__name__}"
    key = _KEYS.get(c)
    if key is None:
        raise ValueError(
            f"{where}: the layer class {c.__module__}.{c.__qualname__} is passed as a value and cannot be "
            "stored: it is neither a torch.nn layer torchgraph knows nor registered. Expected a class of "
            f"torch.nn (e.g. nn.BatchNorm2d) or a registered one: tg.register_layer({c.__qualname__}).")
    return key


def resolve_layer_class(key: Any, where: str) -> type:
    """The layer class stored as ``key`` (the inverse of :func:`layer_class_key`): torch.nn's table or
    the registry, never an import."""
    c = None
    if isinstance(key, str):
        c = BY_NAME.get(key) if key.startswith("torch.nn.") else _REGISTRY.get(key)
    if c is None:
        raise ValueError(f"{where}: unknown layer class {key!r:.80}. Classes are never imported from names in "
                         "a config: a torch.nn layer torchgraph knows, or a class registered with "
                         "@tg.register_layer (import the module that registers it before loading).")
    return c


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
    elif c in BUILTIN:
        key = f"torch.nn.{c.__name__}"
        args, kwargs = builtin_arguments(module)
    else:
        from .drop_paths import as_drop_path, drop_probability_attribute

        drop_path = as_drop_path(module)  # NOTE: [Drop path at save time] in drop_paths.py
        if drop_path is not None:
            return layer_to_config(drop_path, where)
        qual = f"{c.__module__}.{c.__qualname__}"
        if c.__module__.startswith("torch."):
            hint = (f"torch.nn.{c.__name__} is not in torchgraph's table of built-in layers; wrap it in a "
                    "small nn.Module subclass decorated with @tg.register_layer.")
        else:
            hint = ("Decorate the class with @tg.register_layer (it records each instance's constructor "
                    "arguments), or give it get_config() and register it.")
            probability = drop_probability_attribute(module)
            if probability is not None:
                hint += (f" (It has a drop probability '{probability}', but it does not compute exactly like "
                         "timm's, torchvision's or HuggingFace's stochastic depth, tg.layers.DropPath, so it "
                         "is not saved as one.)")
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


def check_partial_repeats(c: type, args: list, kwargs: dict, where: str) -> None:
    """The count arguments of a stored ``functools.partial`` of a torch.nn layer class, bounded."""
    if c in _REPEATS:
        _check_builtin_repeats(c, args, kwargs, where)


def _check_builtin_repeats(c: type, args: list, kwargs: dict, where: str) -> None:
    named = dict(zip(BUILTIN[c][0], args))  # constructor argument names, in order (nn.LSTM takes *args)
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
    c = BY_NAME.get(key) if key.startswith("torch.nn.") else _REGISTRY.get(key)
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
