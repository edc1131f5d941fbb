"""Scopes: where a layer or an operation comes from, for layer names, summary depth and plot clusters.

A scope is a dotted path (``"encoder.block1"``). Every recorded operation remembers the scope it was
recorded in (``node.meta["tg_scope"]`` in the model), which is what ``summary(depth=...)`` and
``plot_model(depth=...)`` group by. Scopes come from two places, one stack per thread:

- ``with tg.scope("encoder"):`` in symbolic code. Layers first called inside are named
  ``encoder.<name>`` (so their ``state_dict`` keys are ``encoder.<name>.weight``, as in a hand-written
  module with an ``encoder`` submodule).
- ``tg.from_module``: each submodule whose forward is looked through (see NOTE: [Transparent modules]
  in ``recording.py``) is a scope named by its module path (``layer1.0``).

Design constraints:

- Nothing is patched: the module path of an operation is found on the Python stack (the innermost
  ``nn.Module._call_impl`` frame of a looked-through module), only while ``tg.from_module`` records.
- Outside ``tg.from_module`` and ``tg.scope`` this costs one attribute read per recorded operation.
"""

from __future__ import annotations

import contextlib
import keyword
import sys
import threading

import torch.nn as nn

from .errors import GraphBuildError

__all__ = ["scope", "current_scope", "looking_through", "transparent_path", "recorded_leaf", "check_scope_name"]

_CALL_IMPL_CODE = nn.Module._call_impl.__code__


class _State(threading.local):
    def __init__(self):
        self.names: list[str] = []                 # tg.scope stack
        self.transparent: dict[int, str] = {}      # id(module) -> module path, while from_module records
        self.leaves: set[int] = set()              # the leaf modules it records as layers
        self.called: set[str] = set()              # paths of the transparent modules seen running
        self.modules: list[nn.Module] = []         # keeps those ids alive and unambiguous


_STATE = _State()


def check_scope_name(name, who: str = "tg.scope") -> str:
    """Raise a GraphBuildError unless ``name`` is a dotted path of Python identifiers."""
    parts = name.split(".") if isinstance(name, str) else [None]
    if not all(isinstance(p, str) and p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        raise GraphBuildError(
            f"{who}: a scope name must be a Python identifier (or several joined by dots); received "
            f"{name!r}. It becomes an attribute of the model and a state_dict prefix, e.g. 'encoder'.")
    return name


@contextlib.contextmanager
def scope(name: str):
    """Group the layers and operations recorded inside: names, summary depth and plot clusters.

    Layers first called inside ``with tg.scope("encoder"):`` are named ``encoder.<name>``: the model
    has an ``encoder`` submodule holding them, so their ``state_dict`` keys read
    ``encoder.linear.weight``, as in a hand-written module. Every operation recorded inside
    (``torch.cat``, ``x + y``...) belongs to the scope too, so ``model.summary(depth=1)`` and
    ``tg.plot_model(model, depth=1)`` show the whole scope as one row or box. Scopes nest
    (``encoder.block1``). A layer given a name with ``tg.name`` keeps that name.

    Args:
        name (str): a Python identifier, or several joined by dots.

    Example:
        >>> import torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(8,))
        >>> with tg.scope("encoder"):
        ...     h = nn.Linear(8, 16)(x).relu()
        >>> model = tg.Model(x, nn.Linear(16, 2)(h))
        >>> list(model.state_dict())
        ['encoder.linear.weight', 'encoder.linear.bias', 'linear.weight', 'linear.bias']
        >>> model.summary(depth=1, print_fn=lambda text: print(text.splitlines()[8]))
        encoder (scope)  (None, 16)        144  Y
    """
    check_scope_name(name)
    _STATE.names.append(name)
    try:
        yield
    finally:
        _STATE.names.pop()


def transparent_path(module: nn.Module) -> str | None:
    """The module path of ``module`` if ``tg.from_module`` is looking through it, else None."""
    return _STATE.transparent.get(id(module)) if _STATE.transparent else None


def recorded_leaf(module: nn.Module) -> bool:
    """Whether ``tg.from_module`` records a call of ``module`` as a layer even on constant inputs."""
    return id(module) in _STATE.leaves


def _innermost_module_path() -> str | None:
    """The innermost looked-through module call on the stack; all of them are noted as called."""
    innermost = None
    f = sys._getframe(2)
    while f is not None:
        if f.f_code is _CALL_IMPL_CODE:
            path = _STATE.transparent.get(id(f.f_locals.get("self")))
            if path is not None:
                if path in _STATE.called and innermost is not None:
                    break  # its callers were noted when it was
                _STATE.called.add(path)
                innermost = path if innermost is None else innermost
        f = f.f_back
    return innermost


def current_scope() -> str:
    """The scope of an operation recorded now: ``tg.scope`` names, then the module path, dotted."""
    names = _STATE.names
    if _STATE.transparent:
        path = _innermost_module_path()
        if path:  # the root's path is ""
            return ".".join([*names, path])
    return ".".join(names) if names else ""


@contextlib.contextmanager
def looking_through(paths: dict[nn.Module, str], leaves: list[nn.Module] = (), called: set[str] | None = None):
    """While active, calls of these modules are transparent: their operations are recorded one by one.

    ``paths`` maps each module to its module path (``""`` for the root); calls of ``leaves`` are
    recorded as layers whatever their arguments; ``called`` collects the paths of the transparent
    modules that ran (an nn.ModuleDict is never called itself). Used by ``tg.from_module``.
    """
    saved = _STATE.transparent, _STATE.leaves, _STATE.modules, _STATE.names, _STATE.called
    _STATE.transparent = {id(m): p for m, p in paths.items()}
    _STATE.leaves = {id(m) for m in leaves}
    _STATE.modules = [*paths, *leaves]
    _STATE.names = []  # the recorded model's scopes start at its root
    _STATE.called = called if called is not None else set()
    try:
        yield
    finally:
        _STATE.transparent, _STATE.leaves, _STATE.modules, _STATE.names, _STATE.called = saved
