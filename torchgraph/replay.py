"""Replay: rebuild a model by calling its layers and functions again on fresh ``tg.Input`` tensors.

The common core of ``from_config`` (nodes read from a config) and ``clone_model`` (nodes read from a
model's graph). Replaying through the symbolic API checks every shape again and gives an ordinary
``tg.Model`` with the same ``model.code`` and ``state_dict`` keys.

Example:
    >>> import torch, torch.nn as nn, torchgraph as tg
    >>> from torchgraph.replay import Ref, replay
    >>> layer = nn.Linear(4, 2)
    >>> model = replay([("x", (4,), torch.float32)], "single",
    ...                [("call_module", "linear", layer, (Ref("x"),), {})], Ref("linear"), "Tiny",
    ...                {"linear": layer})
    >>> model(torch.randn(3, 4)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import GraphBuildError
from .sizes import record_int_op, standin_value
from .untrusted import BuildLimitError

__all__ = ["Ref", "replay", "get_attr", "input_shape", "spec_dim"]


class Ref:
    """A reference to an earlier node's value inside replayed arguments."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


def get_attr(model: nn.Module, target: str):
    """``model.a.b`` for ``target="a.b"``."""
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def spec_dim(spec, i: int):
    """Dim ``i`` of a value's spec: its size, or its dynamic dim (with ``name``, and ``min``/``max`` when
    this torchgraph has bounded dims): from the spec's own ``dims`` when it keeps them, else found
    again by the dim's probe sizes."""
    from . import symbolic

    dims = getattr(spec, "dims", None)
    if dims is not None and i < len(dims):
        return dims[i]
    return symbolic.dim_for_probes(spec.probes[0][i], spec.probes[1][i])


def input_shape(spec) -> tuple:
    """The ``tg.Input`` shape (no batch dim) of a placeholder's spec: ints, ``None``, names, and
    ``tg.Dim`` for dims with bounds (when this torchgraph has ``tg.Dim``)."""
    from . import symbolic

    dim_class = getattr(symbolic, "Dim", None)
    shape = []
    for i, d in enumerate(spec.shape[1:], start=1):
        if isinstance(d, int):
            shape.append(d)
            continue
        dim = spec_dim(spec, i)
        low, high = getattr(dim, "min", 0) or 0, getattr(dim, "max", None)
        if dim_class is not None and (low or high is not None):
            shape.append(dim_class(d, min=low, max=high))
        else:
            shape.append(d)
    return tuple(shape)


def replay(*args, **kwargs):
    """:func:`_replay` as a build of its own: its probe sizes never depend on, or leak into, other
    builds (NOTE: [Probe sizes] in dims.py). Arguments as :func:`_replay`."""
    from .dims import new_build

    new_build()
    try:
        return _replay(*args, **kwargs)
    finally:
        new_build()


def _replay(inputs: list[tuple], input_kind: str, nodes: list[tuple], outputs: Any, name: str,
            layers: dict[str, nn.Module], untrusted: bool = False, input_tensors: Any = None,
            call_function: Callable | None = None, construct: Callable | None = None,
            env: dict | None = None, fixed_names: dict[int, str] | None = None):
    """Rebuild a model by calling layers and functions on fresh ``tg.Input`` tensors.

    Args:
        inputs: ``(name, shape without batch, dtype)`` per input, in ``forward`` order; a shape dim
            may be an int, ``None``, a name or a ``tg.Dim``.
        input_kind: ``"single"``, ``"list"``, ``"tuple"`` or ``"dict"``.
        nodes: ``(op, name, target, args, kwargs)`` in program order; ``target`` is resolved (a module,
            a function, a method name, or the constant tensor of a ``get_attr``); arguments hold
            :class:`Ref` for earlier nodes.
        outputs: the output structure, with :class:`Ref` leaves.
        name: the model's name.
        layers: layer name -> module; each gets that name in the rebuilt model unless it was given
            another with ``tg.name``. A dotted name (a module path of ``tg.from_module`` or
            ``tg.scope``) holds for this model only (NOTE: [Fixed paths] in naming.py).
        untrusted: require every function call to consume a symbolic value (a config cannot make
            torchgraph compute on plain numbers) and turn every failure into a ``ValueError``.
        input_tensors: symbolic tensors to build on instead of fresh inputs (one per input, in
            order), as ``tg.clone_model(..., input_tensors=...)``.
        call_function: ``call_function(layer, *args, **kwargs)`` instead of ``layer(*args, **kwargs)``.
        construct: ``construct(inputs, outputs, name)`` makes the model (default ``tg.Model``).
        env: a dict that receives node name -> the symbolic value replaying the node gave.
        fixed_names: ``id(constant tensor or layer) -> name``: the rebuilt model gives these objects
            these attribute names and ``state_dict`` keys (module paths such as
            ``embeddings.position_ids`` included), for this model only (the ``get_attr`` targets, the
            layers ``clone_model`` shares with the original).
    """
    from .model import Model
    from .naming import fixed_paths, name as set_name, user_name
    from .tracing import RecordingMode
    from .trees import tree_map
    from .symbolic import Input, SymbolicInt, SymbolicTensor, _StandIn

    paths = dict(fixed_names or {})
    for layer_name, layer in layers.items():
        if user_name(layer) is not None:  # named with tg.name (in clone_function): keeps its name
            continue
        if "." in layer_name or layer_name.isdigit():  # a module path ("0" of a Sequential): not a tg.name
            paths[id(layer)] = layer_name
        else:
            set_name(layer, layer_name)

    env = {} if env is None else env
    if input_tensors is None:
        for input_name, shape, dtype in inputs:
            env[input_name] = Input(shape=shape, dtype=dtype, name=input_name)
    else:
        for (input_name, _, _), tensor in zip(inputs, input_tensors):
            env[input_name] = tensor

    # A device or dtype read from a value (`torch.arange(12, device=x.device)`) counts as computed by
    # the model: the call follows the inputs' device (NOTE: [Device and dtype stand-ins] in symbolic.py).
    symbolic = (SymbolicTensor, SymbolicInt, _StandIn)
    # NOTE: [Replay under RecordingMode] A get_attr node's tensor enters as a symbolic handle
    # (symbolic_handles.constant_value), so operations on it (`cls_token.expand(B, -1, -1)`,
    # `self.pos_ids[:, :n]` of a tg.from_module graph) are recorded again rather than computed once;
    # RecordingMode records a dynamic size passed as a Scalar (`torch.arange(n)`), as tg.from_module did.
    with RecordingMode():
        _replay_nodes(nodes, env, symbolic, untrusted, name, call_function)

    outputs = tree_map(lambda o: _resolve(o, env, name), outputs)
    input_values = [env[n] for n, _, _ in inputs]
    if input_kind == "single":
        model_inputs: Any = input_values[0]
    elif input_kind == "dict":
        model_inputs = {n: env[n] for n, _, _ in inputs}
    else:
        model_inputs = input_values if input_kind == "list" else tuple(input_values)
    construct = construct or (lambda i, o, n: Model(i, o, name=n))
    with warnings.catch_warnings(), fixed_paths(paths):
        warnings.filterwarnings("ignore", message="tg.Model: input .* is not used")
        try:
            return construct(model_inputs, outputs, name)
        except (ValueError, TypeError) as exc:
            raise _as_value_error(exc, f"{name}: rebuilding the model") from None


# NOTE: [Guard conditions] A branch on a dynamic size (`if q_length == 1:`) is recorded as
# `torch._assert(operator.not_(q_length == 1), ...)` (sizes.guard). Called again on a dynamic size,
# operator.not_ and operator.truth would ask for its bool, i.e. guard it anew and answer a plain bool:
# the rebuilt model would lose the recorded assertion (a safe file even refused to load). So they
# are recorded as they were first recorded.
_GUARD_CONDITIONS = (operator.not_, operator.truth)


def _is_dynamic_size(args: tuple) -> bool:
    from .symbolic import SymbolicInt

    return len(args) == 1 and isinstance(args[0], SymbolicInt)


def _resolve(o, env: dict, where: str):
    """``o`` with a node reference replaced by that node's value in ``env`` (defined before its use)."""
    if isinstance(o, Ref):
        if o.name not in env:
            raise ValueError(f"{where}: uses node '{o.name:.80}', which is not defined before it.")
        return env[o.name]
    return o


def _replay_nodes(nodes: list[tuple], env: dict, symbolic: tuple, untrusted: bool, name: str,
                  call_function: Callable | None) -> None:
    """Call each node's layer or function on the values in ``env`` (replay's loop)."""
    from .symbolic import _StandIn
    from .symbolic_handles import constant_value
    from .trees import tree_map

    for op, node_name, target, args, kwargs in nodes:
        where = f"{name}: node '{node_name}'"
        if node_name in env:
            raise ValueError(f"{where}: the name is used twice.")
        if op == "get_attr":
            env[node_name] = constant_value(target)  # NOTE: [Replay under RecordingMode]
            continue
        args = tree_map(lambda o: _resolve(o, env, where), args)
        kwargs = tree_map(lambda o: _resolve(o, env, where), kwargs)
        if untrusted and not _any_leaf(lambda o: isinstance(o, symbolic), (args, kwargs)):
            raise ValueError(f"{where}: a {op} node must take at least one value computed by the model.")
        try:
            if op == "call_module":
                out = call_function(target, *args, **kwargs) if call_function else target(*args, **kwargs)
            elif op == "call_function" and target in _GUARD_CONDITIONS and _is_dynamic_size(args):
                out = record_int_op(target, args)  # NOTE: [Guard conditions]
            elif op == "call_function":
                out = target(*args, **kwargs)
            else:
                out = _call_method(target, args, kwargs, where)
        except (ValueError, TypeError) as exc:  # GraphBuildError is a ValueError
            if untrusted or isinstance(exc, GraphBuildError):
                raise _as_value_error(exc, where) from None
            raise
        except Exception as exc:  # noqa: BLE001 - anything a crafted config triggers is a bad config
            if not untrusted:
                raise
            raise ValueError(f"{where}: {type(exc).__name__}: {exc}") from None
        if isinstance(out, _StandIn):
            standin_value(out)  # NOTE: [Stand-ins replayed in place]
        env[node_name] = out


# NOTE: [Stand-ins replayed in place] A device or dtype read (`x.device`) gives a stand-in whose
# `getattr` record is made when it is first passed to torch, and records are emitted in creation order.
# The config holds that node where the original recording made it: replayed lazily, a later get_attr
# node's record (made when replayed) came first, so HF LLaMA's rebuilt code read `rotary_emb.inv_freq`
# before `embed_tokens.device` and no longer equalled the original's. The record is made here instead.


def _call_method(method: str, args: tuple, kwargs: dict, where: str):
    """``args[0].method(*args[1:], **kwargs)``; ``args[0]`` may be a constant (``cls_token.expand(B, ...)``)."""
    if not args or not isinstance(args[0], torch.Tensor):
        raise ValueError(f"{where}: method '{method}' must be called on a tensor; received "
                         f"{type(args[0]).__name__ if args else 'no arguments'}.")
    return getattr(torch.Tensor, method)(*args, **kwargs)


def _as_value_error(exc: Exception, where: str) -> ValueError:
    text = str(exc)
    if text.startswith(where):  # raised by replay itself: already says where
        return exc if isinstance(exc, ValueError) else ValueError(text)
    if isinstance(exc, (GraphBuildError, BuildLimitError)):
        return type(exc)(f"{where}: {text}")
    return ValueError(f"{where}: {type(exc).__name__}: {text}")


def _any_leaf(pred: Callable[[Any], bool], obj) -> bool:
    from .trees import tree_leaves

    return any(pred(leaf) for _, leaf in tree_leaves(obj))
