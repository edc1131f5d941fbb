"""Scope replay: an open module scope answers the interrupted original forward from run 0's log.

After the shadow runs of a module call (NOTE: [Module scopes] in module_scopes.py), a :class:`Scope`
holds run 0's log. The original forward, interrupted at the first of its calls that reached torchgraph
(NOTE: [Opening call]), continues; its calls are answered from the log in order (:func:`replay`), so
the call returns exactly the objects that were linked to the recorded ``call_module``. A :class:`ScopeMode` is
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
from .trees import tree_leaves

__all__ = ["STATE", "Scope", "ScopeMode", "call_kind", "find_scope", "remove_idle_modes", "replay", "skip_metadata",
           "start_replay"]

_CALL_IMPL_CODE = nn.Module._call_impl.__code__
_SCOPE_KEY = "__torchgraph_scope__"


class _State(threading.local):
    """Per thread: models can be built in several threads at once."""

    def __init__(self):
        self.run: ShadowRun | None = None
        self.scopes: list[Scope] = []


STATE = _State()


# NOTE: [Call kinds] A module call recorded as one layer runs its forward three times: the shadow runs
# on probe 0 and probe 1, then the original call, whose torch calls are answered from run 0's log in
# order. Up to three parties can see a call first, depending on the order of the torch function mode
# stack at that moment: a SymbolicTensor's own __torch_function__, tg.from_module's RecordingMode
# (which routes calls on the module's parameters and buffers to the recording, NOTE: [State ops] in
# tracing.py) and the call's ScopeMode (on top in the shadow runs, possibly below the RecordingMode in
# the original call). The log can only be replayed if all of them sort each call alike, so they all
# ask call_kind(). A call on a buffer alone (`self.scale.clone()`, `self.bias[:, :, :T, :T]`) is a
# "const" like `torch.arange(T)`: inside a layer it is part of the layer's opaque call, which reads the
# buffer at run time (only at the top level of tg.from_module is it recorded as an operation).


def call_kind(name: str, args, kwargs) -> str:
    """How a torch call inside a module call recorded as one layer is answered (NOTE: [Call kinds]).

    ``"op"``: it takes a symbolic tensor (``x + 1``). ``"real"``: a metadata or data read or an in-place
    change of a real tensor (``self.steps.add_(1)``), which runs for real every time (NOTE: [Hidden
    mutation] in restoring.py). ``"const"``: any other call (``torch.arange(T)``, ``self.scale.clone()``,
    ``torch.arange(n)`` with a dynamic size ``n``): computed on probes and logged in the shadow runs,
    replayed in the original call.
    """
    if _has_symbolic_tensor(args) or _has_symbolic_tensor(kwargs):
        return "op"
    if name in _METADATA or name in _NEEDS_DATA or is_inplace(name, kwargs):
        return "real"
    return "const"


def _has_symbolic_tensor(obj) -> bool:
    t = type(obj)
    if t is tuple or t is list:
        return any(_has_symbolic_tensor(o) for o in obj)
    if t is dict:
        return any(_has_symbolic_tensor(o) for o in obj.values())
    return isinstance(obj, SymbolicTensor)  # a slice holds sizes, never tensors


class ScopeMode(TorchFunctionMode):
    """On while a module call is recorded: calls without symbolic tensors are logged or replayed."""

    def __init__(self):
        super().__init__()
        self.scope: Scope | None = None   # set for the original forward's replay
        self.idle = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.idle:
            return func(*args, **kwargs)
        name = func_name(func)
        if call_kind(name, args, kwargs) != "const":  # an "op" is answered by the tensor's __torch_function__
            return func(*args, **kwargs)
        run = STATE.run
        if run is not None:
            return run.const(func, name, args, kwargs)
        scope = self.scope
        if scope is not None and not scope.closed and scope.on_stack():
            return replay(scope, "const", name, args, kwargs)
        return func(*args, **kwargs)


def remove_idle_modes() -> None:
    """Close scopes whose module call raised, and remove scope modes that could not remove themselves
    (call only outside torch functions: at tg.Input, tg.Model)."""
    for scope in [s for s in STATE.scopes if not s.on_stack()]:
        # NOTE: [Scopes of a call that raised] A module call whose forward raised during its replay
        # (its own bug, or "did different operations when it was called again") never returns: its
        # frame, and the sentinel that closes its scope, live as long as the exception's traceback
        # does (sys.last_traceback in a REPL, until the next error). Such a scope is no longer on
        # the stack; closing it here puts back the module's buffers and attributes and takes its
        # ScopeMode off at the next build step rather than whenever the traceback dies.
        scope.close()
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

    __slots__ = ("module", "log", "other_log", "input_dims", "cursor", "restore", "mode", "owner", "thread",
                 "attrs", "sentinel", "closed", "record")

    def __init__(self, module, log, restore, attrs):
        self.module = module
        self.log = log
        # For error messages: run 1's log (which dims are dynamic), and id(run 0's shadow of an input)
        # -> (that shadow, the input's dims).
        self.other_log: list = []
        self.input_dims: dict[int, tuple] = {}
        self.cursor = 0
        self.restore = restore
        self.attrs = attrs
        self.mode: ScopeMode | None = None
        self.owner = STATE.scopes
        self.thread = threading.get_ident()
        self.sentinel = _dead   # a weak reference: the sentinel must die with the module call
        self.closed = False
        self.record = None      # the call_module record (set by module_scopes.open_scope)

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


def start_replay(module: nn.Module, log: list, restore, attrs, mode: ScopeMode | None, call_kwargs,
                 opener: tuple | None = None, prefix: int = 0) -> Scope:
    """Open the scope that answers the original forward of ``module``'s call from run 0's ``log``.

    ``restore`` undoes the shadow runs' buffer changes when the replay is over; ``attrs`` is the
    attribute snapshot to restore when the scope closes; ``mode`` (None for torch.nn's own leaf
    layers) is pushed when the log has calls without symbolic arguments left to replay. The scope's
    sentinel goes into ``call_kwargs``, the module call's own kwargs dict. ``opener`` is the call of
    the original forward that opened the scope, ``(kind, name, args, kwargs)`` (None for a metadata
    read); the log starts with ``prefix`` entries that do not depend on the call's inputs (NOTE:
    [Independent calls] in shadow_runs.py).
    """
    scope = Scope(module, log, restore, attrs)
    sentinel = _Sentinel(scope)
    scope.sentinel = weakref.ref(sentinel)
    STATE.scopes.append(scope)
    scope.cursor = _opening_entry(log, prefix, opener)
    if mode is not None and any(_replayed_without_symbolic(entry) for entry in log[scope.cursor:]):
        mode.scope = scope
        scope.mode = mode
        push_mode(mode)
    if type(call_kwargs) is dict:
        call_kwargs[_SCOPE_KEY] = sentinel
    return scope


def _opening_entry(log: list, prefix: int, opener: tuple | None) -> int:
    """Where in run 0's log the original forward is when its scope opens.

    NOTE: [Opening call] The original forward already ran, for real, the calls it made before the
    call that opened its scope: the log's first ``prefix`` entries, which do not depend on the call's
    inputs (nothing routed them to torchgraph), unless the opening call is one of them. That happens
    under tg.from_module, whose RecordingMode routes calls on the module's parameters and buffers
    (`self.inv_freq[None, :, None]`) and calls with a dynamic size (`torch.arange(n)`, n = x.size(1)
    given to the forward, a plain int in the shadow runs): then the opening call is the first
    logged "const" with its name and arguments.
    """
    if opener is not None and opener[0] == "const":
        for i in range(prefix):
            if log[i][0] == "const" and log[i][1] == opener[1] and _same_arguments(log[i][3], opener[2:]):
                return i
    return prefix


def _same_arguments(logged, current) -> bool:
    """Whether run 0's arguments of a call are those of the original call.

    A real tensor there (a parameter, a buffer) must be the same object; a shadow stands for a tensor
    of its shape, which the original forward may have made for real; a dynamic size is its probe 0.
    """
    a, b = list(tree_leaves(logged)), list(tree_leaves(current))
    if len(a) != len(b):
        return False
    for (path_a, x), (path_b, y) in zip(a, b):
        if path_a != path_b:
            return False
        if isinstance(y, SymbolicInt):
            y = y._tg_value.probes[0]
        if isinstance(x, torch.Tensor) and not isinstance(x, SymbolicTensor):
            if x is not y:
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or \
                    messages.tensor_shape(x) != messages.tensor_shape(y):
                return False
        elif isinstance(y, _StandIn):
            continue  # a device/dtype read outside the module: the shadow runs saw its value
        elif type(x) is not type(y) or x != y:
            return False
    return True


def replay(scope: Scope, kind: str, name: str, args=(), kwargs=None):
    """The next logged result, for the original forward's next call (``kind`` "op" or "const")."""
    log = scope.log
    while scope.cursor < len(log) and log[scope.cursor][0] == "meta":
        scope.cursor += 1
    entry = log[scope.cursor] if scope.cursor < len(log) else None
    if entry is None or entry[1] != name or not (
            entry[0] == kind or (kind == "const" and _replayed_without_symbolic(entry))):
        scope.close()
        raise GraphBuildError(_mismatch(scope, (kind, name, args, kwargs or {})))
    result = entry[2]
    scope.cursor += 1
    if all(later[0] == "meta" for later in log[scope.cursor:]):  # its last operation: undo hidden mutations now
        scope.finish_replay()
    return result


def _replayed_without_symbolic(entry: tuple) -> bool:
    """Whether the original forward may make this call without a symbolic tensor: a "const", or an
    "op" that does not depend on the inputs (NOTE: [Independent calls] in shadow_runs.py)."""
    return entry[0] == "const" or (entry[0] == "op" and entry[4])


def _mismatch(scope: Scope, received: tuple) -> str:
    """The error for a call of the original forward that is not the next one in run 0's log."""
    log, other = scope.log, scope.other_log
    known: dict[int, object] = {id(t): f"parameter '{n}'" for n, t in scope.module.named_parameters()}
    known.update((id(t), f"buffer '{n}'") for n, t in scope.module.named_buffers())
    known.update((i, dims) for i, (_, dims) in scope.input_dims.items())
    # id(a shadow of run 0) -> its dims: None where run 1's size differs
    for i, entry in enumerate(log):
        twin = other[i] if i < len(other) and other[i][:2] == entry[:2] else None
        if twin is None:
            continue
        for part in (2, 3):  # its result and its arguments
            twin_leaves = dict(tree_leaves(twin[part]))
            for path, t in tree_leaves(entry[part]):
                u = twin_leaves.get(path)
                if isinstance(t, torch.Tensor) and isinstance(u, torch.Tensor):
                    s0, s1 = messages.tensor_shape(t), messages.tensor_shape(u)
                    if len(s0) == len(s1) and id(t) not in known:
                        known[id(t)] = tuple(a if a == b else None for a, b in zip(s0, s1))

    position = 1 + sum(1 for entry in log[:scope.cursor] if entry[0] != "meta")
    expected = None
    if scope.cursor < len(log):
        kind, name, _, (args, kwargs), _ = log[scope.cursor]
        expected = (kind, name, args, kwargs)
    return messages.replay_mismatch(scope.module, position, expected, received, known)


def skip_metadata(scope: Scope, name: str) -> None:
    """A metadata read in the original forward: step over run 0's record of it."""
    log = scope.log
    if scope.cursor < len(log) and log[scope.cursor][0] == "meta" and log[scope.cursor][1] == name:
        scope.cursor += 1
