"""Probes: running an operation on the meta (or small real) tensors that stand for symbolic values.

Each symbolic value has two probes (see ``symbolic.py``); a :class:`ProbeContext` turns the symbolic
leaves of an argument tree into probe ``k`` and runs the operation. Meta results are memoised by
(function, argument metadata): a ResNet repeats a few dozen distinct (op, shape) pairs.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn

from .errors import GraphBuildError
from .probe_layouts import match_cpu_layout
from .targets import func_name, is_inplace
from .symbolic import SymbolicInt, SymbolicTensor, Value, _StandIn
from .trees import tree_leaves, tree_map
from .untrusted import real_probes_allowed

__all__ = ["MetaLimitation", "ProbeContext", "data_device", "is_meta_limitation", "real_probe", "run_on_probes",
           "to_meta"]



class MetaLimitation(Exception):
    """The meta device could not run an op (no meta kernel, data-dependent): probe with real data."""


def is_meta_limitation(exc: BaseException) -> bool:
    if isinstance(exc, (GraphBuildError, MetaLimitation)):
        return isinstance(exc, MetaLimitation)
    if isinstance(exc, NotImplementedError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("meta", "data-dependent", "data dependent", "numpy", "dynamic_output_shape"))


def to_meta(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "meta":
        return t
    if isinstance(t, nn.parameter.UninitializedTensorMixin):
        raise GraphBuildError("an uninitialized (lazy) parameter was used before its module materialized it")
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def real_probe(value: Value, k: int, device: torch.device | None = None) -> torch.Tensor:
    """Random real data with the shape of probe ``k`` (valid indices for integer inputs), on ``device``
    (default: the CPU)."""
    if value.record.op == "get_attr":  # a model's own tensor (constant_value): its real data
        return value.record.target
    p = value.probes[k]
    if p.dtype.is_floating_point or p.dtype.is_complex:
        t = torch.randn(p.shape, dtype=p.dtype, generator=_PROBE_DATA.generator)
    else:
        t = torch.zeros(p.shape, dtype=p.dtype)
    return t if device is None else t.to(device)


def data_device(obj) -> torch.device | None:
    """Where real probes for ``obj`` must live: the device of a module's first parameter or buffer, or of
    the first concrete tensor in an argument tree, when it is not the CPU (or meta); else None.

    NOTE: [Real probes where the weights are] an op that cannot run on meta runs on small real tensors;
    a layer whose weights are on a GPU (``nn.Embedding`` of a model moved there before it was recorded)
    refuses CPU indices, so the probes, and the devices that symbolic code names (``x.device``), follow
    its weights."""
    if isinstance(obj, nn.Module):
        tensors = (*obj.parameters(), *obj.buffers())
    else:
        tensors = (leaf for _, leaf in tree_leaves(obj) if type(leaf) in (torch.Tensor, nn.Parameter))
    return next((t.device for t in tensors if t.device.type not in ("cpu", "meta")), None)


class _ProbeData(threading.local):
    """NOTE: [Probe data draws from its own generator] Real probes are made while a forward runs, in
    between its own draws; drawn from torch's generator, they would shift the forward's draws by an
    amount that depends on the probe's size, and shadow runs on probe 0 and probe 1 would take
    different branches (NOTE: [Same draws in every run] in module_scopes.py). They also leave the
    user's generator alone."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)


_PROBE_DATA = _ProbeData()


def probe_generator() -> torch.Generator:
    """This thread's generator for probe data (NOTE: [Probe data draws from its own generator])."""
    return _PROBE_DATA.generator


_CACHE: dict = {}
_CACHE_LIMIT = 50_000


def _key(o):
    if isinstance(o, torch.Tensor):
        return (o.shape, o.stride(), o.dtype, o.device.type, o.requires_grad)
    t = type(o)
    if t is tuple or t is list:
        return (t, tuple(_key(x) for x in o))
    if isinstance(o, dict):
        return (dict, tuple((k, _key(v)) for k, v in o.items()))
    if t is slice:
        return (slice, _key(o.start), _key(o.stop), _key(o.step))
    hash(o)
    return (t, o)


class _TensorMeta:
    """A memoised output tensor: what it takes to make a fresh meta tensor like it."""

    __slots__ = ("shape", "stride", "dtype")

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.dtype = t.shape, t.stride(), t.dtype

    def make(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


def _skeleton(out):
    return tree_map(lambda o: _TensorMeta(o) if isinstance(o, torch.Tensor) else o, out)


def _rebuild(skel):
    return tree_map(lambda o: o.make() if isinstance(o, _TensorMeta) else o, skel)


def _rnn_on_meta(name: str, u_args: tuple):
    """Output shapes of ``_VF.lstm/gru/rnn_*`` (padded form) without running the recurrence.

    NOTE: the meta kernels of these ops unroll the sequence in Python: ~1 s per probe for a few
    hundred steps. The shapes follow from the inputs alone: output (..., num_directions * H_out),
    h_n/c_n shaped like h_0/c_0.
    """
    x, hx = u_args[0], u_args[1]
    if not isinstance(hx, (list, tuple, torch.Tensor)) or isinstance(u_args[2], torch.Tensor):
        return None  # the packed-sequence overload: run it for real
    h0 = hx[0] if isinstance(hx, (list, tuple)) else hx
    bidirectional = bool(u_args[7])
    out = torch.empty(*x.shape[:-1], h0.shape[-1] * (2 if bidirectional else 1), dtype=x.dtype, device="meta")
    states = [torch.empty(h.shape, dtype=h.dtype, device="meta") for h in (hx if isinstance(hx, (list, tuple)) else [hx])]
    return (out, *states)


_RNN_OPS = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})


def _on_meta(func, u_args, u_kwargs):
    """``func`` on meta probes, its output laid out as the CPU kernel lays it (NOTE: [Meta strides])."""
    return match_cpu_layout(func, u_args, u_kwargs, func(*u_args, **u_kwargs))


def run_on_probes(func, args, kwargs, unwrap, cacheable: bool):
    """``func`` on unwrapped (meta or real) arguments, memoised for meta when safe."""
    u_args = tree_map(unwrap, args)
    u_kwargs = tree_map(unwrap, kwargs)
    if cacheable and func_name(func) in _RNN_OPS and len(u_args) >= 9 and isinstance(u_args[0], torch.Tensor) \
            and u_args[0].device.type == "meta":
        out = _rnn_on_meta(func_name(func), tuple(u_args))
        if out is not None:
            return out, u_args, u_kwargs
    if not cacheable:
        return func(*u_args, **u_kwargs), u_args, u_kwargs
    try:
        key = (func, _key(u_args), _key(u_kwargs))
    except TypeError:  # an unhashable argument: no memo
        return _on_meta(func, u_args, u_kwargs), u_args, u_kwargs
    hit = _CACHE.get(key)
    if hit is not None:
        return _rebuild(hit), u_args, u_kwargs
    out = _on_meta(func, u_args, u_kwargs)
    if len(_CACHE) > _CACHE_LIMIT:
        _CACHE.clear()
    try:
        _CACHE[key] = _skeleton(out)
    except Exception:  # an output we cannot describe: just don't memoise
        pass
    return out, u_args, u_kwargs


class ProbeContext:
    """How symbolic leaves turn into probe data: probe ``k``, on meta or on real random data.

    ``copy_inplace``: an in-place op gets a private copy of its symbolic arguments' probes (at the top
    level the probes belong to values that other operations still read).
    """

    def __init__(self, k: int, real: bool, copy_inplace: bool = False, device: torch.device | None = None):
        if real and not real_probes_allowed():
            raise GraphBuildError(
                "an operation could not run on the meta device, and the real-data fallback is off while "
                "an untrusted config or file is built (it would compute on tensors as large as the "
                "config says). Models whose layers need real data to build cannot be loaded from a "
                "config; rebuild them from code.")
        self.k = k
        self.real = real
        self.copy_inplace = copy_inplace
        self.device = device  # of real probes (None: the CPU): NOTE: [Real probes where the weights are]
        self._real_values: dict[int, torch.Tensor] = {}

    def unwrap(self, o):
        if isinstance(o, SymbolicTensor):
            if o._tg_shadow is not None:
                return o._tg_shadow
            if self.real:
                v = o._tg_value
                t = self._real_values.get(id(v))
                if t is None:
                    t = self._real_values[id(v)] = real_probe(v, self.k, self.device)
                return t
            return o._tg_value.probes[self.k]
        if isinstance(o, SymbolicInt):
            return o._tg_value.probes[self.k]
        if isinstance(o, _StandIn):
            if isinstance(o.value, torch.device):
                return (self.device or torch.device("cpu")) if self.real else torch.device("meta")
            return o.value
        if isinstance(o, torch.Tensor) and not self.real:
            return to_meta(o)
        return o

    def _unwrap_copy(self, o):
        t = self.unwrap(o)
        if isinstance(o, SymbolicTensor) and isinstance(t, torch.Tensor):
            return t.clone() if self.real else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        return t

    def run(self, func, args, kwargs):
        name = func_name(func)
        if not self.real and name in _DEVICE_MOVES:
            args, kwargs = _without_device(name, args, kwargs)
        inplace = is_inplace(name, kwargs)
        cacheable = not self.real and not inplace
        unwrap = self._unwrap_copy if inplace and self.copy_inplace else self.unwrap
        return run_on_probes(func, args, kwargs, unwrap, cacheable)


# NOTE: [Device moves on meta probes] `x.to(device)`, `x.cpu()` (HuggingFace writes them everywhere)
# cannot copy a meta probe to a real device; for shapes and dtypes a move changes nothing, so meta
# probes stay on meta (the recorded call keeps its device argument).
_DEVICE_MOVES = frozenset({"to", "cpu", "cuda"})


def _without_device(name: str, args, kwargs):
    if name in ("cpu", "cuda"):
        return (args[0],), {}
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    rest = [a for a in args[1:] if not isinstance(a, (torch.device, str, int)) or isinstance(a, bool)]
    return (args[0], *rest), kwargs
