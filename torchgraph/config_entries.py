"""Reading the entries of a model config: inputs, constants and nodes, each validated.

Part of ``from_config`` (config.py): a config may come from an untrusted file, so every entry is
checked for its keys, types and sizes before anything is built, and every failure is a ``ValueError``
that names the entry (``from_config: nodes[3]: ...``).

Example:
    >>> from torchgraph.config_entries import input_spec
    >>> input_spec({"name": "x", "shape": [3, None], "dtype": "float32"}, 0)
    ('x', (3, None), torch.float32)
"""

from __future__ import annotations

import keyword
import math
from typing import Any

import torch
import torch.nn as nn

from .config_functions import check_attribute_name, check_method_name, check_operands, resolve_function, \
    untrusted_method
from .config_values import decode_value, resolve_dtype
from .hierarchy import check_path
from .replay import Ref

__all__ = ["input_spec", "constant_from_entry", "node_from_entry", "require", "check_name", "check_config_size",
           "MAX_INPUT_DIMS", "MAX_DIM", "MAX_CONFIG_VALUES", "OPS"]

MAX_INPUT_DIMS = 16
MAX_DIM = 2**31 - 1
OPS = ("get_attr", "call_module", "call_function", "call_method")
# Values (every list item, dict entry and scalar) a whole config may hold, nested configs included.
MAX_CONFIG_VALUES = 1_000_000


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_config_size(config: Any, who: str = "from_config") -> None:
    """Refuse a config that holds more than :data:`MAX_CONFIG_VALUES` values, before reading any of it.

    NOTE: [Counting a config's values] The per-entry limits (nodes, operands, nesting) do not bound
    their product: a node may take thousands of arguments, and a dict built in memory may share one
    list among thousands of nodes (or even contain itself), so a config of a few KB can stand for
    millions of values (a fuzzed config of 3,000 nodes sharing one 3,000-argument list took 21 s and
    414 MB before this check). The walk follows references as the build would and stops at the limit,
    so it costs at most ~2 s (1M one-entry objects); it uses its own stack, so depth cannot exhaust Python's.

    Example:
        >>> check_config_size({"nodes": [[0] * 10] * 10})
        >>> check_config_size({"nodes": [[0] * 1000] * 1001})
        Traceback (most recent call last):
        ...
        ValueError: from_config: the config holds more than 1000000 values (lists and objects included). ...
    """
    stack, count = [config], 0
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            count += len(value)
            stack.extend(v for v in value.values() if isinstance(v, (dict, list, tuple)))
        elif isinstance(value, (list, tuple)):
            count += len(value)
            stack.extend(v for v in value if isinstance(v, (dict, list, tuple)))
        if count > MAX_CONFIG_VALUES:
            raise ValueError(f"{who}: the config holds more than {MAX_CONFIG_VALUES} values (lists and objects "
                             "included). Expected a config as get_config writes it; large tensors belong in the "
                             "weights (tg.save), not in the config.")


def check_name(name: Any, where: str) -> str:
    require(isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name),
            f"{where}: expected a Python identifier; received {name!r:.80}.")
    return name


def input_spec(entry: Any, i: int) -> tuple[str, tuple, torch.dtype]:
    """``(name, shape without the batch dim, dtype)`` of ``inputs[i]``, validated."""
    where = f"from_config: inputs[{i}]"
    require(isinstance(entry, dict) and set(entry) == {"name", "shape", "dtype"},
            f"{where}: expected an object with keys name, shape, dtype.")
    name = check_name(entry["name"], f"{where} 'name'")
    shape = entry["shape"]
    require(isinstance(shape, list) and len(shape) <= MAX_INPUT_DIMS,
            f"{where}: 'shape' must be a list of at most {MAX_INPUT_DIMS} dims.")
    dims: list = []
    numel = 1
    for d in shape:
        if isinstance(d, dict):
            dims.append(_bounded_dim(d, where))
            continue
        ok = d is None or (isinstance(d, str) and d.isidentifier()) or (
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM)
        require(ok, f"{where}: every dim must be an int in [0, 2**31), null or a name; received {d!r:.40}.")
        dims.append(d)
        if isinstance(d, int):
            numel *= max(d, 1)
    require(numel <= 2**48, f"{where}: a sample of shape {tuple(shape)} has more than 2**48 elements.")
    return name, tuple(dims), resolve_dtype(entry["dtype"], where)


def _bounded_dim(entry: dict, where: str):
    """``{"dim": name | null, "min": int, "max": int | null}`` -> ``tg.Dim``."""
    from . import symbolic

    dim_class = getattr(symbolic, "Dim", None)
    require(dim_class is not None, f"{where}: a bounded dim {entry!r:.80} needs tg.Dim, which this "
            "version of torchgraph does not have. Upgrade torchgraph.")
    name, low, high = entry.get("dim"), entry.get("min", 0), entry.get("max")
    require(set(entry) <= {"dim", "min", "max"} and (name is None or (isinstance(name, str) and
            name.isidentifier())) and isinstance(low, int) and not isinstance(low, bool) and
            0 <= low <= MAX_DIM and (high is None or (isinstance(high, int) and not isinstance(high, bool)
                                                      and low <= high <= MAX_DIM)),
            f"{where}: a bounded dim must be {{\"dim\": name or null, \"min\": int, \"max\": int or null}} "
            f"with 0 <= min <= max < 2**31; received {entry!r:.80}.")
    return dim_class(name, min=low, max=high)


def constant_from_entry(entry: Any, where: str) -> tuple[str, torch.Tensor, bool, bool]:
    """``(name, tensor, persistent, unused)`` of a constants entry, validated."""
    require(isinstance(entry, dict), f"{where}: expected an object.")
    extra = set(entry) - {"name", "shape", "dtype", "parameter", "requires_grad", "value", "persistent", "unused"}
    require(not extra, f"{where}: unexpected keys {sorted(map(str, extra))[:8]}.")
    name = check_path(entry.get("name"), f"{where} 'name'")
    persistent, unused = entry.get("persistent", True), entry.get("unused", False)
    require(isinstance(persistent, bool) and isinstance(unused, bool),
            f"{where}: 'persistent' and 'unused' must be booleans.")
    shape = entry.get("shape")
    require(isinstance(shape, list) and len(shape) <= 16 and all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape),
        f"{where}: 'shape' must be a list of at most 16 non-negative ints.")
    dtype = resolve_dtype(entry.get("dtype"), where)
    numel = math.prod(shape)
    if "value" in entry:
        value = entry["value"]
        numbers = numel * (2 if dtype.is_complex else 1)  # NOTE: [Complex constants] in config.py
        require(isinstance(value, list) and len(value) == numbers,
                f"{where}: 'value' must be a flat list of {numbers} numbers"
                + (" (real and imaginary parts, interleaved)." if dtype.is_complex else "."))
        values = [decode_value(v, where) for v in value]
        require(all(isinstance(v, (int, float)) for v in values), f"{where}: 'value' must hold numbers.")
        try:
            if dtype.is_complex:
                parts = torch.tensor(values, dtype=dtype.to_real()).reshape(*shape, 2)
                tensor = torch.view_as_complex(parts)
            else:
                tensor = torch.tensor(values, dtype=dtype).reshape(shape)
        except (RuntimeError, TypeError, OverflowError) as exc:
            raise ValueError(f"{where}: 'value' does not fit dtype {dtype}: {exc}") from None
    else:
        require(numel <= 2**28, f"{where}: a constant of {numel} elements is larger than this version "
                "builds without its weights (2**28).")
        tensor = torch.zeros(shape, dtype=dtype)
    requires_grad = entry.get("requires_grad", False)
    require(isinstance(requires_grad, bool) and isinstance(entry.get("parameter", False), bool),
            f"{where}: 'parameter' and 'requires_grad' must be booleans.")
    if entry.get("parameter", False):
        require(dtype.is_floating_point or dtype.is_complex or not requires_grad,
                f"{where}: only floating-point parameters can require gradients.")
        tensor = nn.Parameter(tensor, requires_grad=requires_grad)
    return name, tensor, persistent, unused


def node_from_entry(entry: Any, i: int, layers: dict, constants: dict) -> tuple:
    """``(op, name, resolved target, args, kwargs)`` of ``nodes[i]`` for :func:`~torchgraph.replay.replay`;
    functions and methods resolved through the untrusted allowlists, arguments checked."""
    where = f"from_config: nodes[{i}]"
    require(isinstance(entry, dict), f"{where}: expected an object.")
    op = entry.get("op")
    require(op in OPS, f"{where}: 'op' must be one of {list(OPS)}; received {op!r:.40}.")
    name = entry.get("name")
    require(isinstance(name, str) and 0 < len(name) <= 200, f"{where}: 'name' must be a non-empty string.")
    where = f"from_config: node '{name}'"
    target = entry.get("target")
    if op == "get_attr":
        require(set(entry) - {"scope"} == {"op", "name", "target"},
                f"{where}: a get_attr node has op, name, target (and a scope).")
        require(isinstance(target, str) and target in constants, f"{where}: unknown constant {target!r:.80}.")
        return op, name, constants[target], (), {}
    require(set(entry) <= {"op", "name", "target", "args", "kwargs", "scope"}, f"{where}: unexpected keys.")
    if op == "call_module":
        require(isinstance(target, str) and target in layers, f"{where}: unknown layer {target!r:.80}.")
        resolved: Any = layers[target]
    elif op == "call_function":
        resolved = resolve_function(target, where, untrusted=True)
    else:
        resolved = untrusted_method(check_method_name(target, where), where)
    args, kwargs = entry.get("args", []), entry.get("kwargs", {})
    require(isinstance(args, list) and isinstance(kwargs, dict),
            f"{where}: 'args' must be a list and 'kwargs' an object.")
    args = tuple(decode_value(a, where, resolve_node=Ref) for a in args)
    kwargs = {k: decode_value(v, where, resolve_node=Ref) for k, v in kwargs.items()}
    if op == "call_function":
        check_operands(target, args, kwargs, where)
    if op == "call_function" and target == "builtins.getattr":
        require(len(args) == 2 and not kwargs, f"{where}: getattr takes (value, attribute name).")
        check_attribute_name(args[1], where)
    return op, name, resolved, args, kwargs
