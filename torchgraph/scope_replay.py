"""Scope replay: an open module scope answers the interrupted original forward from run 0's log.

After the shadow runs of a module call (NOTE: [Module scopes] in module_scopes.py), a :class:`Scope`
holds run 0's log. The original forward, interrupted at its first operation on a symbolic tensor,
continues; each of its operations is answered from the log in order (:func:`replay`), so the call
returns exactly the objects that were linked to the recorded ``call_module``. A :class:`ScopeMode` is
on meanwhile when the forward makes tensors without symbolic arguments. A sentinel stored in the call's
``kwargs`` dict closes the scope when the call ends. (Not to be confused with ``replay.py``, which
rebuilds a whole model from a config.)
"""

from __future__ import annotations

import sys
import threading
import weakref

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from . import messages
from .errors import GraphBuildError
from .mode_stack import push_mode, remove_mode
from .restoring import restore_attributes
from .shadow_runs import ShadowRun
from .symbolic import SymbolicInt, SymbolicTensor, _StandIn
from .targets import _METADATA, _NEEDS_DATA, func_name, is_inplace

__all__ = ["STATE", "Scope", "ScopeMode", "find_scope", "remove_idle_modes", "replay", "skip_metadata",
           "start_replay"]

_CALL_IMPL_CODE = nn.Module._call_impl.__code__
_SCOPE_KEY = "__torchgraph_scope__"


class _State(threading.local):
    """Per thread: models can be built in several threads at once."""

    def __init__(self):
        self.run: ShadowRun | None = None
        self.scopes: list[Scope] = []


STATE = _State()


def has_symbolic(obj) -> bool:
    """Whether an argument tree holds a symbolic tensor, size or device/dtype stand-in."""
    t = type(obj)
    if t is tuple or t is list:
        return any(has_symbolic(o) for o in obj)
    if t is dict:
        return any(has_symbolic(o) for o in obj.values())
    if t is slice:
        return has_symbolic(obj.start) or has_symbolic(obj.stop) or has_symbolic(obj.step)
    return isinstance(obj, (SymbolicTensor, SymbolicInt, _StandIn))


class ScopeMode(TorchFunctionMode):
    """On while a module call is recorded: calls without symbolic arguments are logged or replayed."""

    def __init__(self):
        super().__init__()
        self.scope: Scope | None = None   # set for the original forward's replay
        self.idle = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.idle or has_symbolic(args) or has_symbolic(kwargs):
            return func(*args, **kwargs)
        name = func_name(func)
        if name in _METADATA or name in _NEEDS_DATA or is_inplace(name, kwargs):
            return func(*args, **kwargs)  # reads and hidden mutations of real tensors stay real
        run = STATE.run
        if run is not None:
            return run.const(func, name, args, kwargs)
        scope = self.scope
        if scope is not None and not scope.closed and scope.on_stack():
            return replay(scope, "const", name)
        return func(*args, **kwargs)


def remove_idle_modes() -> None:
    """Remove scope modes that could not remove themselves (call only outside torch functions)."""
    n = torch._C._len_torch_function_stack()
    if not n:
        return
    stack = [torch._C._get_function_stack_at(i) for i in range(n)]
    for mode in stack:
        if isinstance(mode, ScopeMode) and mode.idle:
            remove_mode(mode)


class _Sentinel:
    """Stored in the module call's kwargs dict: it dies with the call and then closes the scope."""

    __slots__ = ("scope", "__weakref__")

    def __init__(self, scope: "Scope"):
        self.scope = scope

    def __del__(self):
        scope = self.scope
        if scope is not None:
            self.scope = None
            scope.close()


class Scope:
    """One module call being recorded: its log (from run 0) and how far the original forward is."""

    __slots__ = ("module", "log", "cursor", "restore", "mode", "owner", "thread", "attrs", "sentinel",
                 "closed")

    def __init__(self, module, log, restore, attrs):
        self.module = module
        self.log = log
        self.cursor = 0
        self.restore = restore
        self.attrs = attrs
        self.mode: ScopeMode | None = None
        self.owner = STATE.scopes
        self.thread = threading.get_ident()
        self.sentinel = _dead   # a weak reference: the sentinel must die with the module call
        self.closed = False

    def on_stack(self) -> bool:
        sentinel = self.sentinel()
        if sentinel is None:
            return False
        f = sys._getframe(1)
        while f is not None:
            if f.f_code is _CALL_IMPL_CODE and _sentinel_of(f) is sentinel:
                return True
            f = f.f_back
        return False

    def finish_replay(self) -> None:
        # The restoring is ours, not the forward's: the mode must not log or replay its calls (under
        # tg.from_module's RecordingMode it would otherwise see restore's torch.no_grad()).
        mode, idle = self.mode, None
        if mode is not None:
            idle, mode.idle = mode.idle, True
        try:
            self.restore()
        finally:
            if mode is not None:
                mode.idle = idle
        self.restore = _noop

    def close(self) -> None:
        """The module call is over (or abandoned): undo what building changed, drop the mode."""
        if self.closed:
            return
        self.closed = True
        mode = self.mode
        if mode is not None:
            mode.idle = True
            if threading.get_ident() == self.thread:
                remove_mode(mode)
        if self in self.owner:
            self.owner.remove(self)
        self.finish_replay()
        restore_attributes(self.attrs)


def _noop() -> None:
    pass


def _dead():
    return None


def _sentinel_of(frame):
    kwargs = frame.f_locals.get("kwargs")
    return kwargs.get(_SCOPE_KEY) if type(kwargs) is dict else None


def find_scope(frame) -> Scope | None:
    """The scope recording the module call of ``frame`` (a ``_call_impl`` frame), if it is open."""
    sentinel = _sentinel_of(frame)
    return None if sentinel is None else sentinel.scope


def start_replay(module: nn.Module, log: list, restore, attrs, mode: ScopeMode | None, call_kwargs) -> Scope:
    """Open the scope that answers the original forward of ``module``'s call from run 0's ``log``.

    ``restore`` undoes the shadow runs' buffer changes when the replay is over; ``attrs`` is the
    attribute snapshot to restore when the scope closes; ``mode`` (None for torch.nn's own leaf
    layers) is pushed when the log has calls without symbolic arguments left to replay. The scope's
    sentinel goes into ``call_kwargs``, the module call's own kwargs dict.
    """
    scope = Scope(module, log, restore, attrs)
    sentinel = _Sentinel(scope)
    scope.sentinel = weakref.ref(sentinel)
    STATE.scopes.append(scope)
    # The original forward already ran, for real, the calls it made before its first symbolic one.
    while scope.cursor < len(log) and log[scope.cursor][0] == "const":
        scope.cursor += 1
    if mode is not None and any(kind == "const" for kind, _, _ in log[scope.cursor:]):
        mode.scope = scope
        scope.mode = mode
        push_mode(mode)
    if type(call_kwargs) is dict:
        call_kwargs[_SCOPE_KEY] = sentinel
    return scope


def replay(scope: Scope, kind: str, name: str):
    """The next logged result, for the original forward's next call (``kind`` "op" or "const")."""
    log = scope.log
    while scope.cursor < len(log) and log[scope.cursor][0] == "meta":
        scope.cursor += 1
    if scope.cursor >= len(log):
        scope.close()
        raise GraphBuildError(
            f"{messages.describe_module(scope.module)}: its forward ran more tensor operations than on "
            f"its probe run (extra '{name}'). torchgraph needs a forward that does the same operations "
            "each time it is called (no random control flow at build time)."
        )
    logged_kind, logged, result = log[scope.cursor]
    scope.cursor += 1
    if logged != name or logged_kind != kind:
        scope.close()
        raise GraphBuildError(
            f"{messages.describe_module(scope.module)}: its forward did '{name}' where its probe run did "
            f"'{logged}'. torchgraph needs a forward that does the same operations each time it is called."
        )
    if all(k == "meta" for k, _, _ in log[scope.cursor:]):  # its last operation: undo hidden mutations now
        scope.finish_replay()
    return result


def skip_metadata(scope: Scope, name: str) -> None:
    """A metadata read in the original forward: step over run 0's record of it."""
    log = scope.log
    if scope.cursor < len(log) and log[scope.cursor][0] == "meta" and log[scope.cursor][1] == name:
        scope.cursor += 1
