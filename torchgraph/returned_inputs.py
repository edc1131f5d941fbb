"""Layer calls that return their input object: still a call in the graph, whose output the caller uses.

NOTE: [Returned inputs] A layer's forward may hand back the very object it was given: stochastic depth
when not training (timm's ``DropPath``, torchvision's ``StochasticDepth``, HuggingFace's
``XxxDropPath``: ``if drop_prob == 0. or not training: return x``), or a data-dependent branch on the
data it was probed with (``if x.mean() > 0: ... else: return x``). The call is recorded on the first
operation its forward makes on a symbolic tensor (NOTE: [Module scopes] in module_scopes.py), and
``return x`` is no operation: the caller got its own symbolic input back, so the layer vanished from
the recording (no operation at all: drop path in eval mode), or its recorded call was unreachable
(the data-dependent branch). The graph would then skip the layer whatever the mode or the data.

So while ``tg.from_module`` records, each layer it keeps opaque gets a forward hook for the recording
only (except torch.nn's own layers without submodules, which compute their outputs, or are
``nn.Identity``, which a graph may drop exactly). When the call returns one of its symbolic inputs, the hook
records the call if nothing did yet (shadow runs on the probes, as for any layer call) and returns,
at that output's place, a new symbolic tensor linked to the call's output. At run time the graph
calls the real module, which returns its input in eval mode and the dropped path in train mode,
exactly as eager. Aliasing stays eager's: the output value has the input's base, so an in-place op
on it (``result += input`` in torchvision's MBConv) is ordered as a change of the input, and at run
time it is the same tensor object again.

In hand-written symbolic code (``y = drop_path(x)`` with a ``DropPath`` already in eval mode) the
layer's call is not known before its forward runs, and torch picks its hook-free fast path before
that, so a per-layer hook cannot be added then. There a process-wide forward hook
(``register_module_forward_hook``) does the same while, and only while, some thread builds (the
build hold of NOTE: [finfo of a stand-in] in type_info.py: from ``tg.Input`` to ``tg.Model``, or
until no value of the build is left, NOTE: [End of a build] in builds.py); it
acts only in the building thread, and leaves ``tg.from_module``'s recording to the hooks above (a
module it looks through may return its input and is no layer). A layer probed with real data (its
forward reads the data, or draws random numbers to choose a branch: a LayerDrop that skipped every
layer) that returns its input is linked the same way, so it stays a call that decides at run time
(:func:`links_returned_inputs`; NOTE: [Lost calls] in module_scopes.py).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import threading

import torch.nn as nn
import torch.nn.modules.module as module_hooks
from torch.nn.modules.module import register_module_forward_hook

from .builds import note_failure
from .errors import GraphBuildError
from .scope_replay import STATE, find_scope
from .symbolic import SymbolicTensor
from .trees import tree_leaves

__all__ = ["linking_returned_inputs", "links_returned_inputs", "watch_builds", "unwatch_builds"]

_CALL_IMPL_CODE = nn.Module._call_impl.__code__


def _needs_hook(module: nn.Module) -> bool:
    """torch.nn's own layers without submodules compute their outputs (or are nn.Identity, exact to skip)."""
    return bool(module._modules) or not type(module).__module__.startswith("torch.nn.modules.")


class _Recording(threading.local):
    from_module = False  # this thread's tg.from_module recording hooks its own layers


_RECORDING = _Recording()
_WATCH = None  # the process-wide hook's handle while some thread builds


@contextlib.contextmanager
def linking_returned_inputs(layers):
    """While active, a call of one of ``layers`` that returns a symbolic input returns a linked output instead."""
    handles = [m.register_forward_hook(_link_returned_inputs, with_kwargs=True)
               for m in layers if _needs_hook(m)]
    outer, _RECORDING.from_module = _RECORDING.from_module, True
    try:
        yield
    finally:
        _RECORDING.from_module = outer
        for handle in handles:
            handle.remove()


def watch_builds() -> None:
    """Some thread started building: hook every layer call (NOTE: [Returned inputs]). Called under the
    build hold's lock when the first hold is taken."""
    global _WATCH
    if _WATCH is None:
        _WATCH = register_module_forward_hook(_link_in_hand_written_builds, with_kwargs=True)


def unwatch_builds() -> None:
    """No thread builds any more: remove the process-wide hook (layer calls take torch's fast path again)."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.remove()
        # NOTE: [Global hooks with kwargs] torch's handle removes the hook but not its with_kwargs
        # mark (torch 2.11-2.14: _global_forward_hooks_with_kwargs is not among the handle's dicts);
        # a stale mark makes torch.compile warn about global hooks for the rest of the process.
        getattr(module_hooks, "_global_forward_hooks_with_kwargs", {}).pop(_WATCH.id, None)
        _WATCH = None


def links_returned_inputs(module: nn.Module) -> bool:
    """Whether this thread's hand-written build links the output of a ``module`` call that returns one
    of its symbolic inputs to the call (the process-wide hook below), so the call stays in the graph."""
    from .type_info import building

    return _WATCH is not None and not _RECORDING.from_module and building() and _needs_hook(module)


def _link_in_hand_written_builds(module, args, kwargs, output):
    from .type_info import building

    if _RECORDING.from_module or not building() or not _needs_hook(module):
        return None
    try:
        return _link_returned_inputs(module, args, kwargs, output)
    except GraphBuildError as exc:
        note_failure(exc)  # an interactive session's failed build (NOTE: [End of a build] in builds.py)
        raise


def _link_returned_inputs(module, args, kwargs, output):
    if STATE.run is not None:
        return None  # inside a shadow run of an outer layer: its own recording covers this call
    inputs = {id(leaf) for _, leaf in tree_leaves((args, kwargs))
              if isinstance(leaf, SymbolicTensor) and leaf._tg_value is not None}
    returned = [path for path, leaf in tree_leaves(output) if id(leaf) in inputs]
    if not returned:
        return None
    from .module_scopes import open_scope
    from .recording import _find_module_call

    frame = sys._getframe(1)  # torch calls hooks from a closure inside nn.Module._call_impl
    while frame is not None and frame.f_code is not _CALL_IMPL_CODE:
        frame = frame.f_back
    if frame is None or frame.f_locals.get("self") is not module:
        return None
    if _find_module_call(2)[0] is not frame:
        return None  # called inside another layer's forward: part of that layer's call
    scope = find_scope(frame)
    if scope is None:  # its forward made no operation on a symbolic tensor: record the call now
        scope = open_scope(frame)
    return _replace(output, {path: SymbolicTensor(_at(scope.record.out, path)) for path in returned})


def _at(obj, path: tuple):
    for key in path:
        obj = obj[key]
    return obj


def _replace(obj, replacements: dict, path: tuple = ()):
    """``obj`` with the leaves at ``replacements``' paths replaced, containers keeping their types."""
    if path in replacements:
        return replacements[path]
    if not any(p[:len(path)] == path for p in replacements):
        return obj
    if isinstance(obj, (tuple, list)):
        items = [_replace(o, replacements, path + (i,)) for i, o in enumerate(obj)]
        if hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items)
    new = {k: _replace(v, replacements, path + (k,)) for k, v in obj.items()}
    return _copy_with(obj, new.items())


def _copy_with(obj, items):
    out = copy.copy(obj)
    for key, value in items:
        out[key] = value
    return out
