"""``tg.Sequential``: a stack of layers, each feeding the next, built into a ``tg.Model``.

``tg.Sequential([...])`` records the layers one after the other on a symbolic input and emits the
same ``torch.fx.GraphModule`` that ``tg.Model(x, y)`` would: it *is* a ``tg.Model`` (summary, plots,
copies, pickling, fx passes, ``torch.compile``, nesting in other models all work), validated at
build time with the same errors. ``add(layer)`` and ``pop()`` re-emit the graph in place.

Design constraints:

- One input, one tensor between consecutive steps (Keras' rule). A step is an ``nn.Module``
  (including a ``tg.Model``) or any callable on one tensor (``torch.flatten``, a ``lambda``); the
  callable's torch operations are recorded like any others, so no Python code is kept in the model.
- NOTE: [Rebuilding in place] ``add``/``pop`` rerun ``Model.__init__`` on the same object, once the
  new graph has been validated: every reference to the model stays valid, hooks and the training
  flag are kept, and existing layers keep their names (hence their ``state_dict`` keys).
- NOTE: [Deferred build] Without an input (no ``tg.Input`` first, no ``input_shape``) the model is
  *unbuilt*: its layers are kept (and registered, so ``parameters()`` and ``.to()`` work) and the
  graph is emitted from the first tensor it is called on, or by ``build(input_shape)``, like Keras.
  Every dim but the batch is then fixed to that tensor's size.
- The positions of the steps in the graph are stored as node names in
  ``model.meta["torchgraph_sequential"]``, so ``pop`` and ``add`` also work on a copy or a loaded model.
  Its config is a model config with ``"class": "torchgraph.Sequential"`` and ``"steps"`` (those node
  names); an unbuilt one lists its layers and ``"steps"`` as ``{"layer": name}`` /
  ``{"function": name}``, and comes back unbuilt.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch
import torch.fx as fx
import torch.nn as nn

from . import naming
from .errors import GraphBuildError
from .model import Model, reserved_layer_names
from .naming import assign_layer_names
from .symbolic import Input, SymbolicTensor
from .symbolic_handles import symbolic_handles

__all__ = ["Sequential"]

_KEY = "torchgraph_sequential"


def _empty_graph() -> fx.Graph:
    graph = fx.Graph()
    graph.output(None)
    return graph


@contextlib.contextmanager
def _pinned_names(children: dict[str, nn.Module]):
    """Existing layers keep their current names while the graph is re-emitted."""
    previous = {}
    for layer_name, module in children.items():
        previous[module] = naming.user_name(module)
        naming.name(module, layer_name)
    try:
        yield
    finally:
        for module, old in previous.items():
            if old is None:
                naming._USER_NAMES.pop(module, None)
            else:
                naming._USER_NAMES[module] = old


def _check_step(step, index: int, who: str):
    if isinstance(step, SymbolicTensor):
        raise GraphBuildError(
            f"{who}: element {index} is a symbolic tensor. Expected the tg.Input only as the first "
            "element (a tensor computed by other layers cannot start a Sequential: use tg.Model)."
        )
    if inspect.isclass(step):
        where = "nn." if step.__module__.startswith("torch.nn") else f"{step.__module__}."
        raise GraphBuildError(
            f"{who}: element {index} is the class {where}{step.__qualname__}, not a layer. Expected an "
            f"instance; did you mean {where}{step.__qualname__}(...)?"
        )
    if not isinstance(step, nn.Module) and not callable(step):
        raise GraphBuildError(
            f"{who}: element {index} is a {type(step).__name__}. Expected an nn.Module (or a callable "
            f"on one tensor); received {step!r:.80}."
        )
    return step


def _input_like(x: torch.Tensor, who: str) -> SymbolicTensor:
    """A ``tg.Input`` with the per-sample shape and dtype of ``x`` (a real or symbolic tensor)."""
    if isinstance(x, SymbolicTensor):
        if x._tg_value is None:
            raise GraphBuildError(
                f"{who}: an unbuilt Sequential was called inside another module's forward. Build it "
                "first: give input_shape=..., a tg.Input first, or call seq.build(input_shape)."
            )
        return Input(shape=x._tg_value.shape[1:], dtype=x._tg_value.dtype)
    if x.dim() == 0:
        raise GraphBuildError(f"{who}: cannot build from a 0-d tensor: the first dim is the batch.")
    return Input(shape=tuple(x.shape[1:]), dtype=x.dtype)


class Sequential(Model):
    """A ``tg.Model`` made of layers applied one after the other.

    Args:
        layers (list): ``nn.Module`` s (or callables on one tensor), optionally preceded by a
            ``tg.Input`` that gives the input's shape, dtype and name.
        input_shape (tuple): the shape of one sample (no batch dim), instead of a ``tg.Input``.
        name (str): the model's name (its class name in ``repr`` and ``summary``);
            default ``"Sequential"``.

    Without an input (no ``tg.Input``, no ``input_shape``) the model is built from the first tensor
    it is called on, or by :meth:`build` (see ``built``).

    Raises:
        GraphBuildError: a layer that does not accept the previous layer's output (naming it and
            its position), a step returning anything but one tensor, a non-layer element.

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> model = tg.Sequential([tg.Input(shape=(784,)), nn.Linear(784, 128), nn.ReLU()])
        >>> model.add(nn.Linear(128, 10))
        >>> model(torch.randn(2, 784)).shape
        torch.Size([2, 10])
        >>> isinstance(model, tg.Model), [name for name, _ in model.named_children()]
        (True, ['linear', 're_lu', 'linear_1'])
    """

    # TorchScript must not try to compile the introspection properties.
    __jit_unused_properties__ = Model.__jit_unused_properties__ + ["built"]

    def __init__(self, layers=None, input_shape=None, name: str | None = None, *,
                 class_name: str | None = None, **kwargs):
        if isinstance(input_shape, fx.Graph):
            # Raw GraphModule construction (fx copies and unpickling): (root, graph).
            super().__init__(layers, input_shape, class_name=class_name or name or "Sequential", **kwargs)
            return
        if kwargs:
            raise TypeError(f"tg.Sequential: unexpected keyword argument(s) {sorted(kwargs)}.")
        if name is not None and (not isinstance(name, str) or not name.isidentifier()):
            raise GraphBuildError(f"tg.Sequential: name must be a Python identifier; received {name!r}.")
        who = f"tg.Sequential '{name or 'Sequential'}'"
        if layers is None:
            layers = []
        if isinstance(layers, (nn.Module, SymbolicTensor)) or not isinstance(layers, (list, tuple)):
            raise GraphBuildError(f"{who}: `layers` must be a list of layers; received "
                                  f"{type(layers).__name__}. Wrap it: tg.Sequential([layer]).")
        layers = list(layers)
        inp, offset = None, 0
        if layers and isinstance(layers[0], SymbolicTensor):
            inp, offset = layers.pop(0), 1
            if input_shape is not None:
                raise GraphBuildError(f"{who}: received both a tg.Input and input_shape={input_shape!r}. "
                                      "Give one of them.")
        elif input_shape is not None:
            inp = Input(shape=input_shape)
        steps = [_check_step(s, i + offset, who) for i, s in enumerate(layers)]
        super().__init__({}, _empty_graph(), class_name=name or "Sequential")
        self._set_unbuilt([])
        if inp is not None:
            self._build(inp, steps)
        else:
            self._set_unbuilt(steps)

    # ------------------------------------------------------------------ state
    def _set_unbuilt(self, steps: list) -> None:
        self.meta["torchgraph"] = {"name": self._get_name(), "input_names": [], "input_kind": "list",
                                   "output_kind": "list", "output_keys": None, "output_names": []}
        self.meta[_KEY] = {"steps": None}
        modules = [s for s in steps if isinstance(s, nn.Module)]
        for key in list(self._modules):
            delattr(self, key)
        names = assign_layer_names(list(dict.fromkeys(modules)), reserved_layer_names(type(self)))
        for m in dict.fromkeys(modules):
            self.add_module(names[id(m)], m)
        self.__dict__["_tg_pending"] = list(steps)

    @property
    def built(self) -> bool:
        """Whether the graph exists (an input shape is known)."""
        return self.meta.get(_KEY, {}).get("steps") is not None

    @property
    def layers(self) -> list[nn.Module]:
        """The layers, each once, in order (also before the model is built)."""
        if not self.built:
            pending = self.__dict__.get("_tg_pending", [])
            return list(dict.fromkeys(s for s in pending if isinstance(s, nn.Module)))
        return super().layers

    def _who(self) -> str:
        return f"tg.Sequential '{self._get_name()}'"

    def _apply_step(self, step, h: SymbolicTensor, index: int, previous: list[nn.Module]) -> SymbolicTensor:
        """``step(h)``; errors name the step by position and (future) layer name."""
        if isinstance(step, nn.Module):
            names = assign_layer_names(list(dict.fromkeys(previous + [step])), reserved_layer_names(type(self)))
            what = f"layer {index} '{names[id(step)]}' ({type(step).__name__})"
        else:
            what = f"step {index} ({getattr(step, '__qualname__', type(step).__name__)})"
        try:
            out = step(h)
        except GraphBuildError as exc:
            raise GraphBuildError(f"{self._who()}, {what}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a user callable failing: add which step it was
            raise GraphBuildError(f"{self._who()}, {what} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, SymbolicTensor) or out._tg_value is None:
            kind = type(out).__name__ + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
            raise GraphBuildError(
                f"{self._who()}, {what} returned a {kind}. Expected one tensor: each layer of a Sequential "
                "feeds the next. Add a step that selects one (e.g. `lambda out: out[0]` after an LSTM), "
                "or use tg.Model for several outputs."
            )
        return out

    def _build(self, inp: SymbolicTensor, steps: list, previous_steps: list | None = None) -> None:
        """Record ``steps`` after ``inp`` and re-emit this model (NOTE: [Rebuilding in place])."""
        if not isinstance(inp, SymbolicTensor) or inp._tg_value is None or \
                inp._tg_value.record.op != "placeholder":
            raise GraphBuildError(f"{self._who()}: the first element must be a tg.Input (or give "
                                  "input_shape=...); received a tensor computed by other layers.")
        names = list(previous_steps or [])
        h = self.outputs[0] if names else inp
        outs = [] if names else [h]
        modules = list(self.layers) if names else []
        start = len(names) if names else 1
        with _pinned_names(dict(self.named_children()) if self.built else {}):
            for i, step in enumerate(steps):
                h = self._apply_step(step, h, start + i, modules)
                if isinstance(step, nn.Module):
                    modules.append(step)
                outs.append(h)
            self._emit(inp, h)
        nodes = {id(obj._tg_value): n for n, obj in symbolic_handles(self)["nodes"].items()
                 if isinstance(obj, torch.Tensor) and getattr(obj, "_tg_value", None) is not None}
        names += [nodes[id(o._tg_value)] for o in outs]
        self.meta[_KEY] = {"steps": names}

    def _emit(self, inp: SymbolicTensor, out: SymbolicTensor) -> None:
        keep = {k: v for k, v in self.__dict__.items() if "hook" in k}
        training = self.training
        children = dict(self.named_children()) if self.built else {}
        with _pinned_names(children):
            Model.__init__(self, inp, out, name=self._get_name())
        self.__dict__.update(keep)
        self.__dict__.pop("_tg_pending", None)
        self.__dict__.pop("_tg_checks", None)
        self.training = training

    # ------------------------------------------------------------------ Keras-style editing
    def add(self, layer) -> None:
        """Append ``layer`` (an ``nn.Module``, a callable, or a ``tg.Input`` on an empty model).

        The layer is called on the current output right away: a mismatch raises ``GraphBuildError``
        naming it, and leaves the model unchanged.

        Example:
            >>> import torch.nn as nn, torchgraph as tg
            >>> model = tg.Sequential()
            >>> model.add(tg.Input(shape=(4,)))
            >>> model.add(nn.Linear(4, 2))
            >>> model.outputs[0].shape
            (None, 2)
        """
        if isinstance(layer, SymbolicTensor):
            if self.built or self.__dict__.get("_tg_pending"):
                raise GraphBuildError(f"{self._who()}: a tg.Input can only be added first, to an empty "
                                      "Sequential. This one already has an input or layers.")
            self._build(layer, [])
            return
        step = _check_step(layer, len(self.meta[_KEY]["steps"] or []), self._who())
        if self.built:
            self._build(self.inputs[0], [step], previous_steps=self.meta[_KEY]["steps"])
        else:
            self._set_unbuilt(self.__dict__.get("_tg_pending", []) + [step])

    def pop(self):
        """Remove the last layer (re-emitting the graph); return it (``None`` for a plain callable).

        Example:
            >>> import torch.nn as nn, torchgraph as tg
            >>> model = tg.Sequential([nn.Linear(4, 8), nn.ReLU()], input_shape=(4,))
            >>> model.pop()
            ReLU()
            >>> model.outputs[0].shape
            (None, 8)
        """
        if not self.built:
            pending = list(self.__dict__.get("_tg_pending", []))
            if not pending:
                raise GraphBuildError(f"{self._who()}: pop() on an empty Sequential.")
            last = pending.pop()
            self._set_unbuilt(pending)
            return last if isinstance(last, nn.Module) else None
        steps = self.meta[_KEY]["steps"]
        if len(steps) < 2:
            raise GraphBuildError(f"{self._who()}: pop() with no layers left (only the input).")
        last_node = next(n for n in self.graph.nodes if n.name == steps[-1])
        removed = self.get_submodule(last_node.target) if last_node.op == "call_module" else None
        inp, out = self.inputs[0], self.get_output(steps[-2])
        self._emit(inp, out)
        self.meta[_KEY] = {"steps": steps[:-1]}
        return removed

    def build(self, input_shape, dtype: torch.dtype = torch.float32) -> None:
        """Emit the graph of an unbuilt model for samples of ``input_shape`` (no batch dim).

        Example:
            >>> import torch.nn as nn, torchgraph as tg
            >>> model = tg.Sequential([nn.Linear(4, 2)])
            >>> model.built
            False
            >>> model.build((4,))
            >>> model.outputs[0].shape
            (None, 2)
        """
        if self.built:
            raise GraphBuildError(f"{self._who()}: build() on a model that is already built (its input "
                                  f"is {self.inputs[0].shape}).")
        self._build(Input(shape=input_shape, dtype=dtype), list(self.__dict__.get("_tg_pending", [])))

    # ------------------------------------------------------------------ calling, copying
    def __call__(self, *args, **kwargs):
        if not self.built:
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"{self._who()} is not built yet: call it on one tensor (its shape "
                                "builds the model), or call build(input_shape) first.")
            self._build(_input_like(args[0], self._who()), list(self.__dict__.get("_tg_pending", [])))
        return super().__call__(*args, **kwargs)

    def __deepcopy__(self, memo):
        if self.built:
            return super().__deepcopy__(memo)
        return Sequential(copy.deepcopy(self.__dict__.get("_tg_pending", []), memo), name=self._get_name())

    def __reduce__(self):
        if self.built:
            return super().__reduce__()
        return (Sequential, (list(self.__dict__.get("_tg_pending", [])), None, self._get_name()))

    # ------------------------------------------------------------------ architecture as data
    def get_config(self) -> dict:
        """The model config plus ``"steps"`` (see the module docstring); revived by ``from_config``.

        Example:
            >>> import torch.nn as nn, torchgraph as tg
            >>> unbuilt = tg.Sequential([nn.Linear(4, 8), nn.ReLU()])
            >>> revived = tg.Model.from_config(unbuilt.get_config())
            >>> type(revived).__name__, revived.built, len(revived.layers)
            ('Sequential', False, 2)
        """
        if self.built:
            config = super().get_config()
            config["steps"] = list(self.meta[_KEY]["steps"])
            return config
        from .config import FORMAT, FORMAT_VERSION
        from .config_functions import function_name
        from .layer_config import SEQUENTIAL_CLASS, layer_to_config

        names = {id(m): n for n, m in self.named_children()}
        layers, steps = [], []
        for i, step in enumerate(self.__dict__.get("_tg_pending", [])):
            where = f"{self._who()}: step {i}"
            if isinstance(step, nn.Module):
                name = names[id(step)]
                if all(e["name"] != name for e in layers):
                    layers.append({"name": name, **layer_to_config(step, f"{where} '{name}'")})
                steps.append({"layer": name})
            else:
                steps.append({"function": function_name(step, where)})
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "name": self._get_name(),
                "training": bool(self.training), "class": SEQUENTIAL_CLASS, "inputs": [],
                "input_kind": "single", "layers": layers, "constants": [], "nodes": [], "outputs": None,
                "steps": steps}


def sequential_from_config(cls: type, config) -> Sequential:
    """A ``tg.Sequential`` (or subclass) from its config: built, or unbuilt with its pending layers."""
    from .config import build_model, parse_header
    from .config_functions import resolve_function
    from .layer_config import layer_from_config

    parse_header(config, frozenset({"steps"}))
    steps = config.get("steps")
    if not isinstance(steps, list) or len(steps) > 100_000:
        raise ValueError("from_config: a Sequential's 'steps' must be a list (of node names, or of "
                         "{\"layer\": name} / {\"function\": name} for an unbuilt one).")
    if config.get("inputs") == [] and all(isinstance(s, dict) for s in steps):
        return _unbuilt_from_config(cls, config, steps, layer_from_config, resolve_function)
    if not steps or not all(isinstance(s, str) for s in steps):
        raise ValueError("from_config: a built Sequential's 'steps' must be a non-empty list of node names.")

    def construct(inputs, outputs, name):
        return as_sequential(cls, Model(inputs, outputs, name=name), steps)

    return build_model(cls, config, construct=construct, extra_keys=frozenset({"steps"}))


def as_sequential(cls: type, model: Model, steps: list[str]) -> Sequential:
    """``model`` (a chain whose step outputs are the nodes ``steps``) as a ``tg.Sequential``."""
    nodes = {n.name: n for n in model.graph.nodes}
    out_node = next(n for n in model.graph.nodes if n.op == "output")
    if any(s not in nodes for s in steps) or nodes[steps[0]].op != "placeholder" or \
            out_node.args[0] is not nodes[steps[-1]]:
        raise ValueError("from_config: a Sequential's 'steps' must name its input, then the node of each "
                         "step, the last one being the output.")
    seq = cls(model, model.graph, class_name=model._get_name())
    seq.meta.update(model.meta)
    seq.meta[_KEY] = {"steps": list(steps)}
    seq.train(model.training)
    return seq


def _unbuilt_from_config(cls, config, steps, layer_from_config, resolve_function):
    from .config import _check_name

    name = _check_name(config.get("name"), "from_config: 'name'")
    if not isinstance(config.get("layers"), list) or config.get("nodes") not in ([], None):
        raise ValueError("from_config: an unbuilt Sequential has 'layers' and no 'nodes'.")
    layers = {}
    for i, entry in enumerate(config["layers"]):
        if not isinstance(entry, dict):
            raise ValueError(f"from_config: layers[{i}]: expected an object.")
        lname = _check_name(entry.get("name"), f"from_config: layers[{i}] 'name'")
        layers[lname] = naming.name(layer_from_config(entry, f"from_config: layer '{lname}'"), lname)
    pending = []
    for i, step in enumerate(steps):
        if set(step) == {"layer"} and step["layer"] in layers:
            pending.append(layers[step["layer"]])
        elif set(step) == {"function"}:
            pending.append(resolve_function(step["function"], f"from_config: steps[{i}]", untrusted=True))
        else:
            raise ValueError(f"from_config: steps[{i}] must be {{\"layer\": <a name in 'layers'>}} or "
                             f"{{\"function\": <a torch function>}}; received {step!r:.80}.")
    model = cls(pending, name=name)
    training = config.get("training", True)
    if not isinstance(training, bool):
        raise ValueError("from_config: 'training' must be a bool.")
    return model.train(training)
