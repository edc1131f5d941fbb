"""Values in a config: JSON for the arguments of layers and graph nodes.

A config is read from files that may come from anyone, so decoding is closed-world:

- Every value is plain JSON (numbers, strings, booleans, null, lists) or a one-key object whose key
  is a tag from a fixed set (``{"tuple": [...]}``, ``{"dtype": "float32"}``, ``{"node": "relu"}``...).
- Functions are resolved through the allowlist of ``config_functions.py``; objects of other types
  (a Hugging Face ``BertConfig`` given to a layer) only through :func:`register_value_type`, by the
  name they were registered under. Nothing is imported, nothing is evaluated.
- Nesting is bounded (:data:`MAX_DEPTH`) so a crafted file cannot exhaust the stack; dict keys must
  be hashable scalars.

Example:
    >>> import torch
    >>> from torchgraph.config_values import decode_value, encode_value
    >>> encode_value((3, torch.float16, {1: "one"}), "example")
    {'tuple': [3, {'dtype': 'float16'}, {'items': [[1, 'one']]}]}
    >>> decode_value(_, "example")
    (3, torch.float16, {1: 'one'})
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch
import torch.nn as nn

from .config_functions import function_name, resolve_function

__all__ = ["MAX_DEPTH", "encode_value", "decode_value", "dtype_name", "resolve_dtype",
           "register_value_type", "registered_value_types"]

MAX_DEPTH = 48

_TAGS = frozenset({"node", "tuple", "dict", "items", "slice", "ellipsis", "dtype", "device", "memory_format",
                   "layout", "float", "function", "layer", "object"})

# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
                 "uint16", "uint32", "uint64")
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_DTYPE_NAMES = {d: n for n, d in _DTYPES.items()}


def dtype_name(dtype: torch.dtype, where: str) -> str:
    """``torch.float32`` -> ``"float32"``."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise ValueError(f"{where}: dtype {dtype} cannot be stored in a config. Expected one of "
                         f"{sorted(_DTYPES)}.")
    return name


def resolve_dtype(name: Any, where: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; anything else is a clear error."""
    if not isinstance(name, str) or name not in _DTYPES:
        raise ValueError(f"{where}: unknown dtype {name!r:.40}. Expected one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------
# Registered value types (a config object given to a layer, such as transformers' BertConfig)
# --------------------------------------------------------------------------------------------

_VALUE_TYPES: dict[str, tuple[type, Callable, Callable]] = {}
_VALUE_KEYS: dict[type, str] = {}


def register_value_type(cls: type, *, to_config: Callable[[Any], Any] | None = None,
                        from_config: Callable[[Any], Any] | None = None, name: str | None = None) -> type:
    """Make objects of ``cls`` storable as layer arguments (for example a model's config object).

    A layer registered with ``@tg.register_layer`` records its constructor arguments; when one is an
    object of a class torchgraph does not know (``BertModel(BertConfig(...))``), register that class
    here, once, with how to turn an object into JSON-like data and back. Loading finds the class only
    by the name it was registered under: nothing is imported.

    Args:
        cls: the class.
        to_config: ``obj -> data`` (JSON values, tuples, dtypes, other storable values). Default:
            ``obj.get_config()`` if the class has it, else ``obj.to_dict()`` (with a Hugging Face
            config's attention implementation, which ``to_dict`` leaves out).
        from_config: ``data -> obj``. Default: ``cls.from_config(data)``, else ``cls.from_dict(data)``,
            else ``cls(**data)``.
        name (str): the name stored in configs; defaults to ``"<module>.<qualname>"``.

    Returns:
        ``cls`` itself.

    Example:
        >>> import dataclasses, torch.nn as nn, torchgraph as tg
        >>> @dataclasses.dataclass
        ... class Settings:
        ...     width: int = 8
        >>> _ = tg.register_value_type(Settings, to_config=dataclasses.asdict)
        >>> @tg.register_layer
        ... class Block(nn.Module):
        ...     def __init__(self, settings):
        ...         super().__init__()
        ...         self.linear = nn.Linear(settings.width, settings.width)
        ...     def forward(self, x):
        ...         return self.linear(x)
        >>> x = tg.Input(shape=(8,))
        >>> model = tg.Model(x, Block(Settings(8))(x))
        >>> tg.Model.from_config(model.get_config()).block.linear
        Linear(in_features=8, out_features=8, bias=True)
    """
    if not isinstance(cls, type):
        raise TypeError(f"tg.register_value_type: expected a class; received {cls!r:.80}.")
    if isinstance(cls, type) and issubclass(cls, (nn.Module, torch.Tensor)):
        raise TypeError(f"tg.register_value_type: {cls.__qualname__} is a module or tensor class; register "
                        "layers with @tg.register_layer (tensors belong in the weights).")
    key = name if name is not None else f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(key, str) or not key or any(ch.isspace() for ch in key):
        raise ValueError(f"tg.register_value_type: invalid name {key!r} for {cls.__qualname__}. Expected a "
                         "non-empty string without spaces.")
    if to_config is None:
        if callable(getattr(cls, "get_config", None)):
            to_config = lambda obj: obj.get_config()  # noqa: E731
        elif callable(getattr(cls, "to_dict", None)):
            to_config = _dict_with_attention
        else:
            raise TypeError(f"tg.register_value_type: {cls.__qualname__} has neither get_config() nor "
                            "to_dict(); pass to_config=.")
    if from_config is None:
        for method in ("from_config", "from_dict"):
            if callable(getattr(cls, method, None)):
                from_config = getattr(cls, method)
                break
        else:
            from_config = lambda data: cls(**data)  # noqa: E731
    old = _VALUE_TYPES.get(key)
    if old is not None:
        _VALUE_KEYS.pop(old[0], None)  # re-registration (a re-run cell): the newest wins
    _VALUE_TYPES[key] = (cls, to_config, from_config)
    _VALUE_KEYS[cls] = key
    return cls


# NOTE: [Attention implementation] transformers' PretrainedConfig.to_dict() leaves out
# `_attn_implementation` ("sdpa", "eager"...), which a model sets on its config when it is built and
# its attention modules read. A BertSelfAttention rebuilt from such a dict (a tg.from_module model
# whose attention stays one layer) then runs another implementation, on a mask recorded in the
# format of the first: outputs differed by ~1e-2, silently. The default codec keeps it, under the
# name the config's constructor takes (`attn_implementation`).
def _dict_with_attention(obj) -> dict:
    data = obj.to_dict()
    implementation = getattr(obj, "_attn_implementation", None)
    if isinstance(implementation, str) and "attn_implementation" not in data:
        data = {**data, "attn_implementation": implementation}
    return data


def registered_value_types() -> dict[str, type]:
    """The registered value types by name (a copy)."""
    return {k: v[0] for k, v in _VALUE_TYPES.items()}


def _value_type_key(obj) -> str | None:
    for c in type(obj).__mro__:
        key = _VALUE_KEYS.get(c)
        if key is not None:
            return key
    return None


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

def encode_value(obj: Any, where: str, node_name: Callable[[Any], str | None] | None = None,
                 encode_layer: Callable[[nn.Module, str], dict] | None = None, _depth: int = 0) -> Any:
    """A JSON-serialisable form of ``obj``.

    Args:
        obj: the value (an argument of a node or of a layer constructor).
        where: who is being encoded, for error messages.
        node_name: maps a graph node to its name (node arguments only).
        encode_layer: maps an ``nn.Module`` to its layer config (layer arguments only).
    """
    if _depth > MAX_DEPTH:
        raise ValueError(f"{where}: a value is nested more than {MAX_DEPTH} levels deep.")

    def enc(o):
        return encode_value(o, where, node_name, encode_layer, _depth + 1)

    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral) and not isinstance(obj, torch.Tensor):
        return int(obj)
    if isinstance(obj, numbers.Real) and not isinstance(obj, torch.Tensor):
        obj = float(obj)
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if node_name is not None:
        name = node_name(obj)
        if name is not None:
            return {"node": name}
    if isinstance(obj, list):  # also fx's immutable_list
        return [enc(o) for o in obj]
    if isinstance(obj, tuple):  # tuples, torch.Size, namedtuples (as plain tuples)
        return {"tuple": [enc(o) for o in obj]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"dict": {k: enc(v) for k, v in obj.items()}}
        for k in obj:
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise ValueError(f"{where}: dict keys must be strings, numbers, booleans or None to be "
                                 f"stored in a config; received key {k!r:.60} of type {type(k).__name__}.")
        return {"items": [[enc(k), enc(v)] for k, v in obj.items()]}
    if isinstance(obj, slice):
        return {"slice": [enc(obj.start), enc(obj.stop), enc(obj.step)]}
    if obj is Ellipsis:
        return {"ellipsis": True}
    if isinstance(obj, torch.dtype):
        return {"dtype": dtype_name(obj, where)}
    if isinstance(obj, torch.device):
        return {"device": str(obj)}
    if isinstance(obj, torch.memory_format):
        return {"memory_format": str(obj).replace("torch.", "")}
    if isinstance(obj, torch.layout):
        return {"layout": str(obj).replace("torch.", "")}
    if isinstance(obj, nn.Module):
        if encode_layer is None:
            raise ValueError(f"{where}: a module ({type(obj).__name__}) passed as an argument cannot be "
                             "stored. Call it as a layer instead.")
        return {"layer": encode_layer(obj, where)}
    if isinstance(obj, torch.Tensor):
        raise ValueError(f"{where}: a tensor of shape {tuple(obj.shape)} is a constructor argument; "
                         "tensors cannot be stored in a config (they belong in the weights). Create it "
                         "inside the layer's __init__ from plain arguments, or register it as a buffer.")
    key = _value_type_key(obj)
    if key is not None:
        _, to_config, _ = _VALUE_TYPES[key]
        try:
            data = to_config(obj)
        except Exception as exc:  # noqa: BLE001 - the user's to_config failing: say which value
            raise ValueError(f"{where}: to_config of the registered value type '{key}' failed: "
                             f"{type(exc).__name__}: {exc}") from None
        return {"object": {"type": key, "config": enc(data)}}
    if callable(obj):
        return {"function": function_name(obj, where)}
    raise ValueError(
        f"{where}: a value of type {type(obj).__name__} ({obj!r:.80}) cannot be stored in a config. "
        "Expected JSON values, tuples, slices, dtypes, torch functions or modules. For a config object "
        f"given to a layer, register its class once: tg.register_value_type({type(obj).__name__}).")


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                   "channels_last_3d": torch.channels_last_3d, "preserve_format": torch.preserve_format}
_LAYOUTS = {"strided": torch.strided}
_DEVICES = ("cpu", "meta")
_KEY_TYPES = (str, int, float, bool, type(None))


def decode_value(obj: Any, where: str, resolve_node: Callable[[str], Any] | None = None,
                 decode_layer: Callable[[dict, str], nn.Module] | None = None, _depth: int = 0) -> Any:
    """The Python value an encoded config value stands for (the inverse of :func:`encode_value`)."""
    if _depth > MAX_DEPTH:
        raise ValueError(f"{where}: a value is nested more than {MAX_DEPTH} levels deep.")

    def dec(o):
        return decode_value(o, where, resolve_node, decode_layer, _depth + 1)

    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{where}: non-finite numbers must be written as {{\"float\": \"inf\"}}.")
        return obj
    if isinstance(obj, list):
        return [dec(o) for o in obj]
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: unexpected value of type {type(obj).__name__}.")
    if len(obj) != 1 or next(iter(obj)) not in _TAGS:
        raise ValueError(f"{where}: an object value must have exactly one key among {sorted(_TAGS)}; "
                         f"received keys {sorted(map(str, obj))[:8]}.")
    tag, body = next(iter(obj.items()))
    if tag == "node":
        if resolve_node is None or not isinstance(body, str):
            raise ValueError(f"{where}: a node reference is not allowed here (or is not a string).")
        return resolve_node(body)
    if tag == "tuple":
        _expect(isinstance(body, list), where, "tuple", "a list")
        return tuple(dec(o) for o in body)
    if tag == "dict":
        _expect(isinstance(body, dict), where, "dict", "an object")
        return {k: dec(v) for k, v in body.items()}
    if tag == "items":
        _expect(isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body), where,
                "items", "a list of [key, value] pairs")
        out = {}
        for k, v in body:
            key = dec(k)
            _expect(isinstance(key, _KEY_TYPES), where, "items", "keys that are strings, numbers, booleans "
                    "or null")
            out[key] = dec(v)
        return out
    if tag == "slice":
        _expect(isinstance(body, list) and len(body) == 3, where, "slice", "[start, stop, step]")
        return slice(*(dec(o) for o in body))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype":
        return resolve_dtype(body, where)
    if tag == "device":
        _expect(isinstance(body, str) and body in _DEVICES, where, "device", "'cpu' or 'meta'")
        return torch.device(body)
    if tag == "memory_format":
        _expect(isinstance(body, str) and body in _MEMORY_FORMATS, where, "memory_format",
                f"one of {sorted(_MEMORY_FORMATS)}")
        return _MEMORY_FORMATS[body]
    if tag == "layout":
        _expect(isinstance(body, str) and body in _LAYOUTS, where, "layout", f"one of {sorted(_LAYOUTS)}")
        return _LAYOUTS[body]
    if tag == "float":
        _expect(isinstance(body, str) and body in ("inf", "-inf", "nan"), where, "float",
                "'inf', '-inf' or 'nan'")
        return float(body)
    if tag == "function":
        return resolve_function(body, where, untrusted=True)
    if tag == "object":
        return _decode_object(body, where, dec)
    # tag == "layer"
    if decode_layer is None or not isinstance(body, dict):
        raise ValueError(f"{where}: a layer value is not allowed here (or is not an object).")
    return decode_layer(body, where)


def _decode_object(body: Any, where: str, dec: Callable[[Any], Any]):
    _expect(isinstance(body, dict) and set(body) == {"type", "config"} and isinstance(body["type"], str),
            where, "object", "{\"type\": <registered name>, \"config\": ...}")
    key = body["type"]
    entry = _VALUE_TYPES.get(key)
    if entry is None:
        raise ValueError(f"{where}: unknown value type {key!r:.80}. Types are never imported from names in a "
                         "config: register it with tg.register_value_type (import the module that does) "
                         "before loading.")
    _, _, from_config = entry
    data = dec(body["config"])
    try:
        return from_config(data)
    except Exception as exc:  # noqa: BLE001 - any failure of a crafted value is a bad config
        raise ValueError(f"{where}: the registered value type '{key}' could not be built from its config: "
                         f"{type(exc).__name__}: {exc}") from None


def _expect(ok: bool, where: str, tag: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{where}: a {{\"{tag}\": ...}} value must hold {what}.")
