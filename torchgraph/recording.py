"""Recording: turns operations on symbolic tensors into :class:`~torchgraph.symbolic.Record` s.

Every operation on a :class:`SymbolicTensor` arrives in :func:`dispatch` (via ``__torch_function__``).
Three situations, told apart without patching anything:

1. **Top level** (the user's own code calls ``F.relu(x)``, ``x + y``, ``x.view(...)``): record a
   function or method call, propagate the two probes, return new symbolic values.
2. **Inside a module call** (``layer(x)`` runs ``layer.forward`` with symbolic inputs): the whole call
   must become *one* ``call_module`` record. ``nn.Module.__call__`` gives no hook, so we find the
   call on the Python stack (see NOTE: [Module scopes] in ``module_scopes.py``).
3. **Inside a shadow run** (our own re-run of a module's forward on probes): compute on the probes.

Design constraints:

- No global state is changed between builds: no monkeypatching, no global hooks, no modes left on.
  Handwritten modules pay nothing for torchgraph being imported.
- Building never changes a parameter or a buffer (probes are meta copies; see NOTE: [Hidden mutation]).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from . import messages
from .builds import note_failure
from .errors import GraphBuildError
from .module_scopes import open_scope
from .naming import remember_variable_names
from .probing import ProbeContext, data_device, is_meta_limitation, to_meta
from .scope_replay import STATE, call_kind, find_scope, remove_idle_modes, replay, skip_metadata
from .scopes import recorded_leaf, transparent_path
from .shadow_runs import ShadowRun
from .sizes import standin_value
from .symbolic import (Record, SymbolicDevice, SymbolicDtype, SymbolicInt, SymbolicShape, SymbolicTensor, Value,
                       _StandIn)
from .targets import (_DUNDER_OPS, _METADATA, _NEEDS_DATA, VIEW_OPS, _is_property, _is_tensor_method, _resolvable,
                      func_name, is_inplace, setitem)
from .trees import map_with_paths, tree_leaves, tree_map
from .type_info import hold_during_build

__all__ = ["close_finished_scopes", "dispatch", "in_layer_call", "link_args"]


def _any_symbolic(obj, linked_only: bool) -> bool:
    for _, leaf in tree_leaves(obj):
        if isinstance(leaf, SymbolicTensor) and (leaf._tg_value is not None or not linked_only):
            return True
    return False


# NOTE: [Transparent modules]
# tg.from_module records an existing module down to its leaf modules: it marks every other submodule
# (and the root) as transparent while it calls the root (scopes.looking_through). A transparent
# module's `_call_impl` frame is skipped here, so the operations of its forward are recorded one by
# one, as if written at the top level, and the first non-transparent module call on the stack (a
# leaf: Conv2d, BatchNorm2d...) becomes the call_module record (NOTE: [Module scopes] in
# module_scopes.py), even when called on constants only (`self.wpe(torch.arange(16))`: its output
# depends on its weights). Which module path an operation comes from is read from the same frames
# (scopes.current_scope).

_CALL_IMPL_CODE = nn.Module._call_impl.__code__


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


def in_layer_call() -> bool:
    """Whether a torch call made now is part of a module call recorded as one layer (a leaf of
    tg.from_module): in its shadow runs or in the original call, which are one opaque call_module."""
    return STATE.run is not None or _find_module_call()[0] is not None


def close_finished_scopes() -> None:
    """Called at build entry points (tg.Input, tg.Model): drop scope modes that could not drop themselves."""
    remove_idle_modes()


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

def dispatch(func, args: tuple, kwargs: dict):
    try:  # no helper frame: _find_module_call and messages read the stack from here
        run = STATE.run
        name = func_name(func)
        if run is not None:  # in a shadow run (NOTE: [Call kinds] in scope_replay.py)
            kind = call_kind(name, args, kwargs)
            if kind == "op":
                return run.execute(func, args, kwargs)
            return run.const(func, name, args, kwargs) if kind == "const" else func(*args, **kwargs)
        frame, in_forward, _ = _find_module_call()
        if frame is not None:
            if not in_forward:
                # In the module call's hooks: answer like a shadow run on probe 0, unrecorded.
                return ShadowRun(ProbeContext(0, False), None).execute(func, args, kwargs)
            kind = call_kind(name, args, kwargs)  # NOTE: [Call kinds] in scope_replay.py
            if kind == "real":  # a data read or an in-place change of a buffer: as in the shadow runs
                return func(*args, **kwargs)
            scope = find_scope(frame)
            if scope is None:
                scope = open_scope(frame, None if name in _METADATA else (kind, name, args, kwargs))
            if name in _METADATA:
                skip_metadata(scope, name)
                return ShadowRun(ProbeContext(0, False), None).execute(func, args, kwargs)
            return replay(scope, kind, name, args, kwargs)
        return _record_top_level(func, name, args, kwargs)
    except GraphBuildError as exc:
        note_failure(exc)  # an interactive session's failed build (NOTE: [End of a build] in builds.py)
        raise


def _symbolic_size(x: SymbolicTensor, dim: int):
    v = x._tg_value
    d = v.dims[dim]
    if isinstance(d, int):
        return d
    record = Record("call_method", "size", (v, dim))
    out = SymbolicInt(Value(record, (), (v.probes[0].shape[dim], v.probes[1].shape[dim])))
    record.out = out._tg_value
    return out


_STANDINS: dict[str, type] = {"device": SymbolicDevice, "dtype": SymbolicDtype}


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
    if name in _STANDINS:  # NOTE: [Device and dtype stand-ins] in symbolic.py
        return _STANDINS[name](v, v.dtype if name == "dtype" else torch.device("cpu"))
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


def link_args(obj):
    """An argument tree with symbolic leaves replaced by the values they stand for."""
    def link(o):
        if isinstance(o, (SymbolicTensor, SymbolicInt)):
            if o._tg_value is None:
                raise GraphBuildError(
                    "a tensor computed inside a module's forward was used outside it (for example stored "
                    "on an attribute). Return it from forward instead."
                )
            return o._tg_value
        if isinstance(o, _StandIn):
            return standin_value(o)
        return o
    return tree_map(link, obj)


def _probe_outputs(func, args, kwargs):
    """Run ``func`` on probes 0 and 1 (meta, else real): ``(out0, out1, real)`` or a GraphBuildError."""
    name = func_name(func)
    for real in (False, True):
        device = data_device((args, kwargs)) if real else None  # NOTE: [Real probes where the weights are]
        try:
            out0 = ProbeContext(0, real, copy_inplace=True, device=device).run(func, args, kwargs)[0]
            out1 = ProbeContext(1, real, copy_inplace=True, device=device).run(func, args, kwargs)[0]
            return out0, out1, real
        except GraphBuildError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            if not real and is_meta_limitation(exc):
                continue
            raise GraphBuildError(messages.function_failure(name, func, args, kwargs, exc)) from None
    raise AssertionError("unreachable")


def _record_top_level(func, name: str, args, kwargs):
    build = hold_during_build()  # values of a finished build used again (NOTE: [finfo of a stand-in])
    pin = build.pin()  # NOTE: [End of a build] in builds.py
    try:
        return _record_operation(func, name, args, kwargs)
    finally:
        build.unpin(pin)


def _record_operation(func, name: str, args, kwargs):
    if name in _METADATA:
        return _answer_metadata(func, name, args, kwargs)
    if name in _NEEDS_DATA:
        _refuse_data(args[0] if args and isinstance(args[0], SymbolicTensor) else None, f"'{name}'")
    if name == "__iter__":
        x = args[0]
        if not x._tg_value.dims or not isinstance(x._tg_value.dims[0], int):
            _refuse_data(x, "Iterating over a dynamic dim")
        return iter(dispatch(torch.Tensor.unbind, (x, 0), {}))
    inplace = is_inplace(name, kwargs)
    if name == "__setitem__":
        func, name = setitem, "setitem"
    if not _any_symbolic((args, kwargs), linked_only=False) and not any(
            isinstance(leaf, SymbolicInt) for _, leaf in tree_leaves((args, kwargs))) \
            and messages.called_from_torch():
        # Only a device/dtype stand-in, inside torch's own code (a layer's __init__): a real call.
        return func(*tree_map(_real_standin, args), **tree_map(_real_standin, kwargs))

    if func in _SIZE_VARARGS and len(args) > 1 and all(isinstance(a, (int, SymbolicInt)) for a in args):
        args = (tuple(args),)  # torch.zeros(b, 1, w) as torch.zeros((b, 1, w)): fx can retrace that form
    out0, out1, needs_real_data = _probe_outputs(func, args, kwargs)
    constants = [leaf for _, leaf in tree_leaves((args, kwargs))
                 if isinstance(leaf, torch.Tensor) and not isinstance(leaf, (SymbolicTensor, SymbolicInt))]
    if constants:
        remember_variable_names(constants)  # NOTE: [Tensor names] in naming.py

    # What to emit: operators as functions (readable code), tensor methods as methods.
    if name in _DUNDER_OPS:
        target, swap = _DUNDER_OPS[name]
        rec_args = (args[1], args[0]) + tuple(args[2:]) if swap else tuple(args)
        record = Record("call_function", target, link_args(rec_args), link_args(kwargs))
    elif _is_property(func):
        record = Record("call_function", getattr, (link_args(args[0]), name))
    elif _is_tensor_method(func, name) or (getattr(func, "__module__", None) == "torch._tensor"
                                           and not _resolvable(func) and hasattr(torch.Tensor, name)):
        # Tensor methods (and torch/_tensor.py's Python wrappers of them) are emitted as methods.
        record = Record("call_method", name, link_args(tuple(args)), link_args(kwargs))
    else:
        if kwargs.get("inplace") is False:  # F.relu & co. pass their default along: keep the code lean
            kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
        record = Record("call_function", func, link_args(tuple(args)), link_args(kwargs))

    record.needs_real_data = needs_real_data
    leaves1 = dict(tree_leaves(out1))

    def link_output(path, o):
        if isinstance(o, torch.Tensor):
            return SymbolicTensor(Value(record, path, (_as_meta(o), _as_meta(leaves1.get(path)))))
        if isinstance(o, (int, float)) and not isinstance(o, bool) and leaves1.get(path) != o:
            return SymbolicInt(Value(record, path, (o, leaves1.get(path))))
        return o

    result = map_with_paths(link_output, out0)
    record.out = tree_map(_value_or_plain, result)
    if func is torch._assert:  # a guard replayed from a saved config
        record.effect = "guard"
        for _, leaf in tree_leaves(record.args):
            if isinstance(leaf, Value):
                from .sizes import _tensor_sources
                for source in _tensor_sources(leaf):
                    source.add_effect(record)
    if name in VIEW_OPS and args and isinstance(args[0], SymbolicTensor) and args[0]._tg_value is not None:
        base = args[0]._tg_value.base
        for _, leaf in tree_leaves(result):
            if isinstance(leaf, SymbolicTensor):
                leaf._tg_value.base = base
    if inplace:
        return _mutated(record, kwargs.get("out") if "out" in kwargs else (args[0] if args else None), result)
    return result


# Factories taking sizes as varargs. NOTE: torch's argument parser accepts a non-tensor object with
# __torch_function__ (an fx Proxy) in a size *list* but not as the first of several varargs, so fx could
# not retrace `torch.zeros(size, 1, size_1)` when a model is unpickled; the tuple form it can.
_SIZE_VARARGS = frozenset({torch.zeros, torch.ones, torch.empty, torch.rand, torch.randn})


def _mutated(record: Record, target, result):
    """An in-place op at the top level. NOTE: [Effects] in collecting.py says why it is always kept."""
    if not isinstance(target, SymbolicTensor) or target._tg_value is None:
        return result
    record.effect = "mutation"
    before = target._tg_value
    before.base.add_effect(record)
    if isinstance(result, SymbolicTensor) and result is not target:
        # Later uses of the mutated tensor must see the mutation: move it on to the new value. Its
        # origin (what tg.Model(inputs=...) means by it) stays the value it was created as.
        result._tg_value.base = before.base
        target._tg_value = result._tg_value
        return target
    return result


def _real_standin(o):
    return o.value if isinstance(o, _StandIn) else o


def _value_or_plain(o):
    if isinstance(o, (SymbolicTensor, SymbolicInt)):
        return o._tg_value
    return None if isinstance(o, torch.Tensor) else o


def _as_meta(t):
    if t is None:
        raise GraphBuildError("an operation returned outputs of a different structure at its two probe sizes")
    return t if t.device.type == "meta" else to_meta(t)
