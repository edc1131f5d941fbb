"""Model: the recorded graph between some inputs and outputs, emitted as a ``torch.fx.GraphModule``.

``tg.Model(inputs, outputs)`` walks back from ``outputs`` through the recorded calls to ``inputs``,
checks the graph (disconnected outputs, unused inputs, duplicate names), names the layers, and emits
one ``torch.fx.Graph``. The result *is* a GraphModule: a plain ``nn.Module`` with a generated
``forward`` that calls the layers exactly like handwritten code, and frees every value after its
last use.

What torchgraph needs beyond the fx graph lives in ``model.meta["torchgraph"]`` and in each node's
``node.meta["tg_spec"]`` (shapes with dynamic dims, dtypes, probe shapes), so it survives
``copy.deepcopy``, ``pickle`` and ``torch.save``.

The steps live in their own modules: ``collecting.py`` (which records the outputs need),
``emitting.py`` (the fx graph), ``value_spec.py`` (``node.meta["tg_spec"]``) and
``symbolic_handles.py`` (``model.inputs``/``outputs``/``get_output``). This module holds the
``Model`` class and how it is pickled and copied.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .collecting import check_symbolic, collect_records
from .dims import new_build
from .emitting import RESERVED_NAMES, GraphEmitter, record_out_spec
from .errors import GraphBuildError
from .hierarchy import order_by_graph
from .input_checks import cast_float_dtype, check_call, input_checks
from .naming import SUBMODULE_NAMES, assign_layer_names, check_identifier
from .recording import close_finished_scopes
from .symbolic import SymbolicTensor, Value
from .symbolic_handles import constant_value  # noqa: F401 - NOTE: [Names kept in model.py]
from .symbolic_handles import handle_of, remember_handles, symbolic_handles
from .training import TrainingMixin
from .trees import tree_leaves, tree_map
from .value_spec import ValueSpec

__all__ = ["Model", "OPTIMIZE_META", "ValueSpec"]

#: ``model.meta`` key under which a ``tg.optimize`` result records what it chose (NOTE: [Inference-only
#: models]: the Model reads it; tg.optimize, in optimize.py, writes it).
OPTIMIZE_META = "torchgraph.optimize"

# NOTE: [Names kept in model.py] Other modules imported these from here before model.py was split;
# code written against that (other branches, user code) keeps working. New code imports them from
# their homes: symbolic_handles.py and emitting.py.
_RESERVED = RESERVED_NAMES
_symbolic = symbolic_handles


def reserved_layer_names(cls: type) -> set:
    """Names an automatic layer name of a ``cls`` model must not take: RESERVED_NAMES and the attributes a
    tg.Model subclass defines itself (tg.Sequential's ``add``, ``pop``, ``build``...).

    NOTE: [Subclass attributes] An automatic layer name must not shadow them either: a layer of class
    ``Add`` in a ``tg.Sequential`` was named ``add``, and ``model.add(layer)`` then called the layer.
    Read from the class definitions only (not ``dir``, which also lists what other libraries add to
    nn.Module at run time), so names do not depend on what the process imported. Names given
    explicitly (configs, ``tg.name``) are left to RESERVED_NAMES' check, so saved models load as saved.

    Example:
        >>> import torchgraph as tg
        >>> sorted({"add", "pop", "build", "summary", "linear"} & reserved_layer_names(tg.Sequential))
        ['add', 'build', 'pop', 'summary']
    """
    own = {name for klass in cls.__mro__ if isinstance(klass, type) and issubclass(klass, Model)
           and klass is not Model for name in vars(klass) if not name.startswith("__")}
    return set(RESERVED_NAMES) | own


def _structure(obj):
    """Flatten a tensor, list/tuple or dict of symbolic tensors: ``(kind, keys, tensors)``."""
    if isinstance(obj, dict):
        return "dict", list(obj.keys()), list(obj.values())
    if isinstance(obj, (list, tuple)):
        return type(obj).__name__, None, list(obj)
    return "single", None, [obj]


def _output_names(kind: str, paths: list[tuple]) -> list[str]:
    if kind == "single":
        return ["output"]
    names = ["_".join(str(p) for p in path) for path in paths]
    return names if kind == "dict" else [f"output_{n}" for n in names]


class _yields_to_submodule(property):
    """A Model property that a submodule of the same name shadows.

    ``tg.from_module`` of a module with its own ``self.layers = nn.ModuleList(...)`` gives a model
    whose generated forward reads ``self.layers``: there, as in the original, it is the submodule.
    """

    def __get__(self, obj, objtype=None):
        if obj is not None:
            sub = obj.__dict__.get("_modules", {}).get(self.fget.__name__)
            if sub is not None:
                return sub
        return super().__get__(obj, objtype)


class Model(TrainingMixin, fx.GraphModule):
    """A model built from symbolic inputs and outputs: a ``torch.fx.GraphModule``.

    Args:
        inputs: a symbolic tensor, a list/tuple of them, or a dict (then ``forward`` takes keyword
            arguments named by the keys; positional in insertion order also works).
        outputs: a symbolic tensor, a list/tuple or a dict of them; ``forward`` returns the same
            structure.
        name (str): the model's class name in ``repr`` and ``summary`` (default ``"Model"``).

    Raises:
        GraphBuildError: outputs not computable from ``inputs`` ("Graph disconnected"), non-symbolic
            inputs or outputs, duplicate layer names. Unused inputs give a warning.

    Example:
        >>> import torch, torch.nn as nn, torch.nn.functional as F, torchgraph as tg
        >>> x = tg.Input(shape=(3, 32, 32))
        >>> h = F.relu(nn.Conv2d(3, 16, 3)(x))
        >>> y = nn.Linear(16, 10)(h.mean(dim=(2, 3)))
        >>> model = tg.Model(x, y)
        >>> model(torch.randn(5, 3, 32, 32)).shape
        torch.Size([5, 10])
        >>> [name for name, _ in model.named_children()]
        ['conv2d', 'linear']
    """

    # TorchScript must not try to compile the introspection properties.
    __jit_unused_properties__ = list(getattr(fx.GraphModule, "__jit_unused_properties__", [])) + [
        "inputs", "outputs", "input_names", "output_names", "layers"]

    def __init__(self, inputs, outputs=None, name: str | None = None, *, class_name: str | None = None,
                 **kwargs):
        self._drop_layer_mirrors()  # __init__ may run again on the same object (tg.Sequential.add)
        if isinstance(outputs, fx.Graph):
            # Raw GraphModule construction: fx uses it to copy and unpickle us.
            super().__init__(inputs, outputs, class_name=class_name or name or "Model", **kwargs)
            return
        close_finished_scopes()
        try:
            self._construct(inputs, outputs, name)
        finally:
            new_build()  # NOTE: [Probe sizes] in dims.py: the next build starts afresh

    def _construct(self, inputs, outputs, name: str | None) -> None:
        if outputs is None:
            raise GraphBuildError("tg.Model(inputs, outputs): `outputs` is missing.")
        in_kind, in_keys, in_items = _structure(inputs)
        out_kind, out_keys, _ = _structure(outputs)
        # None in the output structure stays None (nanoGPT returns `logits, None` without targets).
        out_paths = [p for p, leaf in tree_leaves(outputs) if leaf is not None]
        out_items = [leaf for _, leaf in tree_leaves(outputs) if leaf is not None]
        if in_kind == "dict":
            for k in in_keys:
                check_identifier(k, "tg.Model: a dict input key (a forward() argument name)")
        if out_kind == "dict":
            for k in out_keys:
                if not isinstance(k, str):
                    raise GraphBuildError(f"tg.Model: dict output keys must be strings; received {k!r}.")
        input_values = check_symbolic(in_items, "inputs")
        output_values = check_symbolic(out_items, "outputs")
        if len({id(v) for v in input_values}) != len(input_values):
            raise GraphBuildError("tg.Model: the same tensor appears twice in `inputs`.")

        records, used = collect_records(output_values, input_values)

        input_names = self._input_names(in_keys, input_values)
        for v, n in zip(input_values, input_names):
            if id(v) not in used:
                warnings.warn(f"tg.Model: input '{n}' is not used by any output; its argument will be "
                              "ignored.", UserWarning, stacklevel=2)

        modules: list[nn.Module] = []
        first_scopes: dict[int, str] = {}
        for r in records:
            if r.op == "call_module" and id(r.target) not in first_scopes:
                first_scopes[id(r.target)] = r.scope
                modules.append(r.target)
        layer_names = assign_layer_names(modules, reserved_layer_names(type(self)) | set(input_names), first_scopes)

        prefixes = {n.rsplit(".", k)[0] for n in layer_names.values() for k in range(1, n.count(".") + 1)}
        em = GraphEmitter(set(layer_names.values()) | prefixes | set(input_names))
        for v, n in zip(input_values, input_names):
            node = em.graph.placeholder(n)
            node.meta["tg_spec"] = ValueSpec.of(v)
            em.env[id(v)] = node
            em.values[id(v)] = v
        calls: dict[int, int] = {}
        for r in records:
            args = tree_map(em.arg, r.args)
            kwargs = tree_map(em.arg, r.kwargs)
            if r.op == "call_module":
                layer = layer_names[id(r.target)]
                em.root[layer] = r.target
                k = calls.get(id(r.target), 0)
                calls[id(r.target)] = k + 1
                node = em.graph.create_node("call_module", layer, tuple(args), kwargs,
                                            name=layer if k == 0 else f"{layer}_call_{k}")
            elif r.op == "get_attr":  # see constant_value
                node = em.constant(r.target)
            else:
                node = em.graph.create_node(r.op, r.target, tuple(args), kwargs)
            spec = record_out_spec(r)
            if spec is not None:
                node.meta["tg_spec"] = spec
            if r.effect is not None:
                node.meta["tg_effect"] = r.effect
            if r.scope:
                node.meta["tg_scope"] = r.scope  # see scopes.py
            if r.needs_real_data:
                node.meta["tg_real_data"] = True  # NOTE: [Layers that need real data] in config.py
            em.record_nodes[id(r)] = node
        out_nodes = iter([em.node_for(v) for v in output_values])
        em.graph.output(tree_map(lambda o: None if o is None else next(out_nodes), outputs))
        em.graph.lint()

        super().__init__(em.root, em.graph, class_name=name or "Model")
        order_by_graph(self)  # tg.scope containers in program order (fx installs them by depth)
        self.meta["torchgraph"] = {
            "name": name or "Model",
            "input_names": input_names,
            "input_kind": in_kind,
            "output_kind": out_kind,
            "output_keys": out_keys,
            "output_names": _output_names(out_kind, out_paths),
        }
        # Symbolic handles stay outside __dict__: pickling and deepcopy never see them.
        nodes: dict[str, Any] = {}
        for vid, node in em.env.items():
            nodes[node.name] = handle_of(em.values[vid])
        for r in records:
            out = getattr(r, "out", None)
            if out is not None:
                nodes[em.record_nodes[id(r)].name] = tree_map(handle_of, out)
        for n, t in zip(input_names, in_items):
            nodes[n] = t
        remember_handles(self, {"inputs": list(in_items), "outputs": list(out_items), "nodes": nodes})

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _input_names(keys, values: list[Value]) -> list[str]:
        if keys is not None:
            return list(keys)
        names, taken = [], {v.record.target for v in values if v.record.op == "placeholder"}
        counter = 1
        for v in values:
            n = v.record.target if v.record.op == "placeholder" else None
            if n is None or n in names:
                while f"input_{counter}" in taken or f"input_{counter}" in names:
                    counter += 1
                n = f"input_{counter}"
                counter += 1
            names.append(n)
        return names

    # ------------------------------------------------------------------ calling
    def __call__(self, *args, **kwargs):
        # NOTE: [Input checks] They run eagerly only, before the generated forward: traced and compiled
        # programs (torch.compile, torch.export, ONNX) never see them, and they cost ~1 us a call.
        if torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        checks = self.__dict__.get("_tg_checks")
        if checks is None:
            checks = self._tg_checks = input_checks(self)
        if checks:
            check_call(self, checks, args, kwargs)
        return super().__call__(*args, **kwargs)

    def train(self, mode: bool = True):
        # NOTE: [Inference-only models] tg.optimize(model) (inference=True) folds BatchNorm into the
        # convolutions, removes dropout and bakes eval-mode branches: in train mode such a model
        # would compute something else than the original, silently. It refuses train mode instead.
        if mode and self.meta.get(OPTIMIZE_META, {}).get("inference"):
            raise RuntimeError(
                f"{self._get_name()}.train(): this model was made by tg.optimize(..., inference=True) and "
                "computes only what the original computes in eval mode (BatchNorm folded, dropout "
                "removed). Expected eval mode; received train(True). Optimize for training with "
                "tg.optimize(model, inference=False), or train the original model.")
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.__dict__.pop("_tg_checks", None)  # dtypes may have changed (model.double(), .to(...))
        cast = cast_float_dtype(fn)
        if cast is not None:
            self._tg_float_dtype = cast
        return out

    # NOTE: [Fast layer lookup] The generated forward reads each layer as `self.<name>`. For a
    # submodule that lookup misses the instance dict and goes through nn.Module.__getattr__; measured
    # on a 200-layer MLP of width 8 at batch 1 that made forward 15% slower than a handwritten loop
    # over a ModuleList (~1 us a layer), 2-3% at width 256. So every direct submodule is mirrored
    # into the instance __dict__ (a plain attribute hit: 2% at width 8). Every way nn.Module changes
    # `_modules` (setattr, delattr, add_module/register_module, re-running __init__) keeps the
    # mirror in step; `_modules` stays the source of truth (state_dict, children, pickling). Code
    # that edits `model._modules` directly must call `model.add_module`/`delattr` instead.
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:
            if modules[name] is None:
                self.__dict__.pop(name, None)
            else:
                self.__dict__[name] = modules[name]

    def __delattr__(self, name):
        if name in self.__dict__.get("_modules", {}):
            self.__dict__.pop(name, None)
        super().__delattr__(name)

    def add_module(self, name, module):  # register_module() calls add_module()
        if isinstance(self.__dict__.get(name), nn.Module):
            del self.__dict__[name]  # the mirror of a layer that was removed without delattr
        if name in SUBMODULE_NAMES and name not in self._modules and isinstance(module, nn.Module):
            # The Model property of that name yields to the submodule (_yields_to_submodule), which
            # nn.Module.add_module would refuse as an existing attribute (an unused `self.layers`).
            self._modules[name] = module
        else:
            super().add_module(name, module)
        if module is not None:
            self.__dict__[name] = module

    def _drop_layer_mirrors(self) -> None:
        for key in [k for k, v in self.__dict__.items() if isinstance(v, nn.Module)]:
            del self.__dict__[key]

    # ------------------------------------------------------------------ serialization
    def __reduce__(self):
        _, (body, import_block) = super().__reduce__()
        names = [n.name for n in self.graph.nodes]
        specs = [n.meta.get("tg_spec") for n in self.graph.nodes]
        effects = [n.meta.get("tg_effect") for n in self.graph.nodes]
        scopes = [n.meta.get("tg_scope") for n in self.graph.nodes]
        body = dict(body)
        body.pop("_tg_checks", None)
        body["_tracer_cls"] = _Retracer
        # fx gives each instance its own GraphModuleImpl subclass; rebuild the user-facing class
        # (Model, or a subclass such as tg.Sequential).
        cls = next(t for t in type(self).__mro__ if t.__qualname__.split(".")[-1] != "GraphModuleImpl")
        return (_rebuild_model, (body, import_block, names, specs, cls, effects, scopes))

    def _deepcopy_init(self):
        # fx's deepcopy re-runs GraphModule.__init__ with the default class name "GraphModule".
        name = self._get_name()

        def init(res, root, graph):
            fx.GraphModule.__init__(res, root, graph, class_name=name)
            _keep_non_persistent(res, root.__dict__)
        return init

    # ------------------------------------------------------------------ looking at it
    def summary(self, print_fn=None, expand_nested: bool = False, line_length: int | None = None,
                depth: int | None = None) -> None:
        """Print a table of the layers: name (type), output shape, parameter count, connections.

        See :func:`torchgraph.summary.print_summary` (``print_fn`` receives the whole text;
        ``depth`` collapses the module tree below that level).
        """
        from .summary import print_summary

        print_summary(self, print_fn=print_fn, expand_nested=expand_nested, line_length=line_length,
                      depth=depth)

    def _repr_mimebundle_(self, include=None, exclude=None, **kwargs) -> dict:
        """Jupyter shows the model as its picture (``tg.plot_model``), or as text without Graphviz."""
        from .plot import repr_mimebundle

        return repr_mimebundle(self, include, exclude)

    def _repr_svg_(self) -> str | None:
        return self._repr_mimebundle_().get("image/svg+xml")

    # ------------------------------------------------------------------ architecture as data
    def get_config(self) -> dict:
        """A JSON-serialisable description of the architecture (see :func:`torchgraph.config.get_config`)."""
        from .config import get_config

        return get_config(self)

    @classmethod
    def from_config(cls, config: dict, **kwargs) -> Model:
        """Rebuild a model from :meth:`get_config` output, with fresh weights (see
        :func:`torchgraph.config.from_config`). ``tg.Model.from_config`` revives the class the config
        names (``tg.Sequential``, a registered subclass); a subclass's ``from_config`` builds that
        subclass, passing the entries it added to its config to its ``__init__``."""
        from .config import model_from_config

        return model_from_config(cls, config, **kwargs)

    def to_json(self, **kwargs) -> str:
        """:meth:`get_config` as JSON text; ``kwargs`` go to ``json.dumps`` (e.g. ``indent=2``)."""
        import json

        return json.dumps(self.get_config(), allow_nan=False, **kwargs)

    # ------------------------------------------------------------------ introspection
    @_yields_to_submodule
    def inputs(self) -> list[SymbolicTensor]:
        """The symbolic inputs (in ``forward`` argument order)."""
        return list(symbolic_handles(self)["inputs"])

    @_yields_to_submodule
    def outputs(self) -> list[SymbolicTensor]:
        """The symbolic outputs (flattened in the output structure's order)."""
        return list(symbolic_handles(self)["outputs"])

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs: the ``forward`` argument names (and ONNX input names)."""
        return list(self.meta["torchgraph"]["input_names"])

    @property
    def output_names(self) -> list[str]:
        """One name per output tensor, flattened (ONNX output names): dict keys for dict outputs
        (``aux_0`` for nested ones), ``output_0``, ``output_1``... for lists, ``output`` for one tensor."""
        return list(self.meta["torchgraph"]["output_names"])

    @_yields_to_submodule
    def layers(self) -> list[nn.Module]:
        """The layers, each once (a shared layer is one entry), in the order they are first called."""
        out, seen = [], set()
        for node in self.graph.nodes:
            if node.op == "call_module" and node.target not in seen:
                seen.add(node.target)
                out.append(self.get_submodule(node.target))
        return out

    def get_layer(self, name: str) -> nn.Module:
        """The layer called ``name`` (a submodule name)."""
        names = [n.target for n in self.graph.nodes if n.op == "call_module"]
        if name not in names:
            raise ValueError(f"No layer named '{name}' in this model. Layers: {sorted(set(names))}.")
        return self.get_submodule(name)

    def get_output(self, name: str) -> SymbolicTensor:
        """The symbolic output of the node ``name`` (a layer name, or a node name from ``model.code``).

        Use it to build another model that shares the weights, e.g. a feature extractor:
        ``tg.Model(model.inputs, model.get_output("conv2d_1"))``. A shared layer's later calls are
        named ``<layer>_call_1``, ``<layer>_call_2``...
        """
        nodes = symbolic_handles(self)["nodes"]
        if name not in nodes:
            valid = [n.name for n in self.graph.nodes if n.op not in ("output",)]
            raise ValueError(f"No node named '{name}' in this model. Nodes: {valid}.")
        obj = nodes[name]
        if isinstance(obj, (list, tuple)):
            raise ValueError(f"Node '{name}' outputs several tensors; use one of the getitem nodes after it.")
        return obj



class _Retracer(fx.Tracer):
    """The tracer fx re-runs the generated forward with when a model is unpickled.

    NOTE: buffers are proxied too (fx's default reads them as plain tensors), so that an operation on
    a buffer alone (``self.position_ids[:, :n]`` in a tg.from_module graph) stays a node instead of
    being computed once into a ``_tensor_constant``.
    """

    proxy_buffer_attributes = True


def _keep_non_persistent(model: nn.Module, body: dict) -> None:
    # fx re-registers the root's own tensors as (persistent) buffers when it copies or unpickles a
    # GraphModule; a non-persistent one (tg.from_module keeps a forward's constants out of the
    # state_dict, as they were in the original) must stay out of the state_dict.
    model._non_persistent_buffers_set = {n for n in body.get("_non_persistent_buffers_set", ())
                                         if n in model._buffers}


def _rebuild_model(body: dict, import_block: str, names: list, specs: list, cls: type | None = None,
                   effects: list | None = None, scopes: list | None = None) -> Model:
    from torch.fx.graph_module import _deserialize_graph_module, _forward_from_src

    fn_src = body.get("_code") or body["code"]
    forward = _forward_from_src(import_block + fn_src, {})
    meta = body.get("meta", {})
    model = _deserialize_graph_module(forward, body, graph_module_cls=cls or Model)
    model.meta = meta
    _keep_non_persistent(model, body)
    type(model).__name__ = meta.get("torchgraph", {}).get("name", "Model")
    nodes = list(model.graph.nodes)
    if len(nodes) == len(names):
        # Copy into a fresh graph under the original names: renaming in place cannot reuse a name
        # that the retrace gave to another node (linear_1 would become linear_3).
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node, name, spec, effect, scope in zip(nodes, names, specs, effects or [None] * len(nodes),
                                                   scopes or [None] * len(nodes)):
            new = graph.create_node(node.op, node.target, fx.map_arg(node.args, env.__getitem__),
                                    fx.map_arg(node.kwargs, env.__getitem__), name=name, type_expr=node.type)
            if spec is not None:
                new.meta["tg_spec"] = spec
            if effect is not None:
                new.meta["tg_effect"] = effect
            if scope:
                new.meta["tg_scope"] = scope
            env[node] = new
        model.graph = graph
    return model
