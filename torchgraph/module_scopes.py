"""Module scopes: a module called on symbolic tensors becomes one ``call_module`` record.

See NOTE: [Module scopes]. The pieces: :class:`ShadowRun` (our own runs of the module's forward on
each probe), :class:`ScopeMode` (a TorchFunctionMode that is on only while a module call is being
recorded, so that tensors the forward creates without symbolic arguments are seen too), and
:class:`Scope` (the bookkeeping of one module call: the log of run 0, replayed into the interrupted
original forward).
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from . import messages
from .errors import GraphBuildError
from .probing import ProbeContext, is_meta_limitation, to_meta
from .restoring import attribute_snapshot, buffer_snapshot, restore_attributes, undo_buffers
from .scopes import recorded_leaf
from .symbolic import Record, SymbolicInt, SymbolicTensor, Value, _StandIn
from .targets import _METADATA, _NEEDS_DATA, VIEW_OPS, func_name, is_inplace
from .trees import tree_leaves, tree_map

__all__ = ["STATE", "Scope", "ShadowRun", "find_scope", "open_scope", "remove_idle_modes", "remove_mode",
           "replay"]

_CALL_IMPL_CODE = nn.Module._call_impl.__code__
_SCOPE_KEY = "__torchgraph_scope__"

# NOTE: [Module scopes]
# `layer(x)` runs `layer.forward(x)` with x symbolic; torch gives no hook around module calls
# without registering a *global* hook (which would slow every module call in the process). So the
# first operation on a symbolic tensor inside that forward -- a compute op or a metadata read such as
# `x.size(1)` -- finds the module call on the Python stack (the frame of `nn.Module._call_impl`,
# whose locals hold `self`, `args`, `kwargs` and `forward_call`), and:
#   1. re-runs `forward_call` itself on probe 0 and probe 1 (shadow runs): this yields the output
#      structure and shapes, and a log of every operation of probe 0's run;
#   2. records one `call_module`, and turns the objects that run 0 returned into linked symbolic
#      tensors pointing at it;
#   3. answers the interrupted forward's operations from the log, in order ("replay"), so the
#      original call returns exactly the objects of step 2.
# A deterministic forward performs the same operations in the same order both times; a forward that
# does not raises a GraphBuildError naming the module.
#
# Tensors a forward makes without a symbolic argument (`torch.full((1,), 1.0 / x.size(1))`,
# `torch.arange(T)`, `self.cls_token.expand(B, -1, -1)`, `torch.as_tensor(array)`) depend on the sizes
# it read, so they must be followed too: during the shadow runs a ScopeMode is pushed, which sees
# every torch call (torch.from_numpy is the exception: no mode sees it). In a shadow run such a call
# is computed on probes, logged and returned as a shadow ("const" entries); in the original forward
# it is replayed from the log. So inside a module being recorded every tensor is symbolic, and no
# output can silently become a constant. In-place ops on real tensors (BatchNorm's counter) and reads
# of real data (`.item()` on a parameter) stay real (see NOTE: [Hidden mutation] in restoring.py).
# The original forward gets the mode too, from the scope's opening to the end of the call, when its
# log has such calls left to replay.
#
# The scope is identified by a sentinel object stored in that `_call_impl` frame's `kwargs` dict
# (which nothing else reads after the forward has started). No reference to the frame is kept, so
# when the module call returns the frame and its kwargs die, the sentinel's __del__ closes the scope:
# it restores what the shadow runs changed and removes the ScopeMode from the mode stack. The mode
# is thus on only during the module call being recorded: nothing is left on after a build, and
# handwritten modules pay nothing. (A mode cannot remove itself from inside its own handler, where
# torch has stashed it; if the sentinel dies there, or in another thread, the mode is marked idle
# and removed at the next tg.Input / tg.Model.)


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


class ShadowRun:
    """Runs inside a module's forward on probe ``k``: every op computes on probes, returns shadows."""

    def __init__(self, ctx: ProbeContext, log: list | None, roots: dict | None = None):
        self.ctx = ctx
        self.log = log
        self.roots = roots          # id(shadow) -> the input Value it is (a view of); run 0 only
        self.inputs: dict[int, SymbolicTensor] = {}  # id(shadow) -> the shadow of an input (run 0)
        self.mutated: dict[int, Value] = {}

    def execute(self, func, args, kwargs):
        name = func_name(func)
        if name == "__iter__":  # iterate like a tensor: over dim 0, as shadows
            return iter(self.execute(torch.Tensor.unbind, (args[0], 0), {}))
        out, u_args, u_kwargs = self.ctx.run(func, args, kwargs)
        if name in _METADATA:
            if self.log is not None:
                self.log.append(("meta", name, None))
            return out
        originals = {id(u): a for u, a in zip(_flat(u_args, u_kwargs), _flat(args, kwargs))
                     if isinstance(u, torch.Tensor)}

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) in originals:  # in-place ops and identity returns keep the caller's object
                return originals[id(t)]
            return SymbolicTensor(None, shadow=t)

        result = tree_map(wrap, out)
        if self.roots is not None:
            self._track_inputs(name, args, kwargs, result)
        if self.log is not None:
            self.log.append(("op", name, result))
        return result

    def const(self, func, name: str, args, kwargs):
        """A call without symbolic arguments inside the forward: computed on probes, as shadows."""
        out, _, _ = self.ctx.run(func, args, kwargs)
        real = self.ctx.real
        result = tree_map(lambda t: SymbolicTensor(None, shadow=t if real else to_meta(t))
                          if isinstance(t, torch.Tensor) else t, out)
        if self.log is not None:
            self.log.append(("const", name, result))
        return result

    def _track_inputs(self, name, args, kwargs, result):
        """Which inputs the forward mutates in place, directly or through a view (run 0 only)."""
        roots = self.roots
        target = kwargs.get("out") if "out" in kwargs else (args[0] if args else None)
        if is_inplace(name, kwargs) and isinstance(target, SymbolicTensor) and id(target) in roots:
            value = roots[id(target)]
            self.mutated[id(value)] = value
        if name in VIEW_OPS and args and isinstance(args[0], SymbolicTensor) and id(args[0]) in roots:
            value = roots[id(args[0])]
            for _, leaf in tree_leaves(result):
                if isinstance(leaf, SymbolicTensor):
                    roots[id(leaf)] = value


def _flat(args, kwargs):
    return [leaf for _, leaf in tree_leaves((args, kwargs))]


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


def _push(mode: ScopeMode) -> None:
    torch._C._push_on_torch_function_stack(mode)


def remove_mode(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` off this thread's mode stack wherever it is; False if it is not there."""
    n = torch._C._len_torch_function_stack()
    above = []
    found = False
    for _ in range(n):
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            found = True
            break
        above.append(top)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)
    return found


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


# --------------------------------------------------------------------------------------------
# Opening a scope
# --------------------------------------------------------------------------------------------

def _shadow_of(o, ctx: ProbeContext, memo: dict, run: ShadowRun):
    if isinstance(o, SymbolicTensor):
        shadow = memo.get(id(o))
        if shadow is None:
            t = ctx.unwrap(o)
            if t.device.type == "meta":  # a private copy: in-place ops in forward must not touch the probe
                t = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            shadow = memo[id(o)] = SymbolicTensor(None, shadow=t)
            if run.roots is not None and o._tg_value is not None:
                run.roots[id(shadow)] = o._tg_value
                run.inputs[id(shadow)] = shadow
        return shadow
    if isinstance(o, SymbolicInt):
        return o._tg_value.probes[ctx.k]
    return o


def open_scope(frame) -> Scope:
    """Record the module call of ``frame``: shadow runs, one call_module record, a scope to replay."""
    from .recording import link_args

    module = frame.f_locals["self"]
    call_args = frame.f_locals.get("args", ())
    call_kwargs = frame.f_locals.get("kwargs", {})
    forward_call = frame.f_locals["forward_call"]
    problem = messages.precheck(module, call_args)
    if problem:
        raise GraphBuildError(problem)
    bufs, saved = buffer_snapshot(module)
    attrs = attribute_snapshot(module)
    # torch.nn's own leaf layers compute every output from their inputs and make no tensor from sizes
    # that leaves them: they need no ScopeMode, and skipping it keeps a ResNet's build cost down.
    mode = None if _is_torch_leaf(module) else ScopeMode()

    def shadow_run(k: int, real: bool, log):
        ctx = ProbeContext(k, real)
        memo: dict[int, Any] = {}  # the same object passed twice stays one object (`query is key`)
        run = ShadowRun(ctx, log, {} if log is not None else None)
        s_args = tree_map(lambda o: _shadow_of(o, ctx, memo, run), call_args)
        s_kwargs = tree_map(lambda o: _shadow_of(o, ctx, memo, run), call_kwargs)
        previous, STATE.run = STATE.run, run
        if mode is not None:
            _push(mode)
        try:
            return run, forward_call(*s_args, **s_kwargs)
        finally:
            if mode is not None:
                remove_mode(mode)
            STATE.run = previous

    changed: dict = {}
    real = False
    while True:
        log: list = []
        k = 0
        try:
            run0, out0 = shadow_run(0, real, log)
            changed = undo_buffers(bufs, saved)
            k = 1
            _, out1 = shadow_run(1, real, None)
            undo_buffers(bufs, saved)
            break
        except GraphBuildError:
            undo_buffers(bufs, saved)
            restore_attributes(attrs)
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the layer's context below
            undo_buffers(bufs, saved)
            if not real and is_meta_limitation(exc):
                real = True  # NOTE: documented fallback: probe this module with small real tensors
                continue
            inner = messages.inner_failure(module, exc, k, lambda other: shadow_run(other, real, None))
            undo_buffers(bufs, saved)
            restore_attributes(attrs)
            raise GraphBuildError(messages.module_failure(module, call_args, call_kwargs, exc, inner)) from None

    record = Record("call_module", module, link_args(call_args), link_args(call_kwargs))
    record.needs_real_data = real
    if run0.mutated:
        _check_no_shape_change(module, run0)
        record.effect = "mutation"
        for value in run0.mutated.values():
            value.base.add_effect(record)
    if real and not recorded_leaf(module):
        _check_no_lost_call(module, run0, out0, bufs, saved, attrs)
    _link_outputs(module, record, run0, out0, out1)

    def restore():
        with torch.no_grad():
            for i, delta in changed.items():
                m, n, _ = bufs[i]
                cur = m._buffers.get(n)
                if delta is not None and cur is not None and cur.shape == delta.shape:
                    cur.sub_(delta)
                elif cur is not None and cur.shape == saved[i].shape:
                    cur.copy_(saved[i])

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
        _push(mode)
    if type(call_kwargs) is dict:
        call_kwargs[_SCOPE_KEY] = sentinel
    return scope


def _check_no_lost_call(module, run0: ShadowRun, out0, bufs, saved, attrs) -> None:
    """NOTE: [Lost calls] A module probed with real data (its forward reads the data) that returns
    its input object unchanged on that data (`if x.sum() > 0: return x`) hands the interrupted
    original call its own input back: the caller never sees the recorded call, and the model would
    skip the module whatever the data at run time. (tg.from_module reports its own leaves.)"""
    for path, leaf in tree_leaves(out0):
        if isinstance(leaf, SymbolicTensor) and id(leaf) in run0.inputs:
            undo_buffers(bufs, saved)
            restore_attributes(attrs)
            raise GraphBuildError(messages.lost_call(module, path))


def _is_torch_leaf(module: nn.Module) -> bool:
    return not module._modules and type(module).__module__.startswith("torch.nn.modules.")


def _link_outputs(module, record: Record, run0: ShadowRun, out0, out1) -> None:
    leaves1 = dict(tree_leaves(out1))
    for path, leaf in tree_leaves(out0):
        other = leaves1.get(path)
        if not isinstance(leaf, SymbolicTensor):
            if isinstance(leaf, torch.Tensor) and leaf is not other:
                left_torch = any(kind == "op" and name in ("numpy", "tolist", "__array__")
                                 for kind, name, _ in run0.log or ())
                raise GraphBuildError(messages.untracked_output(module, path, left_torch))
            if isinstance(leaf, (int, float)) and not isinstance(other, torch.Tensor) and other != leaf:
                raise GraphBuildError(messages.dynamic_number_output(module, path))
            continue
        if leaf._tg_value is not None:  # the module returned a symbolic value from outside its inputs
            continue
        p1 = _as_meta(other._tg_shadow if isinstance(other, SymbolicTensor) else other)
        value = Value(record, path, (_as_meta(leaf._tg_shadow), p1))
        source = run0.roots.get(id(leaf)) if run0.roots else None
        if source is not None:  # the module returned (a view of) one of its inputs
            value.base = source.base
        leaf._tg_value = leaf._tg_origin = value
        leaf._tg_shadow = None
    record.out = tree_map(lambda o: o._tg_value if isinstance(o, (SymbolicTensor, SymbolicInt))
                          else (None if isinstance(o, torch.Tensor) else o), out0)


def _check_no_shape_change(module, run0: ShadowRun) -> None:
    """A shape-changing in-place op on an input (``x.unsqueeze_(0)``) would make later uses of it wrong."""
    for shadow_id, shadow in run0.inputs.items():
        value = run0.roots.get(shadow_id)
        if value is None or id(value) not in run0.mutated or shadow._tg_shadow is None:
            continue
        if tuple(shadow._tg_shadow.shape) != tuple(value.probes[0].shape):
            raise GraphBuildError(messages.input_reshaped_in_place(module, value))


def _as_meta(t):
    if t is None:
        raise GraphBuildError("a module returned outputs of a different structure on its two probe runs")
    return t if t.device.type == "meta" else to_meta(t)


# --------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------

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
