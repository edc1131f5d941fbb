"""``tg.from_module``: an existing ``nn.Module`` (torchvision, timm, HuggingFace, your own) as a ``tg.Model``.

The module's forward is called once on symbolic inputs with every non-leaf submodule *transparent*
(see NOTE: [Transparent modules] in ``recording.py``): its operations are recorded one by one, while
leaf modules (``torch.nn`` layers, the ``leaf_modules`` given, nested ``tg.Model`` s, and submodules
that cannot be recorded) become one ``call_module`` node each, named by their module path.

Design constraints:

- The result holds the original's leaf modules, parameters and buffers (shared, not copied) at their
  original paths, in the original order, so ``state_dict()`` has exactly the original's keys and
  ``load_state_dict`` of a checkpoint written for the original works unchanged. Looked-through
  modules become plain ``nn.Module`` containers, as in ``torch.fx.symbolic_trace``.
- No silent difference from the original: a submodule whose forward cannot be recorded faithfully
  stays one opaque layer, with a warning that names it and says why. Detected: errors while
  recording it (data-dependent control flow, iterating a dynamic dim...), forward hooks, state it
  changes outside any recorded operation, and operations that differ between train and eval mode
  (``if self.training:``: the forward is recorded in both modes and compared; a functional dropout
  that follows the mode becomes a dropout layer, see ``mode_dropout.py``).
- The original module is left as it was (modes, buffers).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import torch.nn as nn

from .dims import new_build
from .errors import GraphBuildError, RandomDrawError
from .fidelity import changed_state, differing_scopes, records_in_order, signature, snapshot_state
from .generator_states import GeneratorStates, restore, snapshot, watching_draws
from .emitting import RESERVED_NAMES
from .hierarchy import mirror_hierarchy
from .mode_dropout import record_as_layers
from .naming import ILLEGAL_NAMES, SUBMODULE_NAMES, fixed_paths, reserved_attribute
from .restoring import attribute_snapshot, restore_attributes
from .returned_inputs import linking_returned_inputs
from .scopes import _CALL_IMPL_CODE, looking_through
from .symbolic import Input, SymbolicTensor
from .tracing import RecordingMode, tracing_flags
from .trees import tree_leaves

__all__ = ["from_module", "record_module", "is_leaf_module", "as_model"]

# nn.Sequential runs its children; ModuleList/ModuleDict are never called (nn.Module's own forward).
_CONTAINER_FORWARDS = {nn.Sequential.forward, nn.Module.forward}
_AGAIN = object()  # what _call returns when the recording must be made again


def is_leaf_module(module: nn.Module) -> bool:
    """Whether ``tg.from_module`` keeps ``module`` as one layer by default.

    Leaves: modules whose ``forward`` is torch's own (``nn.Conv2d``, ``nn.LSTM``, ``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer``, subclasses that do not override ``forward``) but the containers
    (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``); ``tg.layers``; nested ``tg.Model`` s.
    Everything else is looked through.

    Example:
        >>> import torch.nn as nn
        >>> is_leaf_module(nn.Conv2d(3, 8, 3)), is_leaf_module(nn.Sequential(nn.ReLU()))
        (True, False)
    """
    from .model import Model

    if isinstance(module, Model):
        return True
    forward = getattr(type(module), "forward", None)
    if forward in _CONTAINER_FORWARDS:
        return False
    return (getattr(forward, "__module__", "") or "").startswith(("torch.nn.", "torchgraph.layers"))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


class _Plan:
    """Which submodules are looked through, which stay layers, and why those that fell back did."""

    def __init__(self, root: nn.Module, leaf_modules):
        self.root = root
        self.paths: dict[int, str] = {}       # id(module) -> first module path
        self.modules: dict[int, nn.Module] = {}
        self.leaves: set[int] = set()         # kept as layers: leaves, given leaf_modules, fallbacks
        self.fallbacks: dict[int, str] = {}   # id -> why it stays opaque (one warning each)
        self.errors: dict[int, BaseException] = {}
        self.mode_layers: dict[int, str] = {}  # id -> path of the layers that stand for F.dropout & co.
        self.called: set[str] = set()       # looked-through module paths that ran in the last recording
        self.watch_each_call = False        # looked-through code drew from numpy or random: find where
        wanted_types = tuple(x for x in leaf_modules if isinstance(x, type))
        wanted_paths = {x for x in leaf_modules if isinstance(x, str)}
        wanted_ids = {id(x) for x in leaf_modules if isinstance(x, nn.Module)}
        skip = ()
        for path, m in root.named_modules(remove_duplicate=False):
            if id(m) in self.paths or (skip and any(path.startswith(p) for p in skip)):
                continue
            self.paths[id(m)] = path
            self.modules[id(m)] = m
            if m is root:
                continue
            wanted = id(m) in wanted_ids or path in wanted_paths or isinstance(m, wanted_types)
            why = None
            if _has_hooks(m) and not wanted and not is_leaf_module(m):
                why = "it has forward or backward hooks, which run around a whole module call"
            if why or wanted or is_leaf_module(m):
                self.leaves.add(id(m))
                skip += (path + ".",)
                if why:
                    self.fallbacks[id(m)] = why
        self.state_ids = {id(t) for t in root.parameters()} | {id(t) for t in root.buffers()}
        unknown = wanted_paths - set(self.paths.values())
        if unknown:
            raise GraphBuildError(
                f"tg.from_module: leaf_modules names {sorted(unknown)}, which are not submodules of "
                f"{type(root).__name__}. Expected module paths as in named_modules() "
                f"(e.g. {[p for p in self.paths.values() if p][:3]}).")

    def transparent(self) -> dict[nn.Module, str]:
        return {m: self.paths[i] for i, m in self.modules.items()
                if i not in self.leaves and not self._under_leaf(self.paths[i])}

    def _under_leaf(self, path: str) -> bool:
        return any(path.startswith(self.paths[i] + ".") for i in self.leaves)

    def fall_back(self, module: nn.Module, why: str, error: BaseException | None = None) -> None:
        self.leaves.add(id(module))
        self.fallbacks[id(module)] = why
        if error is not None:
            self.errors[id(module)] = error

    def describe(self, module: nn.Module) -> str:
        return f"'{self.paths[id(module)]}' ({type(module).__name__})"


def _make_inputs(module: nn.Module, inputs: tuple):
    """``(args, kwargs, settings)`` to call ``module`` with: symbolic tensors (shapes become
    ``tg.Input`` s), and the plain keyword settings of a dict input (``use_cache=False``)."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []

    def make(obj, name, where):
        if isinstance(obj, SymbolicTensor):
            if obj._tg_value is None or obj._tg_value.record.op != "placeholder":
                raise GraphBuildError(f"tg.from_module: {where} must be a tg.Input (or a shape tuple); "
                                      "received a symbolic tensor computed from other inputs.")
            return obj
        if isinstance(obj, (tuple, list)) and not isinstance(obj, torch.Tensor):
            if name is not None and (name in ILLEGAL_NAMES or not name.isidentifier()):
                name = None  # nn.Sequential's `input`: the model names it input_1
            return Input(shape=tuple(obj), name=name)
        raise GraphBuildError(
            f"tg.from_module: {where} must be a tg.Input or the shape of one sample without the batch "
            f"dim (a tuple such as (3, 224, 224)); received {type(obj).__name__}"
            + (f" of shape {tuple(obj.shape)}: a real tensor" if isinstance(obj, torch.Tensor) else "") + ".")

    if not inputs:
        raise GraphBuildError(
            f"tg.from_module: no inputs given for {type(module).__name__}. Expected tg.Input(...)s or "
            "sample shapes after the module, e.g. tg.from_module(model, (3, 224, 224)), or a dict of "
            "them for keyword arguments.")
    if len(inputs) == 1 and isinstance(inputs[0], dict):
        kwargs, constants = {}, {}
        for key, obj in inputs[0].items():
            if not isinstance(key, str) or not key.isidentifier():
                raise GraphBuildError(f"tg.from_module: dict input keys must be forward() argument names; "
                                      f"received {key!r}.")
            if obj is None or isinstance(obj, (bool, int, float, str)):
                constants[key] = obj  # a setting such as use_cache=False: passed, not an input
            else:
                kwargs[key] = make(obj, key, f"input '{key}'")
        return (), kwargs, constants
    args = tuple(make(obj, params[i].name if i < len(params) else None, f"input {i}")
                 for i, obj in enumerate(inputs))
    return args, {}, {}


def _tensor_keys(module: nn.Module) -> dict[int, str]:
    """``id(tensor) -> state_dict key`` (first one) of every parameter and buffer."""
    keys: dict[int, str] = {}
    for key, t in module.named_parameters(remove_duplicate=False):
        keys.setdefault(id(t), key)
    for key, t in module.named_buffers(remove_duplicate=False):
        keys.setdefault(id(t), key)
    return keys


def _call(module: nn.Module, args: tuple, kwargs: dict, plan: "_Plan"):
    leaves = [plan.modules[i] for i in plan.leaves]
    plan.called = set()
    transparent = plan.transparent()
    attributes = attribute_snapshot(module)  # NOTE: [Attributes a recording sets]
    try:
        with looking_through(transparent, leaves, plan.called), tracing_flags(), \
                RecordingMode(plan.state_ids, forwards=True), \
                linking_returned_inputs(leaves), \
                watching_draws(list(transparent), leaves, plan.watch_each_call) as draws:  # NOTE: [Returned inputs]
            outputs = module(*args, **kwargs)
    finally:
        restore_attributes(attributes, tensors=True)
    if draws.outside_torch:  # NOTE: [Draws outside torch]: record again, each call checking its own draws
        plan.watch_each_call = True
        return _AGAIN
    return outputs


# NOTE: [Attributes a recording sets] A forward may re-bind a tensor attribute (Meta's reference LLaMA:
# `self.freqs_cis = self.freqs_cis.to(h.device)`). Recorded, that put a symbolic tensor on the user's
# module: the recording in the other mode then read it instead of the constant (and failed, blaming
# train/eval differences), and the user's own module kept the symbolic tensor after tg.from_module
# returned. Each recording now puts back every tensor attribute the forward re-bound (the recorded graph
# has the operations; the module stays as the user had it), as a layer call's scope does for its module.


def _culprits(exc: BaseException, plan: _Plan) -> list[nn.Module]:
    """Modules of ``plan`` whose calls were on the stack when ``exc`` was raised, outermost first."""
    found = []
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is _CALL_IMPL_CODE:
            module = frame.f_locals.get("self")
            if module is not None and id(module) in plan.paths and (not found or found[-1] is not module):
                found.append(module)
        tb = tb.tb_next
    return found


def _code_location(exc: BaseException) -> str:
    """``file.py:12`` of the innermost traceback frame outside torch and torchgraph (the model's code)."""
    import os

    skip = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))
    where, tb = "", exc.__traceback__
    while tb is not None:
        path = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if not path.startswith(skip[0] + os.sep + "torchgraph") and not path.startswith(skip[1]):
            where = f"{os.path.basename(path)}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().split("\n")[0]
    if not isinstance(exc, GraphBuildError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


def _set_modes(module: nn.Module, modes: dict[nn.Module, bool]) -> None:
    for m, mode in modes.items():
        m.training = mode


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------

def record_module(module: nn.Module, args: tuple, kwargs: dict, leaf_modules=(), plan: _Plan | None = None):
    """Record ``module(*args, **kwargs)`` on symbolic tensors down to its leaf modules.

    The internal entry point of :func:`from_module` (and of passes that inline subclassed modules):
    returns ``(outputs, plan)``, where ``outputs`` holds linked symbolic tensors that a ``tg.Model``
    can be built from (inside ``naming.fixed_paths(plan_paths(plan))`` to keep module paths as layer
    names) and ``plan`` records which submodules stayed layers. Emits one warning per submodule that
    fell back to one opaque layer.
    """
    plan = plan or _Plan(module, list(leaf_modules or ()))
    tensor_keys = _tensor_keys(module)
    modes = {m: m.training for m in module.modules()}
    generators = snapshot(module.modules())  # NOTE: [Same draws in every run] in module_scopes.py
    try:
        paths = plan_paths(plan, tensor_keys)
        with fixed_paths(paths):
            outputs = _record_until_faithful(module, args, kwargs, plan, tensor_keys, modes, paths, generators)
    finally:
        _set_modes(module, modes)
        restore(generators)  # recording drew nothing from the user's generators
    for i, why in plan.fallbacks.items():
        m = plan.modules[i]
        warnings.warn(
            f"tg.from_module: {plan.describe(m)} stays one opaque layer: {why}. Its inner layers are not "
            f"separate nodes of the model (the outputs are still exact). To keep it as a layer without "
            f"this warning, pass leaf_modules=['{plan.paths[i]}'].", UserWarning, stacklevel=3)
    return outputs, plan


def plan_paths(plan: _Plan, tensor_keys: dict[int, str] | None = None) -> dict[int, str]:
    """``id -> name`` for :func:`naming.fixed_paths`: layers by module path, tensors by state_dict key."""
    paths = dict(tensor_keys or _tensor_keys(plan.root))
    paths.update({i: plan.paths[i] for i in plan.leaves})
    paths.update(plan.mode_layers)
    return paths


def _input_effects(args, kwargs, also: tuple = ()) -> tuple:
    """The symbolic inputs' values and the effect records (guards, mutations) on them and on
    ``also``'s values, to undo what a recording that is thrown away left on them: each guard would
    otherwise be in the graph once per try, and an input changed in place (``x += ...`` in the
    top-level forward) would enter the next recording as its changed value."""
    leaves = [leaf for _, leaf in tree_leaves((args, kwargs)) if isinstance(leaf, SymbolicTensor)]
    values = {}
    for v in [leaf._tg_value for leaf in leaves] + [v for saved in also for v, _ in saved[1].values()]:
        for value in (v, v.base):
            values[id(value)] = value
    effects = {i: (v, list(v.effects) if v.effects is not None else None) for i, v in values.items()}
    return [(leaf, leaf._tg_value) for leaf in leaves], effects


def _restore_effects(saved: tuple) -> None:
    assigned, effects = saved
    for leaf, value in assigned:
        leaf._tg_value = value
    for value, recorded in effects.values():
        value.effects = None if recorded is None else list(recorded)


def _record_until_faithful(module, args, kwargs, plan: _Plan, tensor_keys, modes, paths: dict,
                          generators: GeneratorStates):
    before = _input_effects(args, kwargs)
    while True:
        _restore_effects(before)
        paths.update(plan_paths(plan, tensor_keys))  # a fallback is a layer: messages name it by its path
        restore(generators)  # every recording starts from the same draws
        outputs = _record_once(module, args, kwargs, plan)
        if outputs is None:
            continue  # a submodule fell back to one layer: record again
        kept = _input_effects(args, kwargs, also=(before,))
        # NOTE: [Train and eval] A looked-through forward may read self.training (F.dropout(...,
        # training=self.training), `if self.training:`): recorded once, the graph would behave like
        # that mode only. So record with every module in its other mode too and compare, scope by
        # scope; a dropout whose flag was the mode both times becomes a layer (NOTE: [Mode-following
        # dropout as a layer]).
        first_modes = {p: plan.modules[i].training for i, p in plan.paths.items()}
        _set_modes(module, {m: not mode for m, mode in modes.items()})
        _restore_effects(before)  # the other mode starts from the same inputs
        restore(generators)  # and the same draws
        other = _record_once(module, args, kwargs, plan)
        second_modes = {p: plan.modules[i].training for i, p in plan.paths.items()}
        _set_modes(module, modes)
        _restore_effects(kept)
        if other is None:
            continue
        records = records_in_order(outputs)
        first = signature(records, plan.paths, tensor_keys, first_modes)
        second = signature(records_in_order(other), plan.paths, tensor_keys, second_modes)
        scopes = differing_scopes(first, second)
        by_path = {p: plan.modules[i] for i, p in plan.paths.items()}
        if not scopes:
            record_as_layers(records, first, second, by_path, first_modes, plan.mode_layers)
            return outputs
        for s in scopes:
            if s == "" or s not in by_path:
                raise GraphBuildError(
                    f"tg.from_module: {type(module).__name__}.forward records different operations in "
                    "train and eval mode (it reads self.training, or creates random tensors), so one graph "
                    "cannot reproduce it in both modes. Move that code into a submodule (or use "
                    "nn.Dropout & co., which follow the model's mode), or wrap it: "
                    "tg.Model layers can be any nn.Module.")
            plan.fall_back(by_path[s], "its forward records different operations in train and eval mode "
                           "(it reads self.training, or makes random tensors), which a graph cannot follow")


def _record_once(module, args, kwargs, plan: _Plan):
    """One recording; ``None`` when a submodule had to fall back to one layer (then record again)."""
    snapshot = snapshot_state(plan.transparent())
    transparent = plan.transparent()
    try:
        outputs = _call(module, args, kwargs, plan)
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised unless a fallback helps
        changed = changed_state(snapshot)
        stack = _culprits(exc, plan)
        failed_again = [m for m in stack if id(m) in plan.errors]
        if failed_again:
            # It failed as one opaque layer too: the first error (at the innermost layer) is the real one.
            raise plan.errors[id(failed_again[-1])] from None
        candidates = [m for m in stack if m in transparent and m is not module]
        if not candidates:
            hooked = [plan.describe(plan.modules[i]) for i in plan.leaves if _has_hooks(plan.modules[i])]
            if isinstance(exc, GraphBuildError) and hooked and "used outside it" in str(exc):
                raise GraphBuildError(
                    f"tg.from_module: {', '.join(hooked)} has forward hooks; one that changes the output "
                    "cannot be recorded (a recorded module call gives the output of its forward). Remove "
                    f"that hook (hooks that only read the output are fine). While recording: {exc}") from None
            if isinstance(exc, GraphBuildError) and any(id(m) in plan.leaves for m in stack):
                raise  # a layer's own error (a shape mismatch): it names the layer
            where = _code_location(exc)
            fix = ("Use the module as one layer of a tg.Model (x = tg.Input(...); tg.Model(x, module(x))): a "
                   "layer runs its own forward at every call, drawing anew as in eager, in train and eval mode."
                   if isinstance(exc, RandomDrawError) else
                   "Give it inputs that avoid that code (a fixed sequence length, settings in the inputs dict), "
                   "or use the module as one layer of a tg.Model.")
            raise GraphBuildError(
                f"tg.from_module: {type(module).__name__}.forward itself (not a submodule, which could stay "
                f"one layer) cannot be recorded{' at ' + where if where else ''}: {_first_sentence(exc)} "
                f"{fix}") from exc
        culprit = candidates[-1]
        plan.fall_back(culprit, f"recording its forward failed ({_first_sentence(exc)})", exc)
        del changed
        return None
    if outputs is _AGAIN:
        return None
    changed = changed_state(snapshot)
    if changed:
        for owner, name in changed:
            if owner is module:
                raise GraphBuildError(
                    f"tg.from_module: {type(module).__name__}.forward changes its own '{name}' outside any "
                    "operation on the inputs; a graph cannot reproduce that. Move that update into a "
                    "submodule, or wrap the module as one layer of a tg.Model.")
            plan.fall_back(owner, f"its forward changes its own tensor '{name}' in place, outside any "
                           "operation on the inputs")
        return None
    return outputs


def from_module(module: nn.Module, *inputs, leaf_modules=None, name: str | None = None):
    """An existing ``nn.Module`` as a ``tg.Model``: its forward recorded down to leaf modules.

    The module's forward runs once on symbolic inputs (no data, no compute). Operations in it and in
    its submodules' forwards (``nn.Sequential`` stages, ``nn.ModuleList`` loops, subclassed blocks)
    become graph nodes; leaf modules become one layer each, named by their module path
    (``layer1.0.conv1``). So the result's ``state_dict()`` has exactly the original's keys, in the
    same order, and holds the same parameter and buffer objects (shared with ``module``, as
    ``tg.Model`` shares its layers; ``copy.deepcopy(module)`` first for an independent model).
    Outputs equal the original's in train and eval mode, and everything else in torchgraph works on
    the result: ``summary``, ``plot_model``, ``save``, ``export_onnx``, ``optimize``, ``fit``.

    Leaves are ``torch.nn`` layers (``nn.Conv2d``, ``nn.LSTM``, ``nn.TransformerEncoderLayer``...),
    nested ``tg.Model`` s and ``leaf_modules``. A submodule that cannot be recorded faithfully stays
    one opaque layer, with a warning naming it and why: data-dependent Python control flow
    (``if x.sum() > 0``), hooks, in-place changes to its own state outside the recorded operations,
    or code that differs between train and eval mode.

    Args:
        module (nn.Module): the model.
        *inputs: one ``tg.Input`` per positional ``forward`` argument, or the shape of one sample
            without the batch dim (``(3, 224, 224)``, float32, named after the forward argument); or
            a single dict ``{argument name: tg.Input or shape}`` for keyword arguments
            (HuggingFace's ``input_ids``/``attention_mask``); plain values in that dict (``None``,
            bools, numbers, strings: ``"use_cache": False``) are passed as settings, not inputs. An
            argument named after a Python builtin (``input``) is the model's input ``input_``.
        leaf_modules: submodules to keep as one layer each: module instances, classes, or module
            paths (``"encoder.layers.0"``).
        name (str): the model's name; default: the module's class name.

    Returns:
        tg.Model: with the module's outputs (a tensor, a tuple/list, or a dict; a HuggingFace
        ``ModelOutput`` becomes a plain dict).

    Raises:
        GraphBuildError: the module cannot run at the given input shape (naming the innermost layer),
            or its own top-level forward cannot be recorded (the message says why and what to do).

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(8, 8)
        ...     def forward(self, x):
        ...         return x + self.fc(x).relu()
        >>> net = nn.Sequential(Block(), Block(), nn.Linear(8, 2))
        >>> model = tg.from_module(net, (8,))
        >>> list(model.state_dict()) == list(net.state_dict())
        True
        >>> x = torch.randn(4, 8)
        >>> torch.equal(model(x), net(x))
        True
        >>> [n.name for n in model.graph.nodes][:5]
        ['input_1', '_0_fc', 'relu', 'add', '_1_fc']
    """
    from .model import Model

    if not isinstance(module, nn.Module):
        raise TypeError(f"tg.from_module: expected an nn.Module; received {type(module).__name__}.")
    if _has_hooks(module):
        raise GraphBuildError(
            f"tg.from_module: {type(module).__name__} has forward or backward hooks on the module itself; "
            "a recorded graph would not run them. Remove the hooks, or use the module as one layer of a "
            "tg.Model (x = tg.Input(...); tg.Model(x, module(x))).")
    if leaf_modules is not None and not isinstance(leaf_modules, (list, tuple, set)):
        leaf_modules = [leaf_modules]
    _check_own_names(module)
    args, kwargs, settings = _make_inputs(module, inputs)
    try:
        outputs, plan = record_module(module, args, {**kwargs, **settings}, leaf_modules or ())
    except BaseException:
        new_build()  # a failed recording ends its build too (NOTE: [Probe sizes] in dims.py)
        raise
    if hasattr(outputs, "to_tuple") and isinstance(outputs, dict):  # transformers' ModelOutput
        outputs = dict(outputs)
    # A keyword argument named after a Python builtin (torch.nn's and CycleGAN's `forward(self, input)`) cannot be
    # an argument of the generated forward: the model takes it as `input_` (positional inputs: `input_1`).
    model_inputs: Any = ({key + "_" if key in ILLEGAL_NAMES else key: value for key, value in kwargs.items()}
                         if kwargs else (args[0] if len(args) == 1 else list(args)))
    with fixed_paths(plan_paths(plan)), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tg.Model: input .* is not used")
        try:
            model = Model(model_inputs, outputs, name=name or type(module).__name__)
        except GraphBuildError as exc:
            hint = (" A model's outputs must be tensors (in a tuple, list or dict); pass settings that drop the "
                    "others, e.g. {'use_cache': False} in the inputs dict of a HuggingFace model."
                    if "`outputs`" in str(exc) else "")
            raise GraphBuildError(f"tg.from_module: {type(module).__name__}.forward: {exc}{hint}") from None
    types, kinds = mirror_hierarchy(model, module, plan.leaves)
    # The levels of summary/plot depth: modules that ran (an nn.ModuleDict never does itself).
    model.meta["torchgraph"]["scope_types"] = {p: t for p, t in types.items() if p in plan.called}
    model.meta["torchgraph"]["containers"] = kinds
    model.training = module.training
    return model


def _check_own_names(module: nn.Module) -> None:
    """The model holds the module's own submodules, parameters and buffers under their names: none may
    be a tg.Model attribute (except the submodule names the Model yields, NOTE in model.py)."""
    who = type(module).__name__
    for kind, names in (("submodule", module._modules), ("parameter", module._parameters), ("buffer", module._buffers)):
        for name, obj in names.items():
            if name in RESERVED_NAMES and not (kind == "submodule" and name in SUBMODULE_NAMES):
                raise reserved_attribute(f"tg.from_module: {who} has a {kind} '{name}' ({type(obj).__name__})", name)


def as_model(module_or_model, inputs: tuple, who: str, leaf_modules=None):
    """``module_or_model`` itself if it is a ``torch.fx.GraphModule`` (a ``tg.Model``), else
    ``from_module(module_or_model, *inputs)``: what ``tg.summary`` and ``tg.plot_model`` show."""
    import torch.fx as fx

    if isinstance(module_or_model, fx.GraphModule):
        if inputs:
            raise TypeError(f"{who}: inputs are for an nn.Module that is not a tg.Model yet; received "
                            f"{type(module_or_model).__name__}, a model with its own inputs. Drop the inputs.")
        return module_or_model
    if not isinstance(module_or_model, nn.Module):
        raise TypeError(f"{who}: expected a tg.Model or an nn.Module; received {type(module_or_model).__name__}.")
    if not inputs:
        example = f"{who}(model, (3, 224, 224))" if who == "tg.summary" else f"{who}(model, inputs=(3, 224, 224))"
        raise TypeError(f"{who}: expected a tg.Model, or an nn.Module with its inputs; received "
                        f"{type(module_or_model).__name__} without inputs. Give the inputs to record it "
                        f"(tg.Input(...)s or sample shapes without the batch dim), e.g. {example}.")
    return from_module(module_or_model, *inputs, leaf_modules=leaf_modules)
