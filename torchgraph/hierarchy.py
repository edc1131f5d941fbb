"""A model's module tree beyond its graph: containers, and state that no node reads.

A ``tg.Model`` made by ``tg.from_module`` (or with ``tg.scope``) has dotted layer names
(``layer1.0.conv1``): fx keeps them under plain ``nn.Module`` containers, as ``torch.fx.symbolic_trace``
does. Its ``state_dict`` must stay exactly the original module's, so it may also hold what no graph
node reads (a submodule the forward never calls, a parameter of a looked-through module) and
non-persistent buffers. This module builds that tree and lists that extra state, for configs and
files to carry it.
"""

from __future__ import annotations

import keyword
from typing import Any

import torch
import torch.nn as nn

__all__ = ["CONTAINER_TYPES", "is_container", "container_kind", "set_container", "attach", "mirror_hierarchy",
           "unreferenced_state", "reorder_state", "order_by_graph", "check_path", "restore_hierarchy",
           "shared_state", "retie"]


# The containers of a module tree: fx's plain nn.Module, and the indexable kinds the original used
# (model.layers[0] works on a tg.from_module model as on the original).
CONTAINER_TYPES = {"Module": nn.Module, "Sequential": nn.Sequential, "ModuleList": nn.ModuleList,
                   "ModuleDict": nn.ModuleDict}


def is_container(module: nn.Module) -> bool:
    """A module that only holds other modules and tensors here (exactly one of CONTAINER_TYPES)."""
    return type(module) in CONTAINER_TYPES.values()


def container_kind(module: nn.Module) -> str:
    """The container type that stands for ``module`` in a model's tree (``"Module"`` if no other)."""
    for kind in ("Sequential", "ModuleList", "ModuleDict"):
        if isinstance(module, CONTAINER_TYPES[kind]):
            return kind
    return "Module"


def set_container(parent: nn.Module, field: str, kind: str) -> nn.Module:
    """Make ``parent.<field>`` a container of ``kind``, keeping what an existing container holds."""
    current = parent._modules.get(field)
    if current is not None and type(current) is CONTAINER_TYPES[kind]:
        return current
    new = CONTAINER_TYPES[kind]()
    if current is not None and is_container(current):
        new._modules.update(current._modules)
        new._parameters.update(current._parameters)
        new._buffers.update(current._buffers)
        new._non_persistent_buffers_set = set(current._non_persistent_buffers_set)
        new.training = current.training
    parent.add_module(field, new)
    return new


def attach(model: nn.Module, path: str, obj, persistent: bool = True) -> None:
    """Put ``obj`` (a module, a parameter or a tensor) at dotted ``path``, creating containers."""
    *parents, field = path.split(".")
    owner = model
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(obj, nn.Module):
        owner.add_module(field, obj)
    elif isinstance(obj, nn.Parameter):
        owner.register_parameter(field, obj)
    else:
        owner.register_buffer(field, obj, persistent=persistent)


def mirror_hierarchy(model: nn.Module, module: nn.Module, leaves: set[int]) -> tuple[dict, dict]:
    """Give ``model`` the module tree of ``module``: the modules whose ids are in ``leaves`` at their
    paths, every other module as a container (see CONTAINER_TYPES) holding its own parameters and
    buffers, all in the original order and with the original buffer persistence and train/eval flags.

    Returns ``({module path: class name}, {module path: container kind other than "Module"})`` of
    the containers (the groups of summary and plot; the container types to rebuild).
    """
    types: dict[str, str] = {}
    kinds: dict[str, str] = {}
    leaf_paths: list[str] = []
    own: set[str] = set()
    placed: list[tuple[nn.Module, nn.Module]] = []
    for path, orig in module.named_modules(remove_duplicate=False):
        if any(path.startswith(p + ".") for p in leaf_paths):
            continue
        if path == "":
            target = model
        else:
            parent_path, _, field = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            current = parent._modules.get(field)
            if id(orig) in leaves:
                leaf_paths.append(path)
                if current is not orig:
                    parent.add_module(field, orig)
                continue
            kind = container_kind(orig)
            target = set_container(parent, field, kind)
            types[path] = type(orig).__name__
            if kind != "Module":
                kinds[path] = kind
            target.training = orig.training
        for name, p in orig._parameters.items():
            if target._parameters.get(name, False) is not p:
                target.register_parameter(name, p)
        for name, b in orig._buffers.items():
            if target._buffers.get(name, False) is not b:
                target.register_buffer(name, b)
            if path == "":
                own.add(name)
        target._non_persistent_buffers_set = {n for n in orig._non_persistent_buffers_set if n in target._buffers}
        placed.append((target, orig))
    # In the original order, once every child is in place (an unused child comes after the used ones).
    for target, orig in placed:
        for attr in ("_parameters", "_buffers", "_modules"):
            mine, theirs = getattr(target, attr), getattr(orig, attr)
            ordered = {k: mine[k] for k in theirs if k in mine}
            ordered.update((k, v) for k, v in mine.items() if k not in ordered)
            mine.clear()
            mine.update(ordered)
    # Tensors the forward created (constants) were no state of the original: they stay out of the
    # state_dict, so that the original's checkpoints load unchanged.
    model._non_persistent_buffers_set |= {n for n in model._buffers if n not in own}
    return types, kinds


def is_persistent(model: nn.Module, path: str) -> bool:
    """Whether the buffer at ``path`` is in ``model.state_dict()``."""
    owner_path, _, field = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    return field not in owner._non_persistent_buffers_set


def unreferenced_state(model, graph_targets: set[str]) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """Layers and tensors of ``model`` that no graph node names (``graph_targets``): a submodule the
    original forward never called, a parameter of a looked-through module that it never read.

    Returns ``(layers by path, tensors by path)``; layers inside other layers are not listed.
    """
    layers: dict[str, nn.Module] = {}
    tensors: dict[str, torch.Tensor] = {}
    stack = [("", model)]
    while stack:
        prefix, owner = stack.pop()
        for name, t in list(owner._parameters.items()) + list(owner._buffers.items()):
            path = prefix + name
            if t is not None and path not in graph_targets:
                tensors[path] = t
        for name, child in owner._modules.items():
            path = prefix + name
            if child is None or path in graph_targets:
                continue
            if is_container(child):
                stack.append((path + ".", child))
            else:
                layers[path] = child
    return layers, tensors


def order_by_graph(model) -> None:
    """Order the containers of dotted layer names (``tg.scope``) by first use in the graph, as a
    hand-written module lists its submodules in the order ``__init__`` creates them (fx installs
    them by depth)."""
    keys = [n.target for n in model.graph.nodes if n.op in ("call_module", "get_attr")]
    if any("." in k for k in keys):
        reorder_state(model, keys)


def reorder_state(model: nn.Module, keys: list[str]) -> None:
    """Order the root's and the containers' parameters, buffers and submodules so that
    ``model.state_dict()`` lists its keys in the order of ``keys`` (the original module's)."""
    rank: dict[str, int] = {}
    for i, key in enumerate(keys):
        parts = key.split(".")
        for j in range(1, len(parts) + 1):
            rank.setdefault(".".join(parts[:j]), i)
    stack = [("", model)]
    while stack:
        prefix, owner = stack.pop()
        for attr in ("_parameters", "_buffers", "_modules"):
            entries = getattr(owner, attr)
            ordered = sorted(entries.items(), key=lambda kv: rank.get(prefix + kv[0], len(keys)))
            entries.clear()
            entries.update(ordered)
        stack.extend((f"{prefix}{name}.", child) for name, child in owner._modules.items()
                     if child is not None and is_container(child))


# --------------------------------------------------------------------------------------------
# Configs (config.py): names and the tree beyond the graph
# --------------------------------------------------------------------------------------------

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_path(name: Any, where: str) -> str:
    """A layer or constant name: an identifier, an index, or a module path such as ``layer1.0.conv1``.

    An index alone (``"0"``) is the name of a top-level layer of a model recorded from an
    ``nn.Sequential`` (``tg.from_module(nn.Sequential(...), ...)``): its code reads ``getattr(self, "0")``.
    """
    parts = name.split(".") if isinstance(name, str) and len(name) <= 1000 else [None]
    _require(all(isinstance(p, str) and (p.isdigit() or (p.isidentifier() and not keyword.iskeyword(p)))
                 for p in parts),
             f"{where}: expected a Python identifier or a module path (identifiers and indices joined by "
             f"dots); received {name!r:.80}.")
    return name


def restore_hierarchy(model, config: dict, layers: dict, tensors: dict, non_persistent: set[str]) -> None:
    """After ``from_config``'s replay: attach the unreferenced state (NOTE: [Unreferenced state] in
    config.py), mark non-persistent buffers, restore node scopes, module classes and state order.
    Raises ValueError for a malformed part."""
    for path, obj in [*layers.items(), *tensors.items()]:
        owner_path = path.rpartition(".")[0]
        _require(not owner_path or is_container(model.get_submodule(owner_path))
                 if _has_path(model, owner_path) else True,
                 f"from_config: '{path}' would be placed inside a layer.")
        _require(not _has_path(model, path), f"from_config: '{path}' is defined twice.")
        attach(model, path, obj, persistent=path not in non_persistent)
    for path in non_persistent - set(tensors):
        owner_path, _, field = path.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if field in owner._buffers:
            owner._non_persistent_buffers_set.add(field)
    scopes = {e.get("name"): e.get("scope") for e in config["nodes"] if isinstance(e, dict) and e.get("scope")}
    for node in model.graph.nodes:
        scope = scopes.get(node.name)
        if scope is not None:
            _require(isinstance(scope, str) and len(scope) <= 1000, "from_config: a node 'scope' must be a string.")
            node.meta["tg_scope"] = scope
    types = config.get("scope_types")
    if types is not None:
        _require(isinstance(types, dict) and all(isinstance(k, str) and isinstance(v, str) and len(v) <= 200
                                                 for k, v in types.items()),
                 "from_config: 'scope_types' must map module paths to class names.")
        model.meta["torchgraph"]["scope_types"] = dict(types)
    kinds = config.get("containers")
    if kinds is not None:
        _require(isinstance(kinds, dict) and all(isinstance(k, str) and v in CONTAINER_TYPES for k, v in kinds.items()),
                 f"from_config: 'containers' must map module paths to one of {sorted(CONTAINER_TYPES)}.")
        for path in sorted(kinds, key=lambda p: p.count(".")):
            check_path(path, "from_config: a 'containers' path")
            parent_path, _, field = path.rpartition(".")
            _require(_has_path(model, parent_path), f"from_config: container '{path}' has no parent.")
            parent = model.get_submodule(parent_path) if parent_path else model
            # An empty container of the original module (HF ConvNext's first `downsampling_layer =
            # nn.ModuleList()`) holds no layer or tensor, so nothing above made it: make it here.
            _require(_has_path(model, path) or ((not parent_path or is_container(parent)) and not hasattr(parent, field)),
                     f"from_config: container '{path}' would be placed inside a layer or over an attribute.")
            set_container(parent, field, kinds[path])
        model.meta["torchgraph"]["containers"] = dict(kinds)
    order = config.get("state_order")
    if order is not None:
        _require(isinstance(order, list) and all(isinstance(k, str) for k in order),
                 "from_config: 'state_order' must be a list of state_dict keys.")
        reorder_state(model, order)


def _has_path(model, path: str) -> bool:
    try:
        model.get_submodule(path) if path else None
        return True
    except AttributeError:
        owner_path, _, field = path.rpartition(".")
        try:
            owner = model.get_submodule(owner_path) if owner_path else model
        except AttributeError:
            return False
        return field in owner._parameters or field in owner._buffers


# --------------------------------------------------------------------------------------------
# Tied weights: tg.load (saving.py) and tg.clone_model
# --------------------------------------------------------------------------------------------

def shared_state(model: nn.Module) -> dict[str, str]:
    """``{name: first name}`` for every parameter or buffer that is the same tensor object as an
    earlier one (tied weights), in ``named_parameters``/``named_buffers`` order."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


# NOTE: [Tied weights] Which tensors a loaded (or cloned) model shares is what the saved (or
# original) model shared, as the file's aliases record it (a key stored once, its aliases pointing
# to it; shared_state for a clone): nanoGPT's lm_head.weight
# and wte.weight, recorded by tg.from_module as two layers, or ties a layer's constructor makes
# (a Hugging Face model with tie_word_embeddings). Not what the rebuilt model happens to share: a
# tie its constructor makes that the saved model had undone must stay undone.
def retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Tensors the saved model shared are one tensor again, not two equal copies that a training
    step would pull apart (NOTE: [Tied weights])."""
    for alias, key in aliases.items():
        owner_path, _, field = alias.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        source_path, _, source_field = key.rpartition(".")
        source = model.get_submodule(source_path) if source_path else model
        if field in owner._parameters and source_field in source._parameters:
            owner._parameters[field] = source._parameters[source_field]
        elif field in owner._buffers and source_field in source._buffers:
            owner._buffers[field] = source._buffers[source_field]
