"""Recording: turns operations on symbolic tensors into :class:`~torchgraph.symbolic.Record` s.

Every operation on a :class:`SymbolicTensor` arrives in :func:`dispatch` (via ``__torch_function__``).
Three situations, told apart without patching anything:

1. **Top level** (the user's own code calls ``F.relu(x)``, ``x + y``, ``x.view(...)``): record a
   function or method call, propagate the two probes, return new symbolic values.
2. **Inside a module call** (``layer(x)`` runs ``layer.forward`` with symbolic inputs): the whole call
   must become *one* ``call_module`` record. ``nn.Module.__call__`` gives no hook, so we find the
   call on the Python stack (see NOTE: [Module scopes]).
3. **Inside a shadow run** (our own re-run of a module's forward on probes): compute on the probes.

Design constraints:

- No global state is changed between builds: no monkeypatching, no global hooks, no modes left on.
  Handwritten modules pay nothing for torchgraph being imported.
- Building never changes a parameter or a buffer (probes are meta copies; see NOTE: [Hidden mutation]).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch
import torch.nn as nn

from . import messages
from .errors import GraphBuildError
from .targets import (_DUNDER_OPS, _METADATA, _NEEDS_DATA, _is_property, _is_tensor_method, _resolvable,
                    func_name, is_inplace, setitem)
from .probing import ProbeContext, is_meta_limitation, to_meta
from .scopes import recorded_leaf, transparent_path
from .symbolic import Record, SymbolicInt, SymbolicShape, SymbolicTensor, Value
from .trees import map_with_paths, tree_leaves, tree_map

__all__ = ["close_finished_scopes", "dispatch", "record_int_op"]

def _any_symbolic(obj, linked_only: bool) -> bool:
    for _, leaf in tree_leaves(obj):
        if isinstance(leaf, SymbolicTensor) and (leaf._tg_value is not None or not linked_only):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Shadow runs: a module's forward, re-run by us on one probe
# --------------------------------------------------------------------------------------------

class ShadowRun:
    """Runs inside a module's forward on probe ``k``: every op computes on probes, returns shadows."""

    def __init__(self, ctx: ProbeContext, log: list | None):
        self.ctx = ctx
        self.log = log

    def execute(self, func, args, kwargs):
        name = func_name(func)
        if name == "__iter__":  # iterate like a tensor: over dim 0, as shadows
            return iter(self.execute(torch.Tensor.unbind, (args[0], 0), {}))
        out, u_args, u_kwargs = self.ctx.run(func, args, kwargs)
        if name in _METADATA:
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
        if self.log is not None:
            self.log.append((name, result))
        return result


def _flat(args, kwargs):
    return [leaf for _, leaf in tree_leaves((args, kwargs))]


# --------------------------------------------------------------------------------------------
# Module scopes
# --------------------------------------------------------------------------------------------

# NOTE: [Module scopes]
# `layer(x)` runs `layer.forward(x)` with x symbolic; torch gives no hook around module calls
# without registering a *global* hook (which would slow every module call in the process). So the
# first operation on a symbolic tensor inside that forward finds the module call on the Python stack
# (the frame of `nn.Module._call_impl`, whose locals hold `self`, `args` and `forward_call`), and:
#   1. re-runs `forward_call` itself on probe 0 and probe 1 (shadow runs): this yields the output
#      structure and shapes, and a log of every compute op of probe 0's run;
#   2. records one `call_module`, and turns the objects that run 0 returned into linked symbolic
#      tensors pointing at it;
#   3. answers the interrupted forward's operations from the log, in order ("replay"), so the
#      original call returns exactly the objects of step 2.
# A deterministic forward performs the same compute ops in the same order both times; a forward that
# does not raises a GraphBuildError naming the module.
#
# NOTE: [Hidden mutation]
# Ops on probes never touch real tensors (they run on meta copies). But a forward can mutate its
# own state without involving the input at all -- BatchNorm's `num_batches_tracked.add_(1)` -- and
# the interrupted original forward really does run. So buffers are snapshotted when a scope opens,
# shadow runs are undone, and once the module call is done, integer buffers that a shadow run
# showed to change are stepped back by that change and other changed buffers restored. This happens
# when the original forward performs its last compute op (BatchNorm mutates before its first).

#
# NOTE: [Transparent modules]
# tg.from_module records an existing module down to its leaf modules: it marks every other submodule
# (and the root) as transparent while it calls the root (scopes.looking_through). A transparent
# module's `_call_impl` frame is skipped here, so the operations of its forward are recorded one by
# one, as if written at the top level, and the first non-transparent module call on the stack (a
# leaf: Conv2d, BatchNorm2d...) becomes the call_module record as above, even when called on
# constants only (`self.wpe(torch.arange(16))`: its output depends on its weights). Which module
# path an operation comes from is read from the same frames (scopes.current_scope).

_CALL_IMPL_CODE = nn.Module._call_impl.__code__


class _Scope:
    __slots__ = ("frame", "module", "log", "cursor", "restore")

    def __init__(self, frame, module, log, restore):
        self.frame = frame
        self.module = module
        self.log = log
        self.cursor = 0
        self.restore = restore


class _State(threading.local):
    """Per thread: models can be built in several threads at once."""

    def __init__(self):
        self.run: ShadowRun | None = None
        self.scopes: list[_Scope] = []


STATE = _State()


def _find_module_call(start_depth: int = 2):
    """The outermost ``_call_impl`` frame on the stack whose arguments hold linked symbolic tensors.

    Returns ``(frame, in_forward)`` or ``(None, False)``. ``in_forward`` tells whether the current
    operation runs inside that module's forward (rather than in one of its hooks).
    """
    frames = []
    f = sys._getframe(start_depth)
    while f is not None:
        frames.append(f)
        f = f.f_back
    chosen = None
    for i in range(len(frames) - 1, -1, -1):  # outermost first
        fr = frames[i]
        if fr.f_code is _CALL_IMPL_CODE:
            loc = fr.f_locals
            module = loc.get("self")
            if transparent_path(module) is not None:
                continue  # NOTE: [Transparent modules]
            if recorded_leaf(module) or _any_symbolic((loc.get("args", ()), loc.get("kwargs", {})),
                                                      linked_only=True):
                chosen = i
                break
    if chosen is None:
        return None, False, frames
    frame = frames[chosen]
    fwd = frame.f_locals.get("forward_call")
    code = getattr(fwd, "__code__", None) or getattr(getattr(fwd, "__func__", None), "__code__", None)
    in_forward = code is None or any(fr.f_code is code for fr in frames[:chosen])
    return frame, in_forward, frames


def _close_finished_scopes(live_frames) -> None:
    if not STATE.scopes:
        return
    # A scope holds its frame, so the frame's id cannot be reused while the scope lives.
    live = {id(f) for f in live_frames}
    keep = []
    for scope in STATE.scopes:
        if id(scope.frame) in live:
            keep.append(scope)
        else:
            scope.restore()
            scope.frame = None
    STATE.scopes = keep


def close_finished_scopes() -> None:
    """Finish bookkeeping of module calls that have returned (called at build entry points)."""
    frames = []
    f = sys._getframe(1)
    while f is not None:
        frames.append(f)
        f = f.f_back
    _close_finished_scopes(frames)


def _buffer_snapshot(module: nn.Module):
    bufs = [(m, n, b) for m in module.modules() for n, b in m._buffers.items()
            if b is not None and b.device.type != "meta"]
    saved = [b.detach().clone() for _, _, b in bufs]
    return bufs, saved


def _undo(bufs, saved):
    """Restore buffers; return ``{index: delta}`` for those that changed (int deltas, else None)."""
    changed = {}
    with torch.no_grad():
        for i, ((m, n, b), s) in enumerate(zip(bufs, saved)):
            cur = m._buffers.get(n)
            if cur is None or cur.shape != s.shape or not torch.equal(cur, s):
                if cur is not None and cur.shape == s.shape and not cur.dtype.is_floating_point:
                    changed[i] = (cur - s)
                else:
                    changed[i] = None
                if cur is b and cur.shape == s.shape:
                    b.copy_(s)
                else:
                    m._buffers[n] = s
    return changed


def _open_scope(frame):
    module = frame.f_locals["self"]
    call_args = frame.f_locals.get("args", ())
    call_kwargs = frame.f_locals.get("kwargs", {})
    forward_call = frame.f_locals["forward_call"]
    problem = messages.precheck(module, call_args)
    if problem:
        raise GraphBuildError(problem)
    bufs, saved = _buffer_snapshot(module)

    def shadow_run(k: int, real: bool, log):
        ctx = ProbeContext(k, real)
        memo: dict[int, Any] = {}  # the same object passed twice stays one object (`query is key`)
        s_args = tree_map(lambda o: _shadow_of(o, ctx, memo), call_args)
        s_kwargs = tree_map(lambda o: _shadow_of(o, ctx, memo), call_kwargs)
        previous, STATE.run = STATE.run, ShadowRun(ctx, log)
        try:
            return forward_call(*s_args, **s_kwargs)
        finally:
            STATE.run = previous

    changed: dict = {}
    real = False
    while True:
        log: list = []
        try:
            out0 = shadow_run(0, real, log)
            changed = _undo(bufs, saved)
            out1 = shadow_run(1, real, None)
            _undo(bufs, saved)
            break
        except GraphBuildError:
            _undo(bufs, saved)
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the layer's context below
            _undo(bufs, saved)
            if not real and is_meta_limitation(exc):
                real = True  # NOTE: documented fallback: probe this module with small real tensors
                continue
            raise GraphBuildError(messages.module_failure(module, call_args, call_kwargs, exc)) from None

    record = Record("call_module", module, _link_args(call_args), _link_args(call_kwargs))
    leaves0 = list(tree_leaves(out0))
    leaves1 = dict(tree_leaves(out1))
    for path, leaf in leaves0:
        if not isinstance(leaf, SymbolicTensor):
            if isinstance(leaf, torch.Tensor):
                raise GraphBuildError(
                    f"{messages.describe_module(module)} returned a tensor that does not come from its "
                    "inputs (a constant created in forward). torchgraph cannot follow it: register it as a "
                    "buffer, or compute it from the inputs."
                )
            continue
        if leaf._tg_value is not None:  # the module returned one of its inputs unchanged
            continue
        other = leaves1.get(path)
        p1 = _as_meta(other._tg_shadow if isinstance(other, SymbolicTensor) else other)
        leaf._tg_value = Value(record, path, (_as_meta(leaf._tg_shadow), p1))
        leaf._tg_shadow = None
    record.out = tree_map(_value_or_plain, out0)

    def restore():
        with torch.no_grad():
            for i, delta in changed.items():
                m, n, _ = bufs[i]
                cur = m._buffers.get(n)
                if delta is not None and cur is not None and cur.shape == delta.shape:
                    cur.sub_(delta)
                elif cur is not None and cur.shape == saved[i].shape:
                    cur.copy_(saved[i])

    scope = _Scope(frame, module, log, restore)
    STATE.scopes.append(scope)
    return scope


def _value_or_plain(o):
    if isinstance(o, (SymbolicTensor, SymbolicInt)):
        return o._tg_value
    return None if isinstance(o, torch.Tensor) else o


def _as_meta(t):
    if t is None:
        raise GraphBuildError("a module returned outputs of a different structure on its two probe runs")
    return t if t.device.type == "meta" else to_meta(t)


def _shadow_of(o, ctx: ProbeContext, memo: dict):
    if isinstance(o, SymbolicTensor):
        shadow = memo.get(id(o))
        if shadow is None:
            t = ctx.unwrap(o)
            if t.device.type == "meta":  # a private copy: in-place ops in forward must not touch the probe
                t = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            shadow = memo[id(o)] = SymbolicTensor(None, shadow=t)
        return shadow
    if isinstance(o, SymbolicInt):
        return o._tg_value.probes[ctx.k]
    return o


def _noop() -> None:
    pass


def _replay(scope: _Scope, func, name: str):
    if scope.cursor >= len(scope.log):
        raise GraphBuildError(
            f"{messages.describe_module(scope.module)}: its forward ran more tensor operations than on "
            f"its probe run (extra '{name}'). torchgraph needs a forward that does the same operations "
            "each time it is called (no random control flow at build time)."
        )
    logged, result = scope.log[scope.cursor]
    scope.cursor += 1
    if scope.cursor == len(scope.log):  # the module's last compute op: undo its hidden mutations now
        scope.restore()
        scope.restore = _noop
    if logged != name:
        raise GraphBuildError(
            f"{messages.describe_module(scope.module)}: its forward did '{name}' where its probe run did "
            f"'{logged}'. torchgraph needs a forward that does the same operations each time it is called."
        )
    return result


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

def dispatch(func, args: tuple, kwargs: dict):
    run = STATE.run
    if run is not None:
        return run.execute(func, args, kwargs)
    name = func_name(func)
    frame, in_forward, frames = _find_module_call()
    _close_finished_scopes(frames)
    if frame is not None:
        if name in _METADATA or not in_forward:
            # Inside a module call (or its hooks): answer like a shadow run on probe 0, unrecorded.
            return ShadowRun(ProbeContext(0, False), None).execute(func, args, kwargs)
        scope = next((s for s in STATE.scopes if s.frame is frame), None)
        if scope is None:
            scope = _open_scope(frame)
        return _replay(scope, func, name)
    return _record_top_level(func, name, args, kwargs)


def _symbolic_size(x: SymbolicTensor, dim: int):
    v = x._tg_value
    d = v.dims[dim]
    if isinstance(d, int):
        return d
    record = Record("call_method", "size", (v, dim))
    out = SymbolicInt(Value(record, (), (v.probes[0].shape[dim], v.probes[1].shape[dim])))
    record.out = out._tg_value
    return out


def _answer_metadata(func, name: str, args, kwargs):
    x = args[0]
    v = x._tg_value
    if name in ("shape", "size"):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is not None:
            if isinstance(dim, int):
                return _symbolic_size(x, dim)
        else:
            return SymbolicShape(_symbolic_size(x, i) for i in range(len(v.dims)))
    if name in ("dim", "ndimension", "ndim"):
        return len(v.dims)
    if name == "dtype":
        return v.dtype
    if name == "device":
        return torch.device("cpu")
    if name in ("numel", "nelement"):
        return SymbolicShape(_symbolic_size(x, i) for i in range(len(v.dims))).numel()
    if name == "__len__":
        if not v.dims:
            raise TypeError("len() of a 0-d tensor")
        return _symbolic_size(x, 0) if isinstance(v.dims[0], int) else _refuse_data(x, "len()")
    if name in ("__repr__", "__str__"):
        return _repr(x)
    if name == "__format__":
        return format(_repr(x), *args[1:])
    if name == "__hash__":
        return id(x)
    if name in ("requires_grad", "is_meta", "is_cuda", "is_mps", "is_xpu", "is_nested", "is_sparse",
                "is_quantized", "has_names", "retains_grad", "_is_view", "is_inference", "is_sparse_csr",
                "is_mkldnn", "is_xla", "is_lazy"):
        return False
    if name in ("is_cpu", "is_leaf"):
        return True
    if name in ("grad", "grad_fn", "_base"):
        return None
    if name == "get_device":
        return -1
    ctx = ProbeContext(0, False)
    return ctx.run(func, args, kwargs)[0]


def _repr(x: SymbolicTensor) -> str:
    v = x._tg_value
    if v is None:
        return f"SymbolicTensor(shape={tuple(x._tg_shadow.shape)}, dtype={x._tg_shadow.dtype}, shadow)"
    from .symbolic import format_shape
    return f"SymbolicTensor(shape={format_shape(v.dims)}, dtype={v.dtype})"


def _refuse_data(x, what: str):
    raise GraphBuildError(
        f"{what} needs the data of a symbolic tensor{'' if x is None else ' ' + _repr(x)}, which does not "
        "exist while the model is being built. Data-dependent code belongs inside an nn.Module's forward "
        "(which runs on real data); iterating or taking len() over the dynamic batch dim is not possible."
    )


def _link_args(obj):
    def link(o):
        if isinstance(o, (SymbolicTensor, SymbolicInt)):
            if o._tg_value is None:
                raise GraphBuildError(
                    "a tensor computed inside a module's forward was used outside it (for example stored "
                    "on an attribute). Return it from forward instead."
                )
            return o._tg_value
        return o
    return tree_map(link, obj)


def _probe_outputs(func, args, kwargs):
    """Run ``func`` on probes 0 and 1 (meta, else real); return both outputs or raise GraphBuildError."""
    name = func_name(func)
    for real in (False, True):
        try:
            out0 = ProbeContext(0, real).run(func, args, kwargs)[0]
            out1 = ProbeContext(1, real).run(func, args, kwargs)[0]
            return out0, out1
        except GraphBuildError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            if not real and is_meta_limitation(exc):
                continue
            raise GraphBuildError(messages.function_failure(name, func, args, kwargs, exc)) from None
    raise AssertionError("unreachable")


def _record_top_level(func, name: str, args, kwargs):
    if name in _METADATA:
        return _answer_metadata(func, name, args, kwargs)
    if name in _NEEDS_DATA:
        _refuse_data(args[0] if args and isinstance(args[0], SymbolicTensor) else None, f"'{name}'")
    if name == "__iter__":
        x = args[0]
        if not x._tg_value.dims or not isinstance(x._tg_value.dims[0], int):
            _refuse_data(x, "Iterating over a dynamic dim")
        return iter(dispatch(torch.Tensor.unbind, (x, 0), {}))
    if name == "__setitem__":
        func, name = setitem, "setitem"

    out0, out1 = _probe_outputs(func, args, kwargs)

    # What to emit: operators as functions (readable code), tensor methods as methods.
    if name in _DUNDER_OPS:
        target, swap = _DUNDER_OPS[name]
        rec_args = (args[1], args[0]) + tuple(args[2:]) if swap else tuple(args)
        record = Record("call_function", target, _link_args(rec_args), _link_args(kwargs))
    elif _is_property(func):
        record = Record("call_function", getattr, (_link_args(args[0]), name))
    elif _is_tensor_method(func, name) or (getattr(func, "__module__", None) == "torch._tensor"
                                           and not _resolvable(func) and hasattr(torch.Tensor, name)):
        # Tensor methods (and torch/_tensor.py's Python wrappers of them) are emitted as methods.
        record = Record("call_method", name, _link_args(tuple(args)), _link_args(kwargs))
    else:
        if kwargs.get("inplace") is False:  # F.relu & co. pass their default along: keep the code lean
            kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
        record = Record("call_function", func, _link_args(tuple(args)), _link_args(kwargs))

    leaves1 = dict(tree_leaves(out1))

    def link_output(path, o):
        if isinstance(o, torch.Tensor):
            return SymbolicTensor(Value(record, path, (_as_meta(o), _as_meta(leaves1.get(path)))))
        if isinstance(o, int) and not isinstance(o, bool) and leaves1.get(path) != o:
            return SymbolicInt(Value(record, path, (o, leaves1.get(path))))
        return o

    result = map_with_paths(link_output, out0)
    record.out = tree_map(_value_or_plain, result)
    if is_inplace(name, kwargs):
        # Later uses of the mutated tensor must see the mutation: rebind it to the new value.
        target_obj = args[0] if args else None
        if isinstance(target_obj, SymbolicTensor) and isinstance(result, SymbolicTensor):
            target_obj._tg_value = result._tg_value
            return target_obj
    return result


def record_int_op(op, args):
    """Arithmetic on dynamic sizes (``x.size(0) * 2``): recorded like any other function."""
    probes = []
    if any(isinstance(a, SymbolicTensor) or (isinstance(a, torch.Tensor) and not isinstance(a, SymbolicInt))
           for a in args):
        return NotImplemented
    for k in (0, 1):
        vals = [a._tg_value.probes[k] if isinstance(a, SymbolicInt) else a for a in args]
        probes.append(op(*vals))
    record = Record("call_function", op, _link_args(tuple(args)))
    out = SymbolicInt(Value(record, (), tuple(probes)))
    record.out = out._tg_value
    return out
