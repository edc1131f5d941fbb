"""Architecture as data: ``get_config`` describes a model as JSON, ``from_config`` rebuilds it.

The config lists the inputs, the layers (class + constructor arguments + name), the constants, every
graph node in program order (its op, target and arguments, with ``{"node": name}`` for the values it
consumes), and the output structure. ``from_config`` replays those nodes through the symbolic API
(``replay.py``) -- it calls the rebuilt layers and torch functions on ``tg.Input`` tensors -- so
shapes are checked again and the result is an ordinary ``tg.Model``: the same ``model.code``, the
same ``state_dict`` keys in the same order. ``tg.Sequential`` and registered ``tg.Model``
subclasses come back as themselves (``"class"``), with their own config entries. A
``tg.from_module`` model also lists what its graph does not reach (NOTE: [Unreferenced state]), its
module paths as names and each node's scope (``hierarchy.py``). The entries are read by
``config_entries.py``.

Design constraints:

- A config may come from an untrusted file: every part is validated, classes and functions are
  resolved only from allowlists (``config_functions.py``, ``config_values.py``, ``layer_config.py``),
  the build runs under a budget of tensor operations and memory (``untrusted.py``), and every
  failure is a ``ValueError`` (``GraphBuildError`` is one) that says which part of the config is
  wrong. The limits are listed in docs/config_and_saving.md ("Guarantees and limits").
- Weights are not part of a config. Small constants (at most :data:`INLINE_CONSTANT_LIMIT` elements)
  are written inline so that ``from_config`` reproduces them; larger ones are rebuilt as zeros and
  come back with the weights (``tg.load``).
"""

from __future__ import annotations

import contextlib
import json
import textwrap
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .config_entries import MAX_DIM, MAX_INPUT_DIMS, check_config_size, check_name as _check_name, \
    constant_from_entry, input_spec, node_from_entry, require as _require
from .config_functions import check_method_name, function_name, resolve_function, untrusted_method
from .config_values import decode_value, dtype_name, encode_value
from .hierarchy import check_path, is_persistent, restore_hierarchy, unreferenced_state
from .input_checks import model_float_dtype
from .layer_modes import apply_layer_modes, layer_modes
from .layer_config import MODEL_CLASS, layer_from_config, layer_to_config, registered_model_class, \
    model_class_key
from .replay import Ref, get_attr, input_shape, replay
from .untrusted import BASE_OPS, DEFAULT_MAX_BYTES, OPS_PER_ITEM, build_guard, guarded

__all__ = ["get_config", "from_config", "model_from_config", "model_from_json", "FORMAT",
           "FORMAT_VERSION", "INLINE_CONSTANT_LIMIT", "MAX_NODES", "MAX_INPUTS", "MAX_INPUT_DIMS",
           "MAX_DIM", "MODEL_KEYS"]

FORMAT = "torchgraph.Model"
FORMAT_VERSION = 1
INLINE_CONSTANT_LIMIT = 1024
NON_PERSISTENT_LIMIT = 1 << 16
MAX_NODES = 10_000
MAX_INPUTS = 1_000
# The keys of a model config; a registered tg.Model subclass may add its own (passed to its __init__).
MODEL_KEYS = frozenset({"format", "format_version", "name", "training", "inputs", "input_kind", "layers",
                        "constants", "nodes", "outputs", "torchgraph_version", "class", "scope_types",
                        "state_order", "containers", "layer_modes"})


# --------------------------------------------------------------------------------------------
# get_config
# --------------------------------------------------------------------------------------------

def get_config(model) -> dict:
    """A JSON-serialisable description of ``model``'s architecture (no weights).

    Args:
        model (tg.Model): the model.

    Returns:
        dict: ``{"format", "format_version", "name", "training", "inputs", "input_kind", "layers",
        "constants", "nodes", "outputs"}``, plus ``"class"`` for a ``tg.Sequential`` or a registered
        ``tg.Model`` subclass; see ``docs/config_and_saving.md``.

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

    cast = _cast_float_dtype(model)
    inputs, layers, constants, nodes = [], [], [], []
    seen_layers: set[str] = set()
    seen_constants: set[str] = set()
    outputs: Any = None
    for node in model.graph.nodes:
        scope = node.meta.get("tg_scope")  # tg.scope / tg.from_module module path (summary depth)
        where = f"{model_name}: node '{node.name}'"
        if node.op == "placeholder":
            inputs.append(_input_entry(node, where, cast))
            continue
        if node.op == "output":
            outputs = encode_value(node.args[0], where, node_name)
            continue
        entry: dict[str, Any] = {"op": node.op, "name": node.name}
        if node.op == "get_attr":
            entry["target"] = node.target
            if node.target not in seen_constants:
                seen_constants.add(node.target)
                constants.append(_constant_entry(node.target, get_attr(model, node.target), where,
                                                 is_persistent(model, node.target)))
            if scope:
                entry["scope"] = scope
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
            resolve_function(entry["target"], where, untrusted=True)  # refused on loading: say so now
        else:
            entry["target"] = check_method_name(node.target, where)
            untrusted_method(entry["target"], where)
        entry["args"] = encode_value(list(node.args), where, node_name)
        entry["kwargs"] = {k: encode_value(v, where, node_name) for k, v in node.kwargs.items()}
        if scope:
            entry["scope"] = scope
        nodes.append(entry)
    # NOTE: [Unreferenced state] A tg.from_module model keeps the original's whole module tree
    # (a submodule its forward never calls, a parameter it never reads): listed too, so that the
    # rebuilt model has the same state_dict.
    extra_layers, extra_tensors = unreferenced_state(model, seen_layers | seen_constants)
    for path, layer in extra_layers.items():
        layers.append({"name": path, **layer_to_config(layer, f"{model_name}: layer '{path}'"), "unused": True})
    for path, t in extra_tensors.items():
        where = f"{model_name}: tensor '{path}'"
        constants.append({**_constant_entry(path, t, where, is_persistent(model, path)), "unused": True})
    extra = {}
    if info.get("scope_types") is not None:  # tg.from_module: the modules that ran, the state order
        extra["scope_types"] = dict(info["scope_types"])
        extra["state_order"] = list(model.state_dict())
    if info.get("containers"):
        extra["containers"] = dict(info["containers"])
    modes = layer_modes(model)  # NOTE: [Layer modes]
    if modes:
        extra["layer_modes"] = modes
    config = {
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
        **extra,
    }
    key = model_class_key(model)
    if key is not None:
        config["class"] = key
    real = [node for node in model.graph.nodes if node.meta.get("tg_real_data")]
    if real:
        _check_rebuilds_on_meta(model, config, real)
    return config


def _cast_float_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype a float32 build was cast to (``model.to(torch.bfloat16)``, ``.half()``), else None.

    NOTE: [Inputs of a cast model] A config stores each input's dtype, and tg.load rebuilds the graph
    on inputs of that dtype with the saved weights in place. A model built in float32 and then cast
    to bfloat16 takes bfloat16 inputs (its float32 build dtype no longer fits its weights: the first
    convolution would fail, and the file could not be loaded). So a float32 input of a model whose
    floating parameters (or, without any, its remembered cast: NOTE: [Cast without parameters]) are
    another floating dtype is stored in that dtype.
    """
    dtype = model_float_dtype(model)
    return dtype if dtype is not None and dtype != torch.float32 else None


def _input_entry(node: fx.Node, where: str, cast: torch.dtype | None = None) -> dict:
    """``{"name", "shape", "dtype"}``; a bounded dynamic dim is ``{"dim": name, "min": .., "max": ..}``."""
    spec = node.meta.get("tg_spec")
    shape = [{"dim": d.name, "min": d.min, "max": d.max} if not isinstance(d, (int, str, type(None))) else d
             for d in input_shape(spec)]
    dtype = cast if cast is not None and spec.dtype == torch.float32 else spec.dtype
    return {"name": node.target, "shape": shape, "dtype": dtype_name(dtype, where)}


def _constant_entry(name: str, t: torch.Tensor, where: str, persistent: bool = True) -> dict:
    entry = {"name": name, "shape": list(t.shape), "dtype": dtype_name(t.dtype, where),
             "parameter": isinstance(t, nn.Parameter), "requires_grad": bool(t.requires_grad)}
    limit = INLINE_CONSTANT_LIMIT if persistent else NON_PERSISTENT_LIMIT
    # NOTE: [Complex constants] a complex tensor is written as its real and imaginary parts, interleaved
    # (torch.view_as_real), and counts as twice its elements: rotary tables (Meta's and torchtitan's
    # non-persistent `freqs_cis`, complex64) are stored like any other buffer.
    numbers = t.numel() * (2 if t.is_complex() else 1)
    if not persistent:
        entry["persistent"] = False  # not in the state_dict, so not in a file's weights: inline always
        if numbers > limit or t.device.type == "meta":
            raise ValueError(f"{where}: a non-persistent buffer of {t.numel()} {t.dtype} elements ({numbers} "
                             f"numbers; not part of the state_dict, so not saved with the weights) cannot be "
                             f"stored in a config; at most {limit} numbers can. Register it as a persistent "
                             "buffer.")
    if numbers <= limit and t.device.type != "meta":
        flat = torch.view_as_real(t.detach()) if t.is_complex() else t.detach()
        entry["value"] = [encode_value(v, where) for v in flat.reshape(-1).tolist()]
    return entry


# --------------------------------------------------------------------------------------------
# from_config
# --------------------------------------------------------------------------------------------

def _check_rebuilds_on_meta(model, config: dict, real: list[fx.Node]) -> None:
    """NOTE: [Layers that need real data] A layer or function that the meta device could not run
    (data-dependent control flow such as ``if x.sum() > 0``, ``.item()``, HF BertModel's mask checks,
    nn.TransformerEncoder's eval-mode fast path) was probed with small real data when the model was
    built. ``tg.load`` and ``from_config`` rebuild on the meta device only, where nothing may compute on
    real data (a file would choose the sizes). Some such layers run on meta in the mode the config
    rebuilds them in (the encoder's fast path is eval-only), others never do: so the config of a model
    with such nodes is rebuilt once, as ``tg.load`` would, and refused up front when that fails,
    instead of writing a file that would not load. Models without such nodes pay nothing."""
    try:
        with torch.device("meta"):
            from_config(json.loads(json.dumps(config)))
    except ValueError as exc:
        names = ", ".join(f"'{n.name}' ({_node_what(model, n)})" for n in real[:3])
        raise ValueError(
            f"{type(model).__name__}: get_config cannot describe this model: {names} needed real data to "
            "build (data-dependent control flow, .item(), or an op without a meta kernel), and configs and "
            f"files are rebuilt on the meta device only, so its file would not load (rebuilding said: "
            f"{textwrap.shorten(str(exc), 400, placeholder=' ...')}). Save the weights alone (model.state_dict() with safetensors) and rebuild the "
            "model from code, or make the layer's forward independent of the data's values.") from None


def _node_what(model, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(model.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


def from_config(config: Any, *, max_bytes: int | None = DEFAULT_MAX_BYTES):
    """Rebuild the model ``config`` describes, with fresh weights, through the symbolic API.

    The config may come from anyone: see docs/config_and_saving.md ("Guarantees and limits"). A
    ``tg.Sequential`` or a registered ``tg.Model`` subclass comes back as its own class.

    Args:
        config (dict): from :func:`get_config` (or ``json.loads`` of :meth:`Model.to_json`).
        max_bytes (int): memory the new weights (and anything else the build creates outside the
            meta device) may take; default 16 GiB, ``None`` for no limit.

    Returns:
        tg.Model: the same architecture; ``load_state_dict`` with the original's weights makes the
        outputs identical.

    Raises:
        ValueError: anything wrong with the config (the message names the part); unknown layer classes
            must be registered first with ``@tg.register_layer``; a config whose build exceeds its
            budget (``torchgraph.untrusted.BuildLimitError``).

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
    from .model import Model

    return model_from_config(Model, config, max_bytes=max_bytes)


def model_from_config(cls: type, config: Any, *, max_bytes: int | None = DEFAULT_MAX_BYTES):
    """``cls.from_config(config)``: ``tg.Model`` revives the class the config names; a subclass itself."""
    from .model import Model

    from .sequential import Sequential, sequential_from_config

    with _untrusted_build(config, max_bytes, "from_config"):
        if cls is Model:
            named = _config_class(config)
            if named is not Model:
                return named.from_config(config)
        if issubclass(cls, Sequential):
            return sequential_from_config(cls, config)
        return build_model(cls, config)


@contextlib.contextmanager
def _untrusted_build(config: Any, max_bytes: int | None, who: str):
    """Bound the build of an untrusted config (unless an outer build already does) and turn every
    failure into a ValueError."""
    try:
        if guarded():
            yield
        else:
            check_config_size(config, who)
            items = sum(len(config[k]) for k in ("layers", "nodes", "constants")
                        if isinstance(config, dict) and isinstance(config.get(k), list))
            with build_guard(max_bytes if max_bytes is not None else 2**62,
                             BASE_OPS + OPS_PER_ITEM * items):
                yield
    except ValueError:
        raise
    except RecursionError:
        raise ValueError(f"{who}: the config is nested too deeply.") from None
    except Exception as exc:  # noqa: BLE001 - a crafted config must not reach the caller as anything else
        raise ValueError(f"{who}: the config could not be built: {type(exc).__name__}: {exc}") from exc


def _config_class(config: Any) -> type:
    """The model class a config names: tg.Model (no "class"), tg.Sequential, or a registered subclass."""
    from .model import Model

    key = config.get("class", MODEL_CLASS) if isinstance(config, dict) else MODEL_CLASS
    if key == MODEL_CLASS:
        return Model
    return registered_model_class(key, "from_config: 'class'")


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


def parse_header(config: Any, extra_keys: frozenset = frozenset()) -> dict:
    """Check the top-level keys of a model config; return the extra (subclass) entries, decoded."""
    _require(isinstance(config, dict), f"from_config: expected a dict; received {type(config).__name__}.")
    fmt, version = config.get("format"), config.get("format_version")
    _require(fmt == FORMAT, f"from_config: 'format' must be '{FORMAT}'; received {fmt!r:.80}. This is not a "
             "torchgraph model config.")
    _require(isinstance(version, int) and not isinstance(version, bool),
             f"from_config: 'format_version' must be an int; received {version!r:.80}.")
    _require(version <= FORMAT_VERSION, f"from_config: the config has format_version {version}, written "
             f"by a newer torchgraph; this version reads up to {FORMAT_VERSION}. Upgrade torchgraph.")
    for key in config:
        _require(isinstance(key, str), f"from_config: keys must be strings; received {key!r:.40}.")
    return {k: decode_value(v, f"from_config: '{k}'") for k, v in config.items()
            if k not in MODEL_KEYS and k not in extra_keys}


def build_model(cls: type, config: Any, construct=None, extra_keys: frozenset = frozenset()):
    """The model of class ``cls`` that ``config`` describes (the core of ``cls.from_config``).

    Entries a subclass added to its config (keys beyond :data:`MODEL_KEYS`) are passed to
    ``cls(inputs, outputs, name=..., **entries)``, as Keras does.
    """
    from .model import Model

    extras = parse_header(config, extra_keys)
    if extras and (cls is Model or not issubclass(cls, Model)):
        raise ValueError(f"from_config: unexpected keys {sorted(extras)[:8]}. A tg.Model subclass that adds "
                         "entries to its config must be registered with @tg.register_layer (its class is "
                         "then stored in the config).")
    name = _check_name(config.get("name"), "from_config: 'name'")
    for key in ("inputs", "layers", "constants", "nodes"):
        _require(isinstance(config.get(key), list), f"from_config: '{key}' must be a list.")
    _require(len(config["nodes"]) <= MAX_NODES and len(config["layers"]) <= MAX_NODES and
             len(config["constants"]) <= MAX_NODES, f"from_config: more than {MAX_NODES} nodes, layers or "
             "constants (the limit of a config).")
    _require(len(config["inputs"]) <= MAX_INPUTS, f"from_config: more than {MAX_INPUTS} inputs.")
    input_kind = config.get("input_kind")
    _require(input_kind in ("single", "list", "tuple", "dict"),
             f"from_config: 'input_kind' must be single, list, tuple or dict; received {input_kind!r:.40}.")
    _require(input_kind != "single" or len(config["inputs"]) == 1,
             "from_config: input_kind 'single' needs exactly one input.")
    training = config.get("training", True)
    _require(isinstance(training, bool), "from_config: 'training' must be a bool.")

    inputs = [input_spec(e, i) for i, e in enumerate(config["inputs"])]
    _require(len({n for n, _, _ in inputs}) == len(inputs), "from_config: duplicate input names.")

    layers: dict[str, nn.Module] = {}
    unused_layers: dict[str, nn.Module] = {}
    for i, entry in enumerate(config["layers"]):
        where = f"from_config: layers[{i}]"
        _require(isinstance(entry, dict), f"{where}: expected an object.")
        lname = check_path(entry.get("name"), f"{where} 'name'")
        _require(lname not in layers and lname not in unused_layers, f"{where}: duplicate layer name '{lname}'.")
        unused = entry.get("unused", False)
        _require(isinstance(unused, bool), f"{where}: 'unused' must be a bool.")
        entry = {k: v for k, v in entry.items() if k != "unused"}
        (unused_layers if unused else layers)[lname] = layer_from_config(entry, f"from_config: layer '{lname}'")

    constants: dict[str, torch.Tensor] = {}
    unused_constants: dict[str, torch.Tensor] = {}
    non_persistent: set[str] = set()
    for i, entry in enumerate(config["constants"]):
        cname, tensor, persistent, unused = constant_from_entry(entry, f"from_config: constants[{i}]")
        _require(cname not in constants and cname not in unused_constants,
                 f"from_config: duplicate constant '{cname}'.")
        _require(cname not in layers and cname not in unused_layers,
                 f"from_config: the constant '{cname}' has a layer's name.")
        (unused_constants if unused else constants)[cname] = tensor
        if not persistent:
            non_persistent.add(cname)

    nodes = []
    for i, entry in enumerate(config["nodes"]):
        nodes.append(node_from_entry(entry, i, layers, constants))

    outputs = decode_value(config.get("outputs"), "from_config: 'outputs'", resolve_node=Ref)
    if construct is None:
        def construct(model_inputs, model_outputs, model_name):
            if cls is Model:
                return Model(model_inputs, model_outputs, name=model_name)
            return cls(model_inputs, model_outputs, name=model_name, **extras)
    model = replay(inputs, input_kind, nodes, outputs, name, layers, untrusted=True, construct=construct,
                   fixed_names={id(t): n for n, t in constants.items()})
    restore_hierarchy(model, config, unused_layers, unused_constants, non_persistent)
    model.train(training)
    apply_layer_modes(model, config.get("layer_modes", []), "from_config")
    return model
