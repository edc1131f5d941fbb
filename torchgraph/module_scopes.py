"""Module scopes: a module called on symbolic tensors becomes one ``call_module`` record.

See NOTE: [Module scopes]. This module opens a scope (:func:`open_scope`): it runs the module's
forward on each probe (:class:`~torchgraph.shadow_runs.ShadowRun`, with a
:class:`~torchgraph.scope_replay.ScopeMode` on so that tensors the forward creates without symbolic
arguments are seen too), records one ``call_module``, links its outputs, and hands the interrupted
original forward to a :class:`~torchgraph.scope_replay.Scope` (the log of run 0, replayed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from . import generator_states, messages
from .errors import GraphBuildError
from .mode_stack import push_mode, remove_mode
from .probing import ProbeContext, data_device, is_meta_limitation, to_meta
from .restoring import attribute_snapshot, buffer_snapshot, restore_attributes, undo_buffers
from .returned_inputs import links_returned_inputs
from .scope_replay import STATE, Scope, ScopeMode, start_replay
from .scope_replay import find_scope, remove_idle_modes, replay, skip_metadata  # noqa: F401 - kept here: NOTE below
from .scopes import recorded_leaf
from .shadow_runs import ShadowRun
from .symbolic import Record, SymbolicInt, SymbolicTensor, Value
from .trees import tree_leaves, tree_map

__all__ = ["open_scope"]

# NOTE: [Names kept in module_scopes.py] Other modules imported STATE, Scope, ShadowRun, find_scope,
# remove_idle_modes, remove_mode, replay and skip_metadata from here before this module was split;
# code written against that keeps working. New code imports them from their homes: scope_replay.py,
# shadow_runs.py and mode_stack.py.

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
# log has such calls left to replay. Every party that may see a call (the mode, a symbolic tensor,
# tg.from_module's RecordingMode) classifies it the same way: NOTE: [Call kinds] in scope_replay.py.
#
# The scope is identified by a sentinel object stored in that `_call_impl` frame's `kwargs` dict
# (which nothing else reads after the forward has started). No reference to the frame is kept, so
# when the module call returns the frame and its kwargs die, the sentinel's __del__ closes the scope:
# it restores what the shadow runs changed and removes the ScopeMode from the mode stack. The mode
# is thus on only during the module call being recorded: nothing is left on after a build, and
# handwritten modules pay nothing. (A mode cannot remove itself from inside its own handler, where
# torch has stashed it; if the sentinel dies there, or in another thread, the mode is marked idle
# and removed at the next tg.Input / tg.Model.)


# NOTE: [Same draws in every run] A layer that draws random numbers on no input (LayerDrop's
# `torch.rand([]) < p`, NOTE: [Random draws in a forward] in tracing.py; SpecAugment's
# `np.random.rand()`, NOTE: [Draws outside torch] in generator_states.py) must take the same branches
# in both shadow runs and in the original call, or the build would depend on the generators' state
# (and fail now and then: "did different operations when it was called again"). So:
# - both shadow runs start from the states of torch's CPU generator, numpy's global generator,
#   Python's `random` and the generator objects stored on the layer's modules that the original call
#   started from (NOTE: [Generator states at a call's start] in generator_states.py): the original
#   call may have drawn before it first touched its inputs, which is when its scope opens;
# - real probe data comes from a generator of its own (NOTE: [Probe data draws from its own
#   generator] in probing.py), so it never shifts the forward's draws;
# - the states at the scope's opening are put back after the shadow runs: the original call goes on
#   where it was, its torch draws replayed from run 0's log, its other draws made again from the
#   same states as run 0's.
# tg.from_module puts every generator back when its recording ends: a build draws nothing from the
# user's generators. At run time the layer is called for real and draws as eager does.


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


def open_scope(frame, opener: tuple | None = None) -> Scope:
    """Record the module call of ``frame``: shadow runs, one call_module record, a scope to replay.

    ``opener`` is the call that found the module call, ``(kind, name, args, kwargs)``, None for a
    metadata read (NOTE: [Opening call] in scope_replay.py).
    """
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
        ctx = ProbeContext(k, real, device=data_device(module) if real else None)
        memo: dict[int, Any] = {}  # the same object passed twice stays one object (`query is key`)
        run = ShadowRun(ctx, log, {} if log is not None and k == 0 else None)
        s_args = tree_map(lambda o: _shadow_of(o, ctx, memo, run), call_args)
        s_kwargs = tree_map(lambda o: _shadow_of(o, ctx, memo, run), call_kwargs)
        previous, STATE.run = STATE.run, run
        if mode is not None:
            push_mode(mode)
        try:
            return run, forward_call(*s_args, **s_kwargs)
        finally:
            if mode is not None:
                remove_mode(mode)
            STATE.run = previous
            restore_attributes(attrs, tensors=True)  # NOTE: [Attributes between shadow runs]

    changed: dict = {}
    real = False
    now = generator_states.snapshot_for(module)  # NOTE: [Same draws in every run]
    start = generator_states.call_start(module, call_args) or now
    while True:
        log: list = []
        log1: list = []  # only for error messages: which dims of run 0's shapes are dynamic
        k = 0
        try:
            generator_states.restore(start)
            run0, out0 = shadow_run(0, real, log)
            changed = undo_buffers(bufs, saved)
            k = 1
            generator_states.restore(start)
            _, out1 = shadow_run(1, real, log1)
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
        finally:
            generator_states.restore(now)  # the runs drew nothing from the user's generators

    record = Record("call_module", module, link_args(call_args), link_args(call_kwargs))
    record.needs_real_data = real
    if run0.mutated:
        _check_no_shape_change(module, run0)
        record.effect = "mutation"
        for value in run0.mutated.values():
            value.base.add_effect(record)
    if real and not recorded_leaf(module) and not links_returned_inputs(module):
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

    scope = start_replay(module, log, restore, attrs, mode, call_kwargs, opener, run0.prefix)
    scope.other_log = log1
    scope.record = record
    scope.input_dims = {i: (shadow, run0.roots[i].dims) for i, shadow in run0.inputs.items()}
    return scope


def _check_no_lost_call(module, run0: ShadowRun, out0, bufs, saved, attrs) -> None:
    """NOTE: [Lost calls] A module probed with real data (its forward reads the data, or draws random
    numbers to choose its branch) that returns its input object unchanged on that data (`if x.sum() >
    0: return x`, a LayerDrop that skipped every layer) hands the interrupted original call its own
    input back: the caller never sees the recorded call, and the model would skip the module whatever
    the data at run time. That happens only where no hook links such outputs to the call (NOTE:
    [Returned inputs] in returned_inputs.py): tg.from_module's opaque layers and the layers of a
    hand-written build are linked, so their call stays in the graph and decides at run time, as in
    eager."""
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
                                 for kind, name, *_ in run0.log or ())
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
