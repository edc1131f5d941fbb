"""Architecture as data: ``get_config`` describes a model as JSON, ``from_config`` rebuilds it.

The config lists the inputs, the layers (class + constructor arguments + name), the constants, every
graph node in program order (its op, target and arguments, with ``{"node": name}`` for the values it
consumes), and the output structure. ``from_config`` replays those nodes through the symbolic API --
it calls the rebuilt layers and torch functions on ``tg.Input`` tensors -- so shapes are checked again
and the result is an ordinary ``tg.Model``: the same ``model.code``, the same ``state_dict`` keys in
the same order.

Design constraints:

- A config may come from an untrusted file: every part is validated, classes and functions are
  resolved only from allowlists (see ``config_values.py`` and ``layer_config.py``), and every failure
  is a ``ValueError`` (``GraphBuildError`` is one) that says which part of the config is wrong.
- Weights are not part of a config. Small constants (at most :data:`INLINE_CONSTANT_LIMIT` elements)
  are written inline so that ``from_config`` reproduces them; larger ones are rebuilt as zeros and
  come back with the weights (``tg.load``).
"""

from __future__ import annotations

import json
import keyword
import math
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .config_values import (check_attribute_name, check_method_name, decode_value, dtype_name,
                            encode_value, function_name, resolve_dtype, resolve_function)
from .errors import GraphBuildError
from .layer_config import layer_from_config, layer_to_config

__all__ = ["get_config", "from_config", "model_from_json", "FORMAT", "FORMAT_VERSION",
           "INLINE_CONSTANT_LIMIT", "MAX_NODES"]

FORMAT = "torchgraph.Model"
FORMAT_VERSION = 1
INLINE_CONSTANT_LIMIT = 1024
MAX_NODES = 1_000_000
_MAX_DIM = 2**31 - 1
_OPS = ("get_attr", "call_module", "call_function", "call_method")


class Ref:
    """A reference to an earlier node's value inside replayed arguments."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


# --------------------------------------------------------------------------------------------
# get_config
# --------------------------------------------------------------------------------------------

def get_config(model) -> dict:
    """A JSON-serialisable description of ``model``'s architecture (no weights).

    Args:
        model (tg.Model): the model.

    Returns:
        dict: ``{"format", "format_version", "name", "training", "inputs", "input_kind", "layers",
        "constants", "nodes", "outputs"}``; see ``docs/config_and_saving.md``.

    Raises:
        ValueError: a layer whose constructor arguments are unknown (an unregistered custom class,
            named in the message), or a node whose function or argument cannot be stored.

    Example:
        >>> import torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(8,), name="features")
        >>> model = tg.Model(x, nn.Linear(8, 2)(x))
        >>> config = model.get_config()
        >>> config["inputs"], config["layers"][0]["class"]
        ([{'name': 'features', 'shape': [8], 'dtype': 'float32'}], 'torch.nn.Linear')
        >>> tg.Model.from_config(config).code == model.code
        True
    """
    from .model import Model

    if not isinstance(model, Model):
        raise TypeError(f"get_config: expected a tg.Model; received {type(model).__name__}.")
    info = model.meta["torchgraph"]
    model_name = type(model).__name__

    def node_name(o):
        if not isinstance(o, fx.Node):
            return None
        # fx may rename a placeholder ("input" -> "input_1"); the input's name is its target.
        return o.target if o.op == "placeholder" else o.name

    inputs, layers, constants, nodes = [], [], [], []
    seen_layers: set[str] = set()
    seen_constants: set[str] = set()
    outputs: Any = None
    for node in model.graph.nodes:
        where = f"{model_name}: node '{node.name}'"
        if node.op == "placeholder":
            spec = node.meta.get("tg_spec")
            inputs.append({"name": node.target, "shape": [d for d in spec.shape[1:]],
                           "dtype": dtype_name(spec.dtype, where)})
            continue
        if node.op == "output":
            outputs = encode_value(node.args[0], where, node_name)
            continue
        entry: dict[str, Any] = {"op": node.op, "name": node.name}
        if node.op == "get_attr":
            entry["target"] = node.target
            if node.target not in seen_constants:
                seen_constants.add(node.target)
                constants.append(_constant_entry(node.target, _get_attr(model, node.target), where))
            nodes.append(entry)
            continue
        if node.op == "call_module":
            entry["target"] = node.target
            if node.target not in seen_layers:
                seen_layers.add(node.target)
                layer = model.get_submodule(node.target)
                layers.append({"name": node.target,
                               **layer_to_config(layer, f"{model_name}: layer '{node.target}'")})
        elif node.op == "call_function":
            entry["target"] = function_name(node.target, where)
        else:
            entry["target"] = check_method_name(node.target, where)
        entry["args"] = encode_value(list(node.args), where, node_name)
        entry["kwargs"] = {k: encode_value(v, where, node_name) for k, v in node.kwargs.items()}
        nodes.append(entry)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": model_name,
        "training": bool(model.training),
        "inputs": inputs,
        "input_kind": info["input_kind"],
        "layers": layers,
        "constants": constants,
        "nodes": nodes,
        "outputs": outputs,
    }


def _get_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _constant_entry(name: str, t: torch.Tensor, where: str) -> dict:
    entry = {"name": name, "shape": list(t.shape), "dtype": dtype_name(t.dtype, where),
             "parameter": isinstance(t, nn.Parameter), "requires_grad": bool(t.requires_grad)}
    if t.numel() <= INLINE_CONSTANT_LIMIT and not t.is_complex() and t.device.type != "meta":
        entry["value"] = [encode_value(v, where) for v in t.detach().reshape(-1).tolist()]
    return entry


# --------------------------------------------------------------------------------------------
# from_config
# --------------------------------------------------------------------------------------------

def from_config(config: Any):
    """Rebuild the model ``config`` describes, with fresh weights, through the symbolic API.

    Args:
        config (dict): from :func:`get_config` (or ``json.loads`` of :meth:`Model.to_json`).

    Returns:
        tg.Model: the same architecture; ``load_state_dict`` with the original's weights makes the
        outputs identical.

    Raises:
        ValueError: anything wrong with the config (the message names the part); unknown layer classes
            must be registered first with ``@tg.register_layer``.

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(3, 16, 16))
        >>> y = nn.Conv2d(3, 4, 3)(x).relu().flatten(1)
        >>> model = tg.Model(x, y, name="Tiny")
        >>> clone = tg.Model.from_config(model.get_config())
        >>> _ = clone.load_state_dict(model.state_dict())
        >>> x0 = torch.randn(2, 3, 16, 16)
        >>> type(clone).__name__, torch.equal(clone(x0), model(x0))
        ('Tiny', True)
    """
    try:
        return _from_config(config)
    except RecursionError:
        raise ValueError("from_config: the config is nested too deeply.") from None


def model_from_json(text: str | bytes):
    """Rebuild a model from the JSON text of :meth:`Model.to_json` (fresh weights).

    Example:
        >>> import torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(4,))
        >>> model = tg.Model(x, nn.Linear(4, 1)(x))
        >>> tg.model_from_json(model.to_json()).code == model.code
        True
    """
    if not isinstance(text, (str, bytes, bytearray)):
        raise TypeError(f"model_from_json: expected JSON text; received {type(text).__name__}.")
    try:
        config = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("model_from_json: the JSON is nested too deeply.") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"model_from_json: not valid JSON: {exc}.") from None
    return from_config(config)


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_name(name: Any, where: str) -> str:
    _require(isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name),
             f"{where}: expected a Python identifier; received {name!r:.80}.")
    return name


def _from_config(config: Any):
    _require(isinstance(config, dict), f"from_config: expected a dict; received {type(config).__name__}.")
    fmt, version = config.get("format"), config.get("format_version")
    _require(fmt == FORMAT, f"from_config: 'format' must be '{FORMAT}'; received {fmt!r:.80}. This is not a "
             "torchgraph model config.")
    _require(isinstance(version, int) and not isinstance(version, bool),
             f"from_config: 'format_version' must be an int; received {version!r:.80}.")
    _require(version <= FORMAT_VERSION, f"from_config: the config has format_version {version}, written "
             f"by a newer torchgraph; this version reads up to {FORMAT_VERSION}. Upgrade torchgraph.")
    known = {"format", "format_version", "name", "training", "inputs", "input_kind", "layers", "constants",
             "nodes", "outputs", "torchgraph_version"}
    extra = set(config) - known
    _require(not extra, f"from_config: unexpected keys {sorted(map(str, extra))[:8]}.")
    name = _check_name(config.get("name"), "from_config: 'name'")
    for key in ("inputs", "layers", "constants", "nodes"):
        _require(isinstance(config.get(key), list), f"from_config: '{key}' must be a list.")
    _require(len(config["nodes"]) <= MAX_NODES, f"from_config: more than {MAX_NODES} nodes.")
    input_kind = config.get("input_kind")
    _require(input_kind in ("single", "list", "tuple", "dict"),
             f"from_config: 'input_kind' must be single, list, tuple or dict; received {input_kind!r:.40}.")
    _require(input_kind != "single" or len(config["inputs"]) == 1,
             "from_config: input_kind 'single' needs exactly one input.")

    inputs = [_input_spec(e, i) for i, e in enumerate(config["inputs"])]
    _require(len({n for n, _, _ in inputs}) == len(inputs), "from_config: duplicate input names.")

    layers: dict[str, nn.Module] = {}
    for i, entry in enumerate(config["layers"]):
        where = f"from_config: layers[{i}]"
        _require(isinstance(entry, dict), f"{where}: expected an object.")
        lname = _check_name(entry.get("name"), f"{where} 'name'")
        _require(lname not in layers, f"{where}: duplicate layer name '{lname}'.")
        layers[lname] = layer_from_config(entry, f"from_config: layer '{lname}'")

    constants: dict[str, torch.Tensor] = {}
    for i, entry in enumerate(config["constants"]):
        cname, tensor = _constant_from_entry(entry, f"from_config: constants[{i}]")
        _require(cname not in constants, f"from_config: duplicate constant '{cname}'.")
        constants[cname] = tensor

    nodes = []
    for i, entry in enumerate(config["nodes"]):
        nodes.append(_node_from_entry(entry, i, layers, constants))

    outputs = decode_value(config.get("outputs"), "from_config: 'outputs'", resolve_node=Ref)
    model = replay(inputs, input_kind, nodes, outputs, name, layers, untrusted=True)
    training = config.get("training", True)
    _require(isinstance(training, bool), "from_config: 'training' must be a bool.")
    model.train(training)
    return model


def _input_spec(entry: Any, i: int) -> tuple[str, tuple, torch.dtype]:
    where = f"from_config: inputs[{i}]"
    _require(isinstance(entry, dict) and set(entry) == {"name", "shape", "dtype"},
             f"{where}: expected an object with keys name, shape, dtype.")
    name = _check_name(entry["name"], f"{where} 'name'")
    shape = entry["shape"]
    _require(isinstance(shape, list) and len(shape) <= 16, f"{where}: 'shape' must be a list of at most 16 "
             "dims.")
    for d in shape:
        ok = d is None or (isinstance(d, str) and d.isidentifier()) or (
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM)
        _require(ok, f"{where}: every dim must be an int in [0, 2**31), null or a name; received {d!r:.40}.")
    return name, tuple(shape), resolve_dtype(entry["dtype"], where)


def _constant_from_entry(entry: Any, where: str) -> tuple[str, torch.Tensor]:
    _require(isinstance(entry, dict), f"{where}: expected an object.")
    extra = set(entry) - {"name", "shape", "dtype", "parameter", "requires_grad", "value"}
    _require(not extra, f"{where}: unexpected keys {sorted(map(str, extra))[:8]}.")
    name = _check_name(entry.get("name"), f"{where} 'name'")
    shape = entry.get("shape")
    _require(isinstance(shape, list) and len(shape) <= 16 and all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in shape),
        f"{where}: 'shape' must be a list of non-negative ints.")
    dtype = resolve_dtype(entry.get("dtype"), where)
    numel = math.prod(shape)
    if "value" in entry:
        value = entry["value"]
        _require(isinstance(value, list) and len(value) == numel,
                 f"{where}: 'value' must be a flat list of {numel} numbers.")
        values = [decode_value(v, where) for v in value]
        _require(all(isinstance(v, (int, float)) for v in values), f"{where}: 'value' must hold numbers.")
        try:
            tensor = torch.tensor(values, dtype=dtype).reshape(shape)
        except (RuntimeError, TypeError, OverflowError) as exc:
            raise ValueError(f"{where}: 'value' does not fit dtype {dtype}: {exc}") from None
    else:
        _require(numel <= 2**28, f"{where}: a constant of {numel} elements is larger than this version "
                 "builds without its weights (2**28).")
        tensor = torch.zeros(shape, dtype=dtype)
    requires_grad = entry.get("requires_grad", False)
    _require(isinstance(requires_grad, bool) and isinstance(entry.get("parameter", False), bool),
             f"{where}: 'parameter' and 'requires_grad' must be booleans.")
    if entry.get("parameter", False):
        _require(dtype.is_floating_point or dtype.is_complex or not requires_grad,
                 f"{where}: only floating-point parameters can require gradients.")
        tensor = nn.Parameter(tensor, requires_grad=requires_grad)
    return name, tensor


def _node_from_entry(entry: Any, i: int, layers: dict, constants: dict) -> tuple:
    where = f"from_config: nodes[{i}]"
    _require(isinstance(entry, dict), f"{where}: expected an object.")
    op = entry.get("op")
    _require(op in _OPS, f"{where}: 'op' must be one of {list(_OPS)}; received {op!r:.40}.")
    name = entry.get("name")
    _require(isinstance(name, str) and 0 < len(name) <= 200, f"{where}: 'name' must be a non-empty string.")
    where = f"from_config: node '{name}'"
    target = entry.get("target")
    if op == "get_attr":
        _require(set(entry) == {"op", "name", "target"}, f"{where}: a get_attr node has op, name, target.")
        _require(isinstance(target, str) and target in constants, f"{where}: unknown constant {target!r:.80}.")
        return op, name, constants[target], (), {}
    _require(set(entry) <= {"op", "name", "target", "args", "kwargs"}, f"{where}: unexpected keys.")
    if op == "call_module":
        _require(isinstance(target, str) and target in layers, f"{where}: unknown layer {target!r:.80}.")
        resolved: Any = layers[target]
    elif op == "call_function":
        resolved = resolve_function(target, where)
    else:
        resolved = check_method_name(target, where)
    args, kwargs = entry.get("args", []), entry.get("kwargs", {})
    _require(isinstance(args, list) and isinstance(kwargs, dict),
             f"{where}: 'args' must be a list and 'kwargs' an object.")
    args = tuple(decode_value(a, where, resolve_node=Ref) for a in args)
    kwargs = {k: decode_value(v, where, resolve_node=Ref) for k, v in kwargs.items()}
    if op == "call_function" and target == "builtins.getattr":
        _require(len(args) == 2 and not kwargs, f"{where}: getattr takes (value, attribute name).")
        check_attribute_name(args[1], where)
    return op, name, resolved, args, kwargs


# --------------------------------------------------------------------------------------------
# Replay: the common core of from_config and clone_model
# --------------------------------------------------------------------------------------------

def replay(*args, **kwargs):
    """:func:`_replay` as a build of its own: its probe sizes never depend on, or leak into, other builds."""
    from .dims import new_build

    new_build()  # NOTE: [Probe sizes] in dims.py
    try:
        return _replay(*args, **kwargs)
    finally:
        new_build()


def _replay(inputs: list[tuple[str, tuple, torch.dtype]], input_kind: str, nodes: list[tuple], outputs: Any,
            name: str, layers: dict[str, nn.Module], untrusted: bool = False):
    """Rebuild a model by calling layers and functions on fresh ``tg.Input`` tensors.

    Args:
        inputs: ``(name, shape without batch, dtype)`` per input, in ``forward`` order.
        input_kind: ``"single"``, ``"list"``, ``"tuple"`` or ``"dict"``.
        nodes: ``(op, name, target, args, kwargs)`` in program order; ``target`` is resolved (a module,
            a function, a method name, or the constant tensor of a ``get_attr``); arguments hold
            :class:`Ref` for earlier nodes.
        outputs: the output structure, with :class:`Ref` leaves.
        name: the model's name.
        layers: layer name -> module; each gets that name in the rebuilt model.
        untrusted: require every function call to consume a symbolic value (a config cannot make
            torchgraph compute on plain numbers).
    """
    from .model import Model
    from .naming import name as set_name, user_name
    from .trees import tree_map
    from .symbolic import Input, SymbolicInt, SymbolicTensor

    for layer_name, layer in layers.items():
        if user_name(layer) != layer_name:
            set_name(layer, layer_name)

    env: dict[str, Any] = {}
    for input_name, shape, dtype in inputs:
        env[input_name] = Input(shape=shape, dtype=dtype, name=input_name)

    def lookup(o):
        if isinstance(o, Ref):
            if o.name not in env:
                raise ValueError(f"{where}: uses node '{o.name:.80}', which is not defined before it.")
            return env[o.name]
        return o

    symbolic = (SymbolicTensor, SymbolicInt)
    where = f"{name}"
    for op, node_name, target, args, kwargs in nodes:
        where = f"{name}: node '{node_name}'"
        if node_name in env:
            raise ValueError(f"{where}: the name is used twice.")
        if op == "get_attr":
            env[node_name] = target
            continue
        args = tree_map(lookup, args)
        kwargs = tree_map(lookup, kwargs)
        if untrusted and not _any_leaf(lambda o: isinstance(o, symbolic), (args, kwargs)):
            raise ValueError(f"{where}: a {op} node must take at least one value computed by the model.")
        try:
            if op == "call_module":
                out = target(*args, **kwargs)
            elif op == "call_function":
                out = target(*args, **kwargs)
            else:
                if not args or not isinstance(args[0], symbolic):
                    raise ValueError(f"{where}: method '{target}' must be called on a tensor of the model.")
                out = getattr(args[0], target)(*args[1:], **kwargs)
        except (ValueError, TypeError) as exc:  # GraphBuildError is a ValueError
            if untrusted or isinstance(exc, GraphBuildError):
                raise _as_value_error(exc, where) from None
            raise
        except Exception as exc:  # noqa: BLE001 - anything a crafted config triggers is a bad config
            if not untrusted:
                raise
            raise ValueError(f"{where}: {type(exc).__name__}: {exc}") from None
        env[node_name] = out

    outputs = tree_map(lookup, outputs)
    input_values = [env[n] for n, _, _ in inputs]
    if input_kind == "single":
        model_inputs: Any = input_values[0]
    elif input_kind == "dict":
        model_inputs = {n: env[n] for n, _, _ in inputs}
    else:
        model_inputs = input_values if input_kind == "list" else tuple(input_values)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tg.Model: input .* is not used")
        try:
            return Model(model_inputs, outputs, name=name)
        except (ValueError, TypeError) as exc:
            raise _as_value_error(exc, f"{name}: rebuilding the model") from None


def _as_value_error(exc: Exception, where: str) -> ValueError:
    if isinstance(exc, GraphBuildError):
        return GraphBuildError(f"{where}: {exc}")
    return ValueError(f"{where}: {type(exc).__name__}: {exc}")


def _any_leaf(pred: Callable[[Any], bool], obj) -> bool:
    from .trees import tree_leaves

    return any(pred(leaf) for _, leaf in tree_leaves(obj))
