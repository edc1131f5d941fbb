"""Layer names: readable, stable across rebuilds, and settable by the user.

NOTE: [Layer names]
Names are given when a model is built (not when a layer is created, as Keras does with global
counters), from the order in which layers are first called: the same code always gives the same
names (``linear``, ``linear_1``, ``conv2d``...). They are the GraphModule's submodule names, so they
are also the ``state_dict`` prefixes. :func:`name` sets a layer's name explicitly.
"""

from __future__ import annotations

import contextlib
import keyword
import re
import sys
import threading
import weakref

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import GraphBuildError

__all__ = ["SUBMODULE_NAMES", "first_free_name", "name", "user_name", "snake_case", "tensor_name", "remember_variable_names", "fixed_paths",
           "fixed_path", "reserved_attribute"]

_USER_NAMES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
# Names given automatically by the first model a layer joined: a layer keeps its name in later
# models (a feature extractor or a head has the same layer names and state_dict keys).
_GIVEN_NAMES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
# Tensors (parameters, constants) used directly in a graph: names given with tg.name, and the names of
# the variables that held them where they were used (see NOTE: [Tensor names]). Keyed by identity:
# a WeakKeyDictionary would compare tensors with ==.
_TENSOR_NAMES = WeakIdKeyDictionary()
_VARIABLE_NAMES = WeakIdKeyDictionary()


def _illegal_identifiers() -> frozenset:
    # Names torch.fx refuses for variables (keywords, builtins, its own globals): it would rename them.
    import builtins

    import torch.fx.graph as fx_graph

    extra = set(getattr(fx_graph, "_illegal_names", {}))
    return frozenset(set(keyword.kwlist) | set(dir(builtins)) | extra | {"self"})


ILLEGAL_NAMES = _illegal_identifiers()


def check_identifier(value, what: str) -> None:
    """Raise a GraphBuildError unless ``value`` can be a name in generated Python code."""
    if not isinstance(value, str) or not value.isidentifier() or keyword.iskeyword(value):
        raise GraphBuildError(f"{what} must be a Python identifier; received {value!r}.")
    if value in ILLEGAL_NAMES:
        raise GraphBuildError(
            f"{what} {value!r} is a Python builtin or keyword, which generated code cannot use as a "
            f"variable; choose another name, e.g. {value + '_'!r} or 'x_{value}'."
        )


def name(module, layer_name: str):
    """Give a layer (or a tensor used directly in the graph) an explicit name; return it.

    The name becomes the submodule name in every model the layer is part of, hence its
    ``state_dict`` prefix and its row in ``summary()``. For an ``nn.Parameter`` or a constant tensor
    that the graph uses directly (``cls_token.expand(B, -1, -1)``, ``x + pos_embed``) it is the
    attribute and ``state_dict`` key, so pretrained weights load without a key map.

    Args:
        module (nn.Module | torch.Tensor): the layer, or the parameter/tensor.
        layer_name (str): a Python identifier, unique within the model.

    Returns:
        ``module`` itself (so it can be called or used inline).

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(4,))
        >>> y = tg.name(nn.Linear(4, 2), "classifier")(x)
        >>> tg.Model(x, y).get_layer("classifier")
        Linear(in_features=4, out_features=2, bias=True)
        >>> bias = tg.name(nn.Parameter(torch.zeros(4)), "shift")
        >>> list(tg.Model(x, x + bias).state_dict())
        ['shift']
    """
    if isinstance(module, torch.Tensor) and not isinstance(module, nn.Module):
        if getattr(module, "_tg_value", None) is not None or getattr(module, "_tg_shadow", None) is not None:
            raise TypeError("tg.name: expected a layer or a parameter/constant tensor; received a symbolic "
                            "tensor (a value the model computes). Name the layer that computes it.")
        check_identifier(layer_name, "tg.name: a tensor name (an attribute and a state_dict key)")
        _TENSOR_NAMES[module] = layer_name
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"tg.name: expected an nn.Module or a tensor; received {type(module).__name__}.")
    check_identifier(layer_name, "tg.name: a layer name (an attribute and a state_dict prefix)")
    _USER_NAMES[module] = layer_name
    return module


def tensor_name(t: torch.Tensor) -> tuple[str | None, bool]:
    """``(name, explicit)``: the tg.name of a tensor used in a graph, else its variable's name."""
    explicit = _TENSOR_NAMES.get(t)
    if explicit is not None:
        return explicit, True
    return _VARIABLE_NAMES.get(t), False


# NOTE: [Tensor names] A parameter or constant used directly in the graph (`x + pos_embed`) has no
# module to be named after. Its default name is the name of the variable that held it where it was
# used: the first frame outside torch and torchgraph, locals then globals, looked up only when a
# real tensor is an argument of a recorded call (rare, and cheap then). A tensor no variable holds
# (`x + torch.tensor(1.0)`) is named `constant`/`parameter` with a counter.
_SKIP_MODULES = ("torch.", "torchgraph.")


def remember_variable_names(tensors: list) -> None:
    """Remember, for tensors that have no name yet, the caller's variable that holds each one."""
    todo = [t for t in tensors if t not in _TENSOR_NAMES and t not in _VARIABLE_NAMES]
    if not todo:
        return
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module not in ("torch", "torchgraph") and not module.startswith(_SKIP_MODULES):
            break
        frame = frame.f_back
    if frame is None:
        return
    for scope in (frame.f_locals, frame.f_globals):
        for var, value in list(scope.items()):
            if isinstance(value, torch.Tensor) and not var.startswith("_") and var.isidentifier() and \
                    var not in ILLEGAL_NAMES:
                for t in todo:
                    if value is t and t not in _VARIABLE_NAMES:
                        _VARIABLE_NAMES[t] = var


def remember_name(module: nn.Module, layer_name: str) -> None:
    """Record ``layer_name`` as the name ``module`` has in a model (e.g. after a copy or a load)."""
    if module not in _USER_NAMES and module not in _GIVEN_NAMES:
        _GIVEN_NAMES[module] = layer_name


def user_name(module: nn.Module) -> str | None:
    return fixed_path(module) or _USER_NAMES.get(module)


# NOTE: [Fixed paths]
# tg.from_module names each layer by its module path ("layer1.0.conv1") and each tensor that a forward
# reads directly (ViT's cls_token) by its state_dict key, so the result's state_dict has exactly the
# original's keys. Those names hold for the tg.Model built inside `fixed_paths` only: they are not
# remembered, and they win over tg.name and earlier models' names. Replay (from_config,
# clone_model) names its constants and its dotted layer paths the same way: one mechanism for every
# name that must come out exactly as stored, with no global state left behind (a tg.name is kept
# for what the user names; see NOTE: [Tensor names]).
_FIXED = threading.local()


@contextlib.contextmanager
def fixed_paths(paths: dict[int, str]):
    """Within the block, the object with ``id`` k (a layer or a tensor) is named ``paths[k]``."""
    saved = getattr(_FIXED, "paths", None)
    _FIXED.paths = paths
    try:
        yield
    finally:
        _FIXED.paths = saved


def fixed_path(obj) -> str | None:
    paths = getattr(_FIXED, "paths", None)
    return paths.get(id(obj)) if paths else None


def snake_case(class_name: str) -> str:
    """``Conv2d`` -> ``conv2d``, ``BatchNorm2d`` -> ``batch_norm2d``, ``GELU`` -> ``gelu``."""
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", class_name).lower()
    s = re.sub(r"[^0-9a-z_]", "_", s).strip("_") or "layer"
    return s if not s[0].isdigit() else f"layer_{s}"


#: Reserved names a top-level submodule may still take: the Model property of that name yields to
#: the submodule (``model.layers`` of ``tg.from_module(LlamaModel)`` is its ModuleList, as on the
#: original; ``_yields_to_submodule`` in model.py).
SUBMODULE_NAMES = frozenset({"inputs", "outputs", "layers"})


def reserved_attribute(what: str, name: str) -> GraphBuildError:
    """The error for a module's own attribute ``name`` that a tg.Model cannot hold under that name."""
    return GraphBuildError(
        f"{what}, the name of an attribute every tg.Model needs (an nn.Module, GraphModule, tg.Model or "
        f"training attribute). Expected a top-level submodule, parameter or buffer name that is not one; "
        f"received '{name}'. Rename that attribute of the module (e.g. self.{name}_ = ...) before recording it.")


def first_free_name(base: str, is_taken, start: int = 0) -> tuple[str, int]:
    """``base``, else ``base_1``, ``base_2``... (from counter ``start``): the first that
    ``is_taken`` refuses not, and its counter."""
    k = start
    while is_taken(name := base if k == 0 else f"{base}_{k}"):
        k += 1
    return name, k


def assign_layer_names(modules: list[nn.Module], reserved: set[str],
                       scopes: dict[int, str] | None = None) -> dict[int, str]:
    """Names for ``modules`` (in first-call order): fixed paths (tg.from_module), user names, then
    names given by an earlier model, then ``<scope>.`` + ``snake_case(class name)`` with a counter.

    ``scopes`` maps ``id(module)`` to the ``tg.scope`` of its first call (``"encoder"``)."""
    names: dict[int, str] = {}
    taken = set(reserved)
    owners: dict[str, nn.Module] = {}
    scopes = scopes or {}
    for m in modules:
        n = fixed_path(m)
        if n is not None:
            top = n.split(".")[0]
            if top in reserved and top not in SUBMODULE_NAMES:
                raise reserved_attribute(f"The submodule '{n}' ({type(m).__name__}) sits under '{top}'", top)
            names[id(m)] = n
            taken.add(n)
    prefixes = {".".join(s.split(".")[:i]) for s in scopes.values() if s
                for i in range(1, s.count(".") + 2)}
    # A fixed path's scope is its module path (tg.from_module): the container is the user's own
    # submodule (LlamaModel.layers), which the model keeps under that name, so only scopes of
    # layers named here can be refused.
    for top in sorted({scopes[id(m)].split(".")[0] for m in modules if id(m) not in names and scopes.get(id(m))}):
        if top in reserved:
            raise GraphBuildError(
                f"tg.scope: the scope name '{top}' is reserved (an nn.Module/GraphModule "
                "attribute or an input name). Choose another scope name.")
    taken |= prefixes
    for m in modules:
        n = None if id(m) in names else _USER_NAMES.get(m)
        if n is None:
            continue
        if n in owners and owners[n] is not m:
            count = sum(1 for mm in modules if user_name(mm) == n)
            raise GraphBuildError(
                f"The layer name '{n}' is used {count} times in this model (by "
                f"{type(owners[n]).__name__} and {type(m).__name__}). Layer names must be unique: "
                "rename one with tg.name(layer, 'other_name')."
            )
        if n in reserved or n in prefixes:
            raise GraphBuildError(
                f"The layer name '{n}' is reserved (an nn.Module/GraphModule attribute, an input "
                "name or a tg.scope name). Choose another name with tg.name(layer, ...)."
            )
        owners[n] = m
        names[id(m)] = n
        taken.add(n)
    for m in modules:
        n = _GIVEN_NAMES.get(m)
        if id(m) not in names and n is not None and n not in taken:
            names[id(m)] = n
            taken.add(n)
    for n in list(names.values()):  # "encoder.linear" makes "encoder" a container, not a layer name
        taken.update(".".join(n.split(".")[:i]) for i in range(1, n.count(".") + 1))
    counters: dict[str, int] = {}
    for m in modules:
        if id(m) in names:
            continue
        prefix = scopes.get(id(m), "")
        base = (prefix + "." if prefix else "") + snake_case(type(m).__name__)
        candidate, k = first_free_name(base, lambda c: c in taken or c in ILLEGAL_NAMES, counters.get(base, 0))
        counters[base] = k + 1
        names[id(m)] = candidate
        taken.add(candidate)
        _GIVEN_NAMES[m] = candidate
    return names
