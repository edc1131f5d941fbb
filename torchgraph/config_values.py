"""Values in a config: JSON for the arguments of layers and graph nodes, and the function allowlist.

A config is read from files that may come from anyone, so decoding is closed-world:

- Every value is plain JSON (numbers, strings, booleans, null, lists) or a one-key object whose key
  is a tag from a fixed set (``{"tuple": [...]}``, ``{"dtype": "float32"}``, ``{"node": "relu"}``...).
- A function is named by a string such as ``"torch.nn.functional.gelu"`` and resolved only inside a
  fixed set of namespaces, and only if torch lets ``__torch_function__`` override it (which is how
  torchgraph recorded it in the first place) or it is one of a few listed factories. ``torch.load``,
  ``torch.from_file`` and friends are never reachable: nothing is imported, nothing is evaluated.
- Nesting is bounded (:data:`MAX_DEPTH`) so a crafted file cannot exhaust the stack.
"""

from __future__ import annotations

import builtins
import inspect
import math
import numbers
import operator
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MAX_DEPTH", "encode_value", "decode_value", "function_name", "resolve_function",
           "check_method_name", "check_attribute_name", "dtype_name", "resolve_dtype"]

MAX_DEPTH = 48

_TAGS = frozenset({"node", "tuple", "dict", "slice", "ellipsis", "dtype", "device", "memory_format",
                   "layout", "float", "function", "layer"})

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
        raise ValueError(f"{where}: unknown dtype {name!r}. Expected one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------
# Functions: an allowlist built from torch's own list of overridable functions
# --------------------------------------------------------------------------------------------

_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_",
              "xor", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge", "neg", "pos", "abs",
              "invert", "not_", "getitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod",
              "ipow", "imatmul", "iand", "ior", "ixor", "ilshift", "irshift", "truth", "contains")

# Factories torch does not route through __torch_function__ unless a SymbolicInt is an argument.
_FACTORIES = ("arange", "zeros", "ones", "empty", "full", "eye", "linspace", "logspace", "rand",
              "randn", "randint", "randperm", "tensor", "scalar_tensor", "as_tensor", "zeros_like",
              "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
              "tril_indices", "triu_indices")

# (namespace name in a config, the namespace object) -- searched in this order when encoding.
_NAMESPACES: tuple[tuple[str, Any], ...] = (
    ("torch.nn.functional", F),
    ("torch.special", torch.special),
    ("torch.linalg", torch.linalg),
    ("torch.fft", torch.fft),
    ("torch", torch),
)

_TABLE: dict[str, Callable] | None = None      # config name -> function
_NAMES: dict[int, str] | None = None           # id(function) -> config name


def _build_table() -> None:
    global _TABLE, _NAMES
    allowed: set[int] = set()
    for fns in torch.overrides.get_overridable_functions().values():
        allowed.update(id(f) for f in fns)
    allowed.update(id(getattr(torch, n)) for n in _FACTORIES if hasattr(torch, n))
    table: dict[str, Callable] = {f"operator.{n}": getattr(operator, n) for n in _OPERATORS}
    table["builtins.getattr"] = builtins.getattr
    table["torch._assert"] = torch._assert  # guards recorded by `assert n <= 512` (sizes.py)
    from .targets import setitem
    table["torchgraph.setitem"] = setitem
    for ns_name, ns in _NAMESPACES:
        for attr in dir(ns):
            if attr.startswith("_"):
                continue
            obj = getattr(ns, attr, None)
            if obj is not None and id(obj) in allowed and callable(obj) and not inspect.isclass(obj):
                table[f"{ns_name}.{attr}"] = obj
    names: dict[int, str] = {}
    for name, fn in table.items():
        names.setdefault(id(fn), name)
    _TABLE, _NAMES = table, names


# Namespaces of torch.ops whose operators may appear in a config (custom ops of this library).
_OP_NAMESPACES = frozenset({"torchgraph"})


def function_name(fn: Callable, where: str) -> str:
    """The config name of an allowed function, e.g. ``"torch.nn.functional.relu"``."""
    if _NAMES is None:
        _build_table()
    name = _NAMES.get(id(fn))
    if name is not None:
        return name
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        ns, _, op = fn._qualified_op_name.partition("::") if hasattr(fn, "_qualified_op_name") else (
            "", "", "")
        if ns in _OP_NAMESPACES:
            overload = getattr(fn, "_overloadname", None) if isinstance(fn, torch._ops.OpOverload) else None
            return f"torch.ops.{ns}.{op}" + (f".{overload}" if overload else "")
    label = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    module = getattr(fn, "__module__", None)
    if module in ("torchgraph.fused", "torchgraph.ops"):
        raise ValueError(
            f"{where}: {module}.{label} comes from tg.optimize, whose graphs cannot be stored in a config "
            "(they read layer weights directly). Save the original model and call tg.optimize after "
            "tg.load (it takes ~0.1 s for ResNet-50); torch.save/pickle of the optimized model works too."
        )
    raise ValueError(
        f"{where}: the function {module + '.' if module else ''}{label} cannot be stored in a config. "
        "Expected a torch function (torch.*, torch.nn.functional.*, torch.linalg.*, torch.fft.*, "
        "torch.special.*), a Python operator, a tensor method, or a torchgraph custom op. Call custom "
        "Python code inside an nn.Module registered with @tg.register_layer instead."
    )


def resolve_function(name: Any, where: str) -> Callable:
    """The function a config names; only allowlisted names resolve (nothing is imported)."""
    if _TABLE is None:
        _build_table()
    if not isinstance(name, str):
        raise ValueError(f"{where}: a function must be named by a string; received {name!r}.")
    fn = _TABLE.get(name)
    if fn is not None:
        return fn
    parts = name.split(".")
    if len(parts) in (4, 5) and parts[:2] == ["torch", "ops"] and parts[2] in _OP_NAMESPACES and all(
            p.isidentifier() and not p.startswith("_") for p in parts[2:]):
        try:
            obj = getattr(getattr(torch.ops, parts[2]), parts[3])
            if len(parts) == 5:
                obj = getattr(obj, parts[4])
            return obj
        except (AttributeError, RuntimeError):
            pass
    raise ValueError(
        f"{where}: unknown or disallowed function {name!r}. Only torch functions that torchgraph can "
        "record (for example 'torch.nn.functional.relu', 'torch.cat', 'operator.add') can appear in a "
        "config; functions are never imported by path."
    )


_METHOD_DENY = frozenset({"backward", "register_hook", "register_post_accumulate_grad_hook", "numpy",
                          "tolist", "item", "storage", "untyped_storage", "data_ptr", "share_memory_",
                          "pin_memory", "apply_", "map_", "map2_", "set_", "cuda", "to_sparse"})


def check_method_name(name: Any, where: str) -> str:
    """A tensor method name for a ``call_method`` node: public, callable, on ``torch.Tensor``."""
    if (not isinstance(name, str) or not name.isidentifier() or name.startswith("_")
            or name in _METHOD_DENY or not callable(getattr(torch.Tensor, name, None))):
        raise ValueError(f"{where}: {name!r} is not an allowed tensor method. Expected the public name of "
                         "a torch.Tensor method (for example 'view', 'transpose', 'size').")
    return name


def check_attribute_name(name: Any, where: str) -> str:
    """A tensor attribute for ``getattr`` nodes (``x.T``, ``x.mT``, ``x.real``): a public property."""
    ok = isinstance(name, str) and name.isidentifier() and not name.startswith("_")
    if ok:
        try:
            attr = inspect.getattr_static(torch.Tensor, name)
        except AttributeError:
            ok = False
        else:
            ok = not callable(attr) or isinstance(attr, property) or type(attr).__name__ in (
                "getset_descriptor", "member_descriptor")
    if not ok:
        raise ValueError(f"{where}: {name!r} is not an allowed tensor attribute. Expected a public "
                         "torch.Tensor property such as 'T' or 'mT'.")
    return name


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
        for k in obj:
            if not isinstance(k, str):
                raise ValueError(f"{where}: dict keys must be strings to be stored in a config; received "
                                 f"key {k!r} of type {type(k).__name__}.")
        return {"dict": {k: enc(v) for k, v in obj.items()}}
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
    if callable(obj):
        return {"function": function_name(obj, where)}
    raise ValueError(f"{where}: a value of type {type(obj).__name__} ({obj!r:.80}) cannot be stored in a "
                     "config. Expected JSON values, tuples, slices, dtypes, torch functions or modules.")


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                   "channels_last_3d": torch.channels_last_3d, "preserve_format": torch.preserve_format}
_LAYOUTS = {"strided": torch.strided}


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
    if tag == "slice":
        _expect(isinstance(body, list) and len(body) == 3, where, "slice", "[start, stop, step]")
        return slice(*(dec(o) for o in body))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype":
        return resolve_dtype(body, where)
    if tag == "device":
        _expect(body in ("cpu", "meta"), where, "device", "'cpu' or 'meta'")
        return torch.device(body)
    if tag == "memory_format":
        _expect(body in _MEMORY_FORMATS, where, "memory_format", f"one of {sorted(_MEMORY_FORMATS)}")
        return _MEMORY_FORMATS[body]
    if tag == "layout":
        _expect(body in _LAYOUTS, where, "layout", f"one of {sorted(_LAYOUTS)}")
        return _LAYOUTS[body]
    if tag == "float":
        _expect(body in ("inf", "-inf", "nan"), where, "float", "'inf', '-inf' or 'nan'")
        return float(body)
    if tag == "function":
        return resolve_function(body, where)
    # tag == "layer"
    if decode_layer is None or not isinstance(body, dict):
        raise ValueError(f"{where}: a layer value is not allowed here (or is not an object).")
    return decode_layer(body, where)


def _expect(ok: bool, where: str, tag: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{where}: a {{\"{tag}\": ...}} value must hold {what}.")
