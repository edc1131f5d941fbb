"""The random generators a forward may draw from, saved and put back while a model is built.

A forward may draw from torch's CPU generator (``torch.rand([])``), numpy's global generator
(``np.random.rand()``, HuggingFace's SpecAugment), Python's ``random`` module, or a generator object
stored on the module (``self.rng = np.random.default_rng(0)``). Building a model runs forwards
several times (NOTE: [Module scopes] in module_scopes.py); each run must take the branches the
others took, and the build must leave the user's generators as they were. This module snapshots the
states, puts them back, tells which of them a call drew from, and remembers the states at the start
of each module call being built.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.module import register_module_forward_pre_hook

from .errors import GraphBuildError, RandomDrawError
from .returned_inputs import _RECORDING
from .scope_replay import STATE
from .symbolic import SymbolicTensor
from .trees import tree_leaves

__all__ = ["GeneratorStates", "snapshot", "snapshot_for", "restore", "drawn_from", "note_call_start", "call_start",
           "forget_call_starts", "watch_call_starts", "unwatch_call_starts", "watching_draws"]

_CALL_IMPL_CODE = nn.Module._call_impl.__code__

# NOTE: [Draws outside torch] numpy and Python draw without telling torch, so no TorchFunctionMode
# sees them (torch's own draws are seen call by call: NOTE: [Random draws in a forward] in
# tracing.py). A looked-through forward of tg.from_module that draws from numpy's global generator
# (HuggingFace Wav2Vec2's SpecAugment: `np.random.rand()`, `np.random.choice`), Python's `random`
# (`random.uniform(0, 1) < self.layerdrop`), or a numpy/Python generator object stored on the module
# or one of its submodules would be recorded once, its draws baked into the graph as constants,
# while the module draws anew at every call. So a recording compares these generators' states
# before and after (watching_draws; reading numpy's takes ~30 us, too slow for every call); after a
# change it is made again with each looked-through call comparing its own, and the innermost call
# that drew raises: that module stays one opaque layer (it draws at run time, exactly as eager
# under the same seeds), or, for the root module, the build fails. A layer's own draws are put back
# when its call returns, so its callers see none.
# Not seen: a generator made inside the forward. `np.random.default_rng()` without a seed draws from
# the operating system's entropy; eager gives different numbers at every call and no seed
# reproduces them, so a recording cannot be compared with eager either; such a module must be kept
# as a layer by hand (leaf_modules=[...]). `np.random.default_rng(seed)` with a fixed seed draws
# the same numbers at every call, which a recording reproduces exactly.
_OWNED_TYPES = (np.random.Generator, np.random.RandomState, random.Random)
_TORCH_LAYERS = "torch.nn.modules."


class GeneratorStates(NamedTuple):
    """The states of torch's CPU generator, numpy's global generator, Python's ``random`` (None when
    not taken) and ``owned``: ``(generator, state)`` for generator objects stored on the modules."""

    torch: torch.Tensor
    numpy: tuple | None
    python: tuple | None
    owned: tuple = ()


def snapshot(modules=()) -> GeneratorStates:
    """The generators' states now, with those of the generator objects stored on ``modules``.

    Example:
        >>> import numpy as np
        >>> states = snapshot()
        >>> first = np.random.rand()
        >>> restore(states)
        >>> np.random.rand() == first
        True
    """
    owned = tuple((g, _state_of(g)) for m in modules for g in vars(m).values() if isinstance(g, _OWNED_TYPES))
    return GeneratorStates(torch.get_rng_state(), np.random.get_state(), random.getstate(), owned)


def snapshot_for(module: nn.Module) -> GeneratorStates:
    """The states a call of ``module`` may draw from: torch's only when every module in it is torch.nn's
    own (torch's layers never draw from numpy or Python; numpy's state takes ~30 us to read)."""
    modules = list(module.modules())
    if all(type(m).__module__.startswith(_TORCH_LAYERS) for m in modules):
        return GeneratorStates(torch.get_rng_state(), None, None)
    return snapshot(modules)


def restore(states: GeneratorStates) -> None:
    """Put the generators back in ``states`` (from :func:`snapshot`)."""
    torch.set_rng_state(states.torch)
    if states.numpy is not None:
        np.random.set_state(states.numpy)
    if states.python is not None:
        random.setstate(states.python)
    for generator, state in states.owned:
        if isinstance(generator, np.random.Generator):
            generator.bit_generator.state = state
        elif isinstance(generator, np.random.RandomState):
            generator.set_state(state)
        else:
            generator.setstate(state)


def drawn_from(before: GeneratorStates) -> list[str]:
    """The generators outside torch (``np.random``, ``random``, a module's own) drawn from since ``before``.

    Example:
        >>> import random
        >>> states = snapshot()
        >>> _ = random.random()
        >>> drawn_from(states)
        ['random']
    """
    drawn = []
    if not _same(np.random.get_state(), before.numpy):
        drawn.append("np.random")
    if random.getstate() != before.python:
        drawn.append("random")
    drawn += [f"a {type(g).__name__} of the module" for g, state in before.owned if not _same(_state_of(g), state)]
    return drawn


def _state_of(generator):
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    return generator.get_state() if isinstance(generator, np.random.RandomState) else generator.getstate()


def _same(a, b) -> bool:
    """Whether two generator states are equal (they nest tuples, dicts, numpy arrays and numbers)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


# NOTE: [Generator states at a call's start] A layer's forward may draw before it first uses its
# inputs (`if np.random.rand() < p: return x * 0`, LayerDrop's `torch.rand([]) < p` before the first
# layer): the original call draws for real before torchgraph sees the call at all, so its scope
# opens on generators that have moved on. Its shadow runs must start from the states the call
# started from, so a forward pre-hook notes them: tg.from_module's own hooks on the modules it
# records (watching_draws), and in hand-written builds a process-wide pre-hook that exists while,
# and only while, some thread builds (as the forward hook of NOTE: [Returned inputs] in
# returned_inputs.py). The states are keyed by the call's module and args tuple, which open_scope
# finds in the call's frame; a call whose pre-hooks replace its args tuple is not found, and its
# shadow runs start from the states at the scope's opening (as before this note).

class _Starts(threading.local):
    def __init__(self):
        self.by_call: dict[tuple[int, int], tuple] = {}


_STARTS = _Starts()
_WATCH = None


def note_call_start(module: nn.Module, args: tuple, states: GeneratorStates | None = None) -> None:
    """Remember the generators' states at the start of ``module(*args)`` (from a forward pre-hook)."""
    _STARTS.by_call[(id(module), id(args))] = (module, args, states or snapshot_for(module))


def call_start(module: nn.Module, args: tuple) -> GeneratorStates | None:
    """The states noted at the start of this call of ``module`` (forgotten then), or None."""
    entry = _STARTS.by_call.pop((id(module), id(args)), None)
    return None if entry is None or entry[0] is not module or entry[1] is not args else entry[2]


def forget_call_starts() -> None:
    """Drop the states of calls that never opened a scope (at the end of a recording or a build)."""
    _STARTS.by_call.clear()


def watch_call_starts() -> None:
    """Some thread started building: note the generator states at each layer call's start. Called
    with returned_inputs.watch_builds, under the build hold's lock."""
    global _WATCH
    if _WATCH is None:
        _WATCH = register_module_forward_pre_hook(_note_in_hand_written_builds)


def unwatch_call_starts() -> None:
    """No thread builds any more: remove the process-wide pre-hook."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.remove()
        _WATCH = None


def _note_in_hand_written_builds(module, args):
    if STATE.run is not None or _RECORDING.from_module or _torch_leaf(module) or torch.compiler.is_compiling():
        # shadow runs need no start; tg.from_module notes its own layers' starts (watching_draws);
        # torch.compile of a model in a thread that is building traces its calls (no build's layers)
        return None
    from .type_info import building

    if building() and (not args or any(isinstance(leaf, SymbolicTensor) and leaf._tg_value is not None
                                       for _, leaf in tree_leaves(args))):
        note_call_start(module, args)  # a layer called on linked symbolic tensors (or on keywords only)
    return None


class _Draws:
    """What :func:`watching_draws` saw: ``outside_torch`` lists the generators drawn from by
    looked-through code during the whole recording (checked at its end, when not checked call by call)."""

    def __init__(self):
        self.outside_torch: list[str] = []


@contextlib.contextmanager
def watching_draws(transparent: list[nn.Module], layers: list[nn.Module], each_call: bool = False):
    """While tg.from_module records: the layers' calls note the states they start from and put them
    back when they return (their draws are run time's). Looked-through code that drew from a generator
    outside torch (NOTE: [Draws outside torch]) is found at the end of the recording (the generators'
    states are read ~30 us each, too slow for every call); with ``each_call``, each looked-through call
    checks its own draws and raises, so that the module that drew stays one layer.

    Example (what tg.from_module does):
        >>> with watching_draws([module], []) as draws:  # doctest: +SKIP
        ...     module(x)
        >>> draws.outside_torch  # doctest: +SKIP
        ['np.random']
    """
    starts: dict[tuple[int, int], GeneratorStates] = {}
    layer_ids = {id(m) for m in layers}

    def before(module, args):
        if STATE.run is None and not _inside_layer(layer_ids, module):
            # A layer runs its submodules' forwards too; a looked-through call checks its own generators
            # (each looked-through submodule checks its own).
            layer = id(module) in layer_ids
            states = starts[(id(module), id(args))] = snapshot_for(module) if layer else snapshot((module,))
            if layer:
                note_call_start(module, args, states)

    def after(module, args, output):
        states = starts.pop((id(module), id(args)), None)
        if states is None:
            return
        if id(module) in layer_ids:
            restore(states)
            return
        drawn = drawn_from(states)
        if drawn:
            raise RandomDrawError(_draw_outside_torch(module, drawn))

    handles = []
    # torch.nn's own modules (nn.Sequential looked through, nn.Linear as a layer) draw from torch only.
    for m in [*transparent, *layers] if each_call else layers:
        if type(m).__module__.startswith(_TORCH_LAYERS) and (id(m) not in layer_ids or not m._modules):
            continue
        handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    draws = _Draws()
    whole = None if each_call else snapshot(transparent)
    try:
        yield draws
        if whole is not None:
            draws.outside_torch = drawn_from(whole)
    finally:
        for handle in handles:
            handle.remove()
        forget_call_starts()


def _torch_leaf(module: nn.Module) -> bool:
    """torch.nn's own layers without submodules draw only from torch, on their inputs."""
    return not module._modules and type(module).__module__.startswith(_TORCH_LAYERS)


def _inside_layer(layer_ids: set[int], module: nn.Module) -> bool:
    """Whether this call of ``module`` happens inside the call of one of the layers (not itself)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code is _CALL_IMPL_CODE:
            outer = f.f_locals.get("self")
            if outer is not module and id(outer) in layer_ids:
                return True
        f = f.f_back
    return False


def _draw_outside_torch(module: nn.Module, drawn: list[str]) -> str:
    # One line, under 300 characters: tg.from_module quotes the first line of the error it falls back on.
    generators = " and ".join(drawn)
    return (f"{type(module).__name__}.forward draws random numbers from {generators}, which a graph would hold "
            "as constants while the module draws anew at every call (NOTE: [Draws outside torch]). Expected torch "
            "draws on the inputs' values, or none; received a change of their state during the call.")
