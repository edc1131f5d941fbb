"""``clone_model``: the same architecture with new layers (fresh weights by default), as in Keras.

The clone is rebuilt through the symbolic API (``replay.py``), so every shape is checked again and
the result is an ordinary ``tg.Model`` -- a ``tg.Sequential`` stays one, a registered ``tg.Model``
subclass is rebuilt as itself, and a model configured for training with ``model.compile(optimizer=,
loss=...)`` comes back configured the same way (with a new optimizer of the same class and settings,
as Keras recompiles its clones).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .layer_config import layer_from_config, layer_to_config, model_class, model_class_key
from .naming import user_name
from .replay import Ref, get_attr, input_shape, replay

__all__ = ["clone_model"]


def clone_model(model, clone_function: Callable[[nn.Module], nn.Module] | None = None, *,
                input_tensors=None, call_function: Callable | None = None, recursive: bool = False):
    """A new model with the architecture of ``model``, rebuilt through the symbolic API.

    Args:
        model (tg.Model): the model to clone.
        clone_function: called once per layer (a shared layer once); returns the module to use in its
            place. Returning the layer itself shares it (and its weights) with ``model``; a layer it
            names with ``tg.name`` keeps that name. By default each layer is rebuilt from its config
            (fresh weights), which needs every layer to be describable by ``get_config``; with a
            ``clone_function`` any layer works.
        input_tensors: symbolic tensors to build the clone on instead of new inputs (a ``tg.Input``,
            or values computed by other layers): one tensor, a list/tuple, or a dict by input name,
            like the model's inputs.
        call_function: ``call_function(layer, *args, **kwargs)`` is called instead of
            ``layer(*args, **kwargs)`` for every layer call, with the new layer; it may add
            operations around the call (its return value is the layer's output).
        recursive: clone nested models layer by layer with the same ``clone_function`` and
            ``call_function`` (``True``), or hand each nested model to ``clone_function`` as one layer
            (``False``, the default; the default ``clone_function`` rebuilds it with fresh weights).

    Returns:
        tg.Model: same ``model.code`` and state_dict keys (unless ``call_function`` adds operations);
        constants are copied; tensors ``model`` shares between layers (tied weights) are shared;
        same class for ``tg.Sequential`` and registered subclasses; configured for training like
        ``model``. A ``tg.from_module`` model's state beyond its graph (a submodule its forward
        never calls) is cloned too.

    Raises:
        ValueError: the default clone meets a layer get_config cannot describe (pass a clone_function,
            e.g. ``copy.deepcopy``), ``input_tensors`` that do not match the inputs, or a replacement
            that does not fit (shape errors name the layer).

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(8,))
        >>> model = tg.Model(x, nn.Linear(8, 2)(nn.Dropout(0.5)(x)))
        >>> fresh = tg.clone_model(model)
        >>> torch.equal(fresh.linear.weight, model.linear.weight)
        False
        >>> lighter = tg.clone_model(
        ...     model, lambda layer: nn.Dropout(0.1) if isinstance(layer, nn.Dropout) else layer)
        >>> lighter.linear is model.linear, lighter.dropout.p
        (True, 0.1)
        >>> clipped = tg.clone_model(model, call_function=lambda layer, h: layer(h).clamp(-1, 1))
        >>> [n.target for n in clipped.graph.nodes if n.op == "call_method"]
        ['clamp', 'clamp']
    """
    from .model import Model
    from .sequential import Sequential

    if not isinstance(model, Model):
        raise TypeError(f"tg.clone_model: expected a tg.Model; received {type(model).__name__}.")
    if not isinstance(recursive, bool):
        raise TypeError(f"tg.clone_model: recursive must be True or False; received {recursive!r}.")
    for what, fn in (("clone_function", clone_function), ("call_function", call_function)):
        if fn is not None and not callable(fn):
            raise TypeError(f"tg.clone_model: {what} must be callable; received {type(fn).__name__}.")

    def replace(layer: nn.Module, where: str) -> nn.Module:
        if recursive and isinstance(layer, Model):
            return clone_model(layer, clone_function, call_function=call_function, recursive=True)
        return _replacement(layer, clone_function, where)

    if isinstance(model, Sequential) and not model.built:
        clone = _clone_unbuilt(model, replace, input_tensors)
    else:
        clone = _clone_graph(model, replace, input_tensors, call_function)
    _configure_like(model, clone)
    return clone


def _clone_graph(model, replace, input_tensors, call_function):
    from .model import Model
    from .sequential import Sequential, as_sequential
    from .trees import plain_containers, tree_map

    name = type(model).__name__
    layers: dict[str, nn.Module] = {}
    nodes: list[tuple] = []
    inputs: list[tuple] = []
    copied: dict[str, torch.Tensor] = {}
    outputs: Any = None

    def ref(a):
        if isinstance(a, fx.Node):
            return Ref(a.target if a.op == "placeholder" else a.name)
        return a

    for node in model.graph.nodes:
        if node.op == "placeholder":
            spec = node.meta["tg_spec"]
            inputs.append((node.target, input_shape(spec), spec.dtype))
        elif node.op == "output":
            outputs = tree_map(ref, plain_containers(node.args[0]))
        elif node.op == "get_attr":
            if node.target not in copied:
                copied[node.target] = _copy_tensor(get_attr(model, node.target))
            nodes.append(("get_attr", node.name, copied[node.target], (), {}))
        else:
            target = node.target
            if node.op == "call_module":
                if target not in layers:
                    layers[target] = replace(model.get_submodule(target), f"tg.clone_model: layer '{target}'")
                target = layers[target]
            args = tree_map(ref, plain_containers(tuple(node.args)))
            kwargs = tree_map(ref, plain_containers(dict(node.kwargs)))
            nodes.append((node.op, node.name, target, args, kwargs))
    # New layers get the original names (or the tg.name given in clone_function); a layer returned
    # as-is keeps its tg.name, else the name it has in `model` (for this clone only: a module path of
    # tg.from_module is no name the layer keeps elsewhere).
    fresh = {n: m for n, m in layers.items() if m is not model.get_submodule(n)}
    fixed = {id(t): n for n, t in copied.items()}
    fixed.update((id(m), n) for n, m in layers.items() if n not in fresh and user_name(m) is None)
    tensors = _given_inputs(model, input_tensors)
    cls = model_class(model)
    construct = None
    if cls is not Model and not issubclass(cls, Sequential) and model_class_key(model) is not None:
        extras = _subclass_entries(model)
        construct = lambda i, o, n: cls(i, o, name=n, **extras)  # noqa: E731
    env: dict[str, Any] = {}
    clone = replay(inputs, model.meta["torchgraph"]["input_kind"], nodes, outputs, name, fresh,
                   input_tensors=tensors, call_function=call_function, construct=construct, env=env,
                   fixed_names=fixed)
    if isinstance(model, Sequential):
        clone = _as_sequential_clone(model, clone, env, as_sequential)
    _clone_hierarchy(model, clone, replace, scopes=call_function is None)
    _tie_like(model, clone)
    clone.train(model.training)
    return clone


def _tie_like(model, clone) -> None:
    """Tensors ``model`` shares between layers (tied weights: nanoGPT's lm_head and wte) are shared
    in the clone too (NOTE: [Tied weights] in hierarchy.py) -- never by changing a layer the clone
    shares with ``model``."""
    from .hierarchy import retie, shared_state

    own = dict(clone.named_parameters(remove_duplicate=False)) | dict(clone.named_buffers(remove_duplicate=False))
    theirs = {id(m) for m in model.modules()}
    aliases = {}
    for alias, key in shared_state(model).items():
        if alias in own and key in own and own[alias] is not own[key] and own[alias].shape == own[key].shape \
                and own[alias].dtype == own[key].dtype \
                and id(clone.get_submodule(alias.rpartition(".")[0])) not in theirs:
            aliases[alias] = key
    retie(clone, aliases)


def _clone_hierarchy(model, clone, replace, scopes: bool) -> None:
    """What ``model`` holds beyond its graph (a tg.from_module model: NOTE: [Unreferenced state] in
    config.py), in the clone too: unused layers (through ``replace``) and tensors (copied), which
    buffers are persistent, containers, node scopes (unless call_function changed the nodes) and the
    state order -- the same ``state_dict`` keys, as from_config gives."""
    from .hierarchy import is_persistent, restore_hierarchy, unreferenced_state

    graph_targets = {n.target for n in model.graph.nodes if n.op in ("call_module", "get_attr")}
    layers, tensors = unreferenced_state(model, graph_targets)
    non_persistent = {t for t in graph_targets | set(tensors) if not is_persistent(model, t)}
    info = model.meta["torchgraph"]
    tree = info.get("scope_types") is not None
    description = {
        "nodes": [{"name": n.name, "scope": n.meta["tg_scope"]} for n in model.graph.nodes
                  if scopes and n.meta.get("tg_scope")],
        "scope_types": info.get("scope_types"),
        "containers": info.get("containers") or None,
        "state_order": list(model.state_dict()) if tree else None,
    }
    restore_hierarchy(clone, description,
                      {p: replace(m, f"tg.clone_model: layer '{p}'") for p, m in layers.items()},
                      {p: _copy_tensor(t) for p, t in tensors.items()}, non_persistent)


def _given_inputs(model, input_tensors) -> list | None:
    """``input_tensors`` as one symbolic tensor per model input, in order (checked)."""
    from .symbolic import SymbolicTensor

    if input_tensors is None:
        return None
    names = model.input_names
    if isinstance(input_tensors, dict):
        if set(input_tensors) != set(names):
            raise ValueError(f"tg.clone_model: input_tensors has keys {sorted(map(str, input_tensors))}; "
                             f"expected the model's input names {names}.")
        tensors = [input_tensors[n] for n in names]
    elif isinstance(input_tensors, (list, tuple)):
        tensors = list(input_tensors)
    else:
        tensors = [input_tensors]
    if len(tensors) != len(names):
        raise ValueError(f"tg.clone_model: input_tensors has {len(tensors)} tensor(s); the model takes "
                         f"{len(names)} input(s) {names}.")
    for n, t in zip(names, tensors):
        if not isinstance(t, SymbolicTensor) or t._tg_value is None:
            raise ValueError(f"tg.clone_model: input_tensors for input '{n}' must be a symbolic tensor (a "
                             f"tg.Input, or a layer's output); received {type(t).__name__}.")
    return tensors


def _as_sequential_clone(model, clone, env: dict, as_sequential):
    """The clone of a built Sequential as a Sequential, its steps found by the values replay made."""
    from .symbolic_handles import symbolic_handles

    by_value = {id(obj._tg_value): n for n, obj in symbolic_handles(clone)["nodes"].items()
                if getattr(obj, "_tg_value", None) is not None}
    old_steps = model.meta["torchgraph_sequential"]["steps"]
    steps = [clone.input_names[0]] + [by_value.get(id(getattr(env.get(s), "_tg_value", None))) for s in
                                      old_steps[1:]]
    if any(s is None for s in steps):  # call_function added steps: the chain is not one layer per step
        return clone
    try:
        return as_sequential(model_class(model), clone, steps)
    except ValueError:  # built on input_tensors that are not a tg.Input
        return clone


def _clone_unbuilt(model, replace, input_tensors):
    steps = []
    for i, step in enumerate(model.__dict__.get("_tg_pending", [])):
        steps.append(replace(step, f"tg.clone_model: step {i}") if isinstance(step, nn.Module) else step)
    if input_tensors is not None:
        steps = _given_inputs_unbuilt(input_tensors) + steps
    return model_class(model)(steps, name=model._get_name()).train(model.training)


def _given_inputs_unbuilt(input_tensors) -> list:
    tensors = list(input_tensors.values()) if isinstance(input_tensors, dict) else (
        list(input_tensors) if isinstance(input_tensors, (list, tuple)) else [input_tensors])
    if len(tensors) != 1:
        raise ValueError(f"tg.clone_model: an unbuilt Sequential takes one input; input_tensors has "
                         f"{len(tensors)}.")
    return tensors


def _subclass_entries(model) -> dict:
    """The entries a registered tg.Model subclass adds to its config (passed to its __init__)."""
    from .config import MODEL_KEYS
    from .config_values import decode_value

    config = model.get_config()
    return {k: decode_value(v, f"tg.clone_model: '{k}'") for k, v in config.items() if k not in MODEL_KEYS}


def _configure_like(model, clone) -> None:
    """Compile ``clone`` for training the way ``model`` was (a new optimizer of the same kind)."""
    from .training.state import _STATES

    state = _STATES.get(model)
    arguments = getattr(state, "compile_arguments", None)
    if not arguments:
        return
    arguments = dict(arguments)
    optimizer = arguments.get("optimizer")
    if isinstance(optimizer, torch.optim.Optimizer):
        arguments["optimizer"] = _optimizer_factory(optimizer)
    for key in ("loss", "metrics"):  # a loss or metric module holds state (weights, running sums)
        value = arguments.get(key)
        if _holds_module(value):
            arguments[key] = copy.deepcopy(value)
    clone.compile(**arguments)


def _holds_module(value) -> bool:
    if isinstance(value, nn.Module):
        return True
    if isinstance(value, dict):
        return any(_holds_module(v) for v in value.values())
    return isinstance(value, (list, tuple)) and any(_holds_module(v) for v in value)


def _optimizer_factory(optimizer: torch.optim.Optimizer) -> Callable:
    cls, defaults = type(optimizer), dict(optimizer.defaults)
    return lambda params: cls(params, **defaults)


def _copy_tensor(t: torch.Tensor) -> torch.Tensor:
    copy_ = t.detach().clone()
    return nn.Parameter(copy_, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copy_


def _replacement(layer: nn.Module, clone_function, where: str) -> nn.Module:
    from .model import Model

    if clone_function is None:
        if isinstance(layer, Model):
            return clone_model(layer)
        try:
            config = layer_to_config(layer, where)
        except ValueError as exc:
            raise ValueError(f"{exc} Or pass clone_function (for example copy.deepcopy) to "
                             "tg.clone_model.") from None
        return layer_from_config(config, where)
    new = clone_function(layer)
    if not isinstance(new, nn.Module):
        raise TypeError(f"{where}: clone_function must return an nn.Module; it returned "
                        f"{type(new).__name__}.")
    return new
