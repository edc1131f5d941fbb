"""Recording what ``__torch_function__`` does not see, and telling library code that it is traced.

Used while ``tg.from_module`` records a module (and while a config is replayed). Nothing here is
active at any other time.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.overrides import TorchFunctionMode

from . import (dims, generator_states, messages, mode_stack, module_scopes, probing, recording, restoring,
               scope_replay, shadow_runs, sizes, symbolic, targets)
from .errors import GraphBuildError, RandomDrawError
from .mode_stack import remove_mode
from .symbolic import SymbolicInt, SymbolicTensor, _StandIn
from .targets import _METADATA, func_name, is_inplace
from .trees import tree_leaves
from .type_info import hold_during_build

__all__ = ["RecordingMode", "tracing_flags"]


@contextlib.contextmanager
def tracing_flags():
    # NOTE: [Tracing flags] Recording runs the module's Python forward on stand-in tensors, as
    # torch.export's non-strict mode does; library code written to be exported (HuggingFace, timm)
    # asks torch.compiler.is_compiling() / is_exporting() to skip data-dependent shortcuts (such as
    # dropping an attention mask that is all ones). So these flags are set while recording, exactly
    # as torch.export sets them (torch._export.utils._compiling_state_context).
    compiler = torch.compiler
    saved = {f: getattr(compiler, f) for f in ("_is_compiling_flag", "_is_exporting_flag") if hasattr(compiler, f)}
    try:
        for f in saved:
            setattr(compiler, f, True)
        yield
    finally:
        for f, v in saved.items():
            setattr(compiler, f, v)


class RecordingMode(TorchFunctionMode):
    """While a module is recorded, routes to the recording what ``__torch_function__`` cannot see.

    NOTE: [State ops] Two kinds of calls never reach a SymbolicTensor's ``__torch_function__``:
    - Operations on the module's own parameters and buffers alone (``self.pos_ids[:, :n]``,
      ``self.scale.exp()``, a leaf called on a constant such as ``self.wpe(torch.arange(16))``).
      Run eagerly, their results would be baked into the graph as constants: stale after
      ``load_state_dict`` or a training step, and without gradients. Recorded, they read the
      parameter at run time (a ``get_attr`` node named by its state_dict key).
    - A dynamic size passed as a Scalar (``torch.arange(x.size(1))``): torch's argument parser turns
      a tensor in a Scalar position into a number without asking ``__torch_function__``.
    A TorchFunctionMode sees every call; it is active only while ``tg.from_module`` records (with
    the module's tensors as ``state_ids``) and while a config is replayed (sizes only). Metadata
    (``.shape``, ``.dtype``...), torchgraph's own calls (probes) and everything else run as usual.
    """

    def __init__(self, state_ids: set[int] = frozenset(), forwards: bool = False):
        super().__init__()
        self.state_ids = state_ids
        self.forwards = forwards  # recording a module's forward (not replaying a config)

    def __enter__(self):
        # torch.finfo(x.dtype) never reaches a mode either; the given tg.Inputs may be values of a build
        # that ended (NOTE: [finfo of a stand-in] in type_info.py).
        hold_during_build()
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _called_from_internals():  # probes, snapshots of buffers...: never recorded
            return func(*args, **kwargs)
        symbolic = state = False
        for _, leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, (SymbolicTensor, SymbolicInt, _StandIn)):
                # NOTE: a device/dtype stand-in (`device=x.device`) reaches its own __torch_function__
                # only when no other mode answers first: torch.device("meta") (tg.load builds on meta)
                # would otherwise turn it into a real device and the call into a constant.
                symbolic = True
            elif isinstance(leaf, torch.Tensor) and (id(leaf) in self.state_ids or (
                    leaf._base is not None and id(leaf._base) in self.state_ids)):
                state = True
        name = func_name(func)
        if self.forwards and not symbolic and name in _RANDOM and not _in_layer_call():
            _refuse_random_draw(name, args)
        if is_inplace(name, kwargs) or name == "__setitem__":
            target = args[0] if args else None
            if symbolic and isinstance(target, torch.Tensor) and not isinstance(target, SymbolicTensor) \
                    and not _in_layer_call():
                # NOTE: the graph would hold this update only if its result were used later. Inside a
                # layer (a BatchNorm-like leaf updating its running mean) it is part of the layer's call.
                raise GraphBuildError(
                    f"'{name}' writes a symbolic value into a real tensor of shape {tuple(target.shape)} "
                    "(a buffer or a constant) in place; a graph cannot reproduce that update.")
            state = False  # eager: a changed buffer is caught afterwards (the module stays one layer)
        if symbolic or (state and name not in _UNROUTED):
            from .recording import dispatch

            # torch pops a mode while its handler runs: push it again, so that the operations of a
            # leaf's forward re-run on probes (its shadow run) are routed exactly like the original's.
            # NOTE: not `with self:`, whose exit pops the *top* mode: recording a module call may push
            # a ScopeMode above this one (NOTE: [Module scopes]) that must stay until the call ends.
            torch._C._push_on_torch_function_stack(self)
            try:
                return dispatch(func, args, kwargs)
            finally:
                remove_mode(self)
        return func(*args, **kwargs)


# NOTE: [Random draws in a forward] `torch.rand([])` in a recorded forward (HuggingFace's LayerDrop:
# `if self.training and self.layerdrop > 0: if torch.rand([]) < self.layerdrop: skip the layer`), or
# `torch.empty(n).bernoulli_(p)`, takes no symbolic input, so it would run once while recording and its
# numbers would be baked into the graph: the recorded model would skip (or keep) the same layers at
# every call and draw nothing from the generator, while the module draws anew at every call -- a
# silent difference in train mode, found on BART with encoder_layerdrop=0.1 (Wav2Vec2's default
# layerdrop is 0.1). Such a draw fails the recording of the module that makes it, which then stays
# one opaque layer (exact: it draws at run time), or, at the top level, the build, with this message.
# Draws on symbolic tensors (`x.new_empty(shape).bernoulli_(p)`, `F.dropout(x)`) are recorded as
# operations, and layers (nn.Dropout, an opaque module) draw for real when the model runs. Draws from
# numpy or Python's `random`, which no mode sees, are caught by their generators' states (NOTE: [Draws
# outside torch] in generator_states.py); a layer's runs all draw alike (NOTE: [Same draws in every run]).
_RANDOM = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli", "multinomial",
    "normal", "poisson", "bernoulli_", "normal_", "uniform_", "random_", "exponential_", "geometric_", "cauchy_",
    "log_normal_", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "rrelu", "rrelu_",
})


def _refuse_random_draw(name: str, args) -> None:
    shape = next((tuple(a.shape) for a in args if isinstance(a, torch.Tensor)), None)
    what = f"'{name}'" + (f" on a tensor of shape {shape}" if shape is not None else "")
    raise RandomDrawError(
        f"{what} draws random numbers that depend on no input of the model (NOTE: [Random draws in a "
        "forward]). Expected random calls on the inputs' values (x.new_empty(...).bernoulli_(p), "
        "F.dropout(x)); received a draw that a recording would run once and bake into the graph as a "
        "constant, while the module draws anew at every call. The module that makes it stays one opaque "
        "layer; at the top level, use the module as one layer of a tg.Model (x = tg.Input(...); "
        "tg.Model(x, module(x))) or give it settings that avoid the draw (LayerDrop 0).")


def _in_layer_call() -> bool:
    from .recording import in_layer_call

    return in_layer_call()


def _called_from_internals() -> bool:
    """Whether the recording machinery makes this call (computing on probes, copying buffers...)."""
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename in _TORCH_WRAPPERS:
        f = f.f_back
    return f is not None and f.f_code.co_filename in _INTERNALS


_TORCH_WRAPPERS = {torch.overrides.__file__, torch.nn.functional.__file__, torch.functional.__file__,
                   torch._tensor.__file__}
# The files of the recording machinery: the torch calls they make (probes, buffer snapshots, a ScopeMode
# passing a call on) are never recorded. A module of that machinery moved or split must stay listed.
_INTERNALS = {m.__file__ for m in (probing, recording, module_scopes, mode_stack, scope_replay, shadow_runs,
                                    restoring, sizes, dims, symbolic, messages, targets, generator_states)}
_UNROUTED = _METADATA | {"__iter__", "data_ptr", "untyped_storage", "numpy", "__array__", "backward",
                         "__reduce_ex__", "__deepcopy__", "__getstate__", "__setstate__", "__get__"}
