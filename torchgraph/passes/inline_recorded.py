"""Inline a module that ``torch.fx`` cannot trace through ``tg.from_module``'s recording.

NOTE: [Recorded inlining] ``inline_modules`` traces a nested module with ``torch.fx``. A HuggingFace
``BertModel`` used as one layer (``tg.Model(ids, bert(ids, mask)["last_hidden_state"])``) cannot be
traced (``len()`` of a proxy, ``ModelOutput`` construction, mask helpers), so every pass saw one
opaque call and ``tg.optimize`` ran the module as it was. ``tg.from_module`` records such modules
(its own tests: BERT, GPT-2, Llama... exact in train and eval mode), so when fx fails the call is
recorded instead: one ``tg.Input`` per tensor argument, with the call's dtype and dims (the batch
first; a dynamic dim shared by two arguments stays shared, as one named dim), and the arguments
that are not graph values (``None``, bools, numbers, strings) passed as settings. The recording is a
``tg.Model`` whose layers are the module's own submodules at the same paths (``from_module`` mirrors
the hierarchy and shares the parameters), so it takes the module's place in the optimized copy and
is spliced like any nested ``tg.Model``; the caller's original model is never touched (optimize
works on a copy). Anything the recording cannot do (a forward that is not recordable, an argument
that is not a batch-first tensor, a ``*args`` signature) leaves the call opaque, exactly as before;
the recording's warnings about opaque sublayers are silenced (those stay opaque calls inside). A
HuggingFace forward with a ``use_cache`` argument the call leaves out is recorded with
``use_cache=False``: its cache is an object, not a tensor a graph can output, and no other output
depends on it; a caller that reads the cache field finds no such field in the recording, and the
call stays opaque.
"""

from __future__ import annotations

import inspect
import warnings

import torch.fx as fx
import torch.nn as nn

from ..dims import DynamicDim
from ..model import ValueSpec
from ..naming import ILLEGAL_NAMES
from ..symbolic import Dim, Input

__all__ = ["record_for_inlining"]

_SETTINGS = (type(None), bool, int, float, str)


def _input_like(spec, name: str, dims: dict):
    """A ``tg.Input`` with ``spec``'s dtype and dims (``dims`` maps each outer dynamic dim to its
    stand-in, so arguments that share a dim share it here too), or None if ``spec`` is not a
    batch-first tensor."""
    if not isinstance(spec, ValueSpec) or spec.dtype is None:
        return None
    outer = spec.dims or spec.shape  # specs made by inlining hold the dims in their shape
    if not outer:
        return None
    batch = outer[0]
    if not (isinstance(batch, DynamicDim) and batch.name is None and tuple(batch.probes) == (2, 3)):
        return None
    shape = []
    for d in outer[1:]:
        if isinstance(d, DynamicDim):
            key = (d.name, tuple(d.probes), d.min, d.max)
            if key not in dims:
                dims[key] = Dim(d.name or f"inlined_{len(dims)}", min=d.min or None, max=d.max)
            shape.append(dims[key])
        elif isinstance(d, int):
            shape.append(d)
        else:
            return None
    return Input(shape=tuple(shape), dtype=spec.dtype, name=name)


def record_for_inlining(module: nn.Module, node: fx.Node) -> tuple[fx.GraphModule, list] | None:
    """``module``'s forward recorded for the call ``node`` (``tg.from_module``), with the call's
    graph values in the recording's placeholder order; None when it cannot be recorded.

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> from torchgraph.passes.inline_recorded import record_for_inlining
        >>> class Scaled(nn.Module):  # len() of a traced value: torch.fx cannot trace this
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return self.fc(x) * len(x.shape)
        >>> x = tg.Input(shape=(4,))
        >>> model = tg.Model(x, Scaled()(x))
        >>> call = next(n for n in model.graph.nodes if n.op == "call_module")
        >>> recorded, args = record_for_inlining(model.get_submodule(call.target), call)
        >>> [n.op for n in recorded.graph.nodes], args == list(call.args)
        (['placeholder', 'call_module', 'call_method', 'output'], True)
    """
    from ..dims import new_build
    from ..type_info import building

    if building():  # NOTE: [Recording inside optimize]
        return None
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    try:
        return _record(module, node, signature, bound)
    finally:
        new_build()


# NOTE: [Recording inside optimize] A recording is a build: its tg.Inputs start one (probe sizes,
# the finfo replacement and the returned-input hook of type_info.py) and tg.Model ends it. Inside
# tg.optimize that build must end whatever happens, or the process would keep the build hold (every
# nn.Module call in it would pass through the hook), so each attempt ends with new_build(). And a
# thread in the middle of its own build (tg.Inputs made, tg.Model not called yet) is left alone:
# the recording would reset that build's dims, so there the call stays opaque.
def _record(module: nn.Module, node: fx.Node, signature, bound) -> tuple[fx.GraphModule, list] | None:
    """The recording itself: one tg.Input per graph value, plain values as settings."""
    from ..from_module import from_module

    inputs: dict = {}
    values: dict[str, fx.Node] = {}
    dims: dict = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            return None
        if isinstance(value, fx.Node):
            # nn.Sequential's forward takes `input`, a builtin the generated code cannot use as a name
            input_name = f"{name}_" if name in ILLEGAL_NAMES else name
            placeholder = _input_like(value.meta.get("tg_spec"), input_name, dims)
            if placeholder is None:
                return None
            inputs[name], values[input_name] = placeholder, value
        elif isinstance(value, _SETTINGS):
            inputs[name] = value
        else:
            return None
    if not values:
        return None
    if "use_cache" in signature.parameters and "use_cache" not in bound.arguments:
        inputs["use_cache"] = False  # HuggingFace: a cache object is no tensor output (NOTE above)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            recorded = from_module(module, inputs)
        except Exception:  # noqa: BLE001 - not recordable: the call stays opaque, as before
            return None
    placeholders = [n.target for n in recorded.graph.nodes if n.op == "placeholder"]
    if sorted(placeholders) != sorted(values):
        return None
    return recorded, [values[name] for name in placeholders]
