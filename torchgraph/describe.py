"""What a model's nodes are, in words people read: the shared vocabulary of ``summary`` and ``plot``.

Both views show the same facts about each fx node -- its kind, a type label (``Conv2d``,
``torch.cat``, ``x + y``), its shapes with dynamic dims as ``None`` (or their name), its parameter
count -- so they are computed once, here.

Design constraints:

- Only the fx graph and ``node.meta["tg_spec"]`` are read, never the recording machinery: a model
  that was copied, pickled or loaded describes itself exactly like the freshly built one.
- Nothing here depends on the terminal, the locale or an optional package.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Group",
    "NodeInfo",
    "build_tree",
    "check_depth",
    "node_path",
    "scope_chains",
    "tree_depth",
    "check_built_model",
    "describe_nodes",
    "format_spec",
    "trainable_flag",
    "format_dtype",
    "format_count",
    "format_bytes",
    "output_entries",
    "param_stats",
]

_OPERATOR_LABELS = {
    operator.add: "x + y", operator.sub: "x - y", operator.mul: "x * y", operator.truediv: "x / y",
    operator.floordiv: "x // y", operator.mod: "x % y", operator.pow: "x ** y", operator.matmul: "x @ y",
    operator.and_: "x & y", operator.or_: "x | y", operator.xor: "x ^ y", operator.lshift: "x << y",
    operator.rshift: "x >> y", operator.eq: "x == y", operator.ne: "x != y", operator.lt: "x < y",
    operator.le: "x <= y", operator.gt: "x > y", operator.ge: "x >= y", operator.neg: "-x",
    operator.pos: "+x", operator.abs: "abs(x)", operator.invert: "~x", operator.getitem: "x[...]",
    operator.iadd: "x += y", operator.isub: "x -= y", operator.imul: "x *= y",
    operator.itruediv: "x /= y", getattr: "getattr",
}


@dataclass
class NodeInfo:
    """One fx node, described.

    ``kind`` is one of ``"input"``, ``"layer"``, ``"model"`` (a nested tg.Model), ``"function"``,
    ``"constant"``. ``call_index``/``num_calls`` count the calls of a shared layer (1-based).
    """

    node: fx.Node
    kind: str
    type_label: str
    module: nn.Module | None
    output: str
    dtype: str
    inputs: list            # fx.Nodes this node reads, in argument order, each once
    num_params: int
    num_trainable: int
    call_index: int = 1
    num_calls: int = 1
    level: int = 1          # in the module tree (see NOTE: [Depth]); set by build_tree

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def label(self) -> str:
        """What views call the node: a layer's (first call's) or a tensor's dotted path as in the
        ``state_dict`` (``layer1.0.conv1``, where fx names the node ``layer1_0_conv1``), else its name."""
        n = self.node
        if n is not None and (n.op == "get_attr" or (n.op == "call_module" and self.call_index == 1)):
            return n.target
        return n.name if n is not None else ""

    @property
    def trainable(self) -> str:
        """``Y`` (all parameters train), ``N`` (none), ``partial``, or ``-`` (no parameters)."""
        return trainable_flag(self.num_params, self.num_trainable)


def trainable_flag(num_params: int, num_trainable: int) -> str:
    """``Y`` (all parameters train), ``N`` (none), ``partial``, or ``-`` (no parameters).

    Example:
        >>> trainable_flag(10, 4), trainable_flag(0, 0)
        ('partial', '-')
    """
    if num_params == 0:
        return "-"
    if num_trainable == num_params:
        return "Y"
    return "N" if num_trainable == 0 else "partial"


def format_spec(spec) -> str:
    """``(None, 16)``; several outputs as ``[(None, 8, 16), [(1, None, 16), ...]]``; ``?`` if unknown."""
    from .value_spec import ValueSpec

    if isinstance(spec, ValueSpec):
        return spec.format()
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{k}: {format_spec(v)}" for k, v in spec.items()) + "}"
    if isinstance(spec, (list, tuple)):
        return "[" + ", ".join(format_spec(s) for s in spec) + "]"
    if spec is None:
        return "?"
    return repr(spec)


def format_dtype(spec) -> str:
    """``float32``; distinct dtypes of several outputs joined by ``/``; ``int`` for a dynamic size."""
    from .value_spec import ValueSpec

    found: list[str] = []

    def visit(s):
        if isinstance(s, ValueSpec):
            d = "int" if s.dtype is None else str(s.dtype).replace("torch.", "")
            if d not in found:
                found.append(d)
        elif isinstance(s, dict):
            for v in s.values():
                visit(v)
        elif isinstance(s, (list, tuple)):
            for v in s:
                visit(v)

    visit(spec)
    return "/".join(found) if found else "?"


def format_count(n: int) -> str:
    """``25,557,032``."""
    return f"{n:,}"


def format_bytes(n: int) -> str:
    """``97.49 MiB`` (binary units; exact below 1 KiB)."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def param_stats(params) -> tuple[int, int, int]:
    """``(count, trainable count, bytes)`` of distinct tensors in ``params``."""
    seen: set[int] = set()
    total = trainable = size = 0
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        size += p.numel() * p.element_size()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable, size


def _function_label(target) -> str:
    if target in _OPERATOR_LABELS:
        return _OPERATOR_LABELS[target]
    name = getattr(target, "__name__", None) or repr(target)
    if getattr(F, name, None) is target:
        return f"F.{name}"
    if getattr(torch, name, None) is target:
        return f"torch.{name}"
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    for n in node.all_input_nodes:
        seen.setdefault(n, None)
    return list(seen)


def _get_attr(model: nn.Module, target: str):
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fx_shape(node: fx.Node) -> tuple[str, str]:
    """Shape and dtype from fx's own metadata (``ShapeProp``'s ``tensor_meta``, export's ``val``)."""
    meta = node.meta.get("tensor_meta", node.meta.get("val"))
    shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
    if shape is None or dtype is None:
        return "?", "?"
    dims = ", ".join(str(d) for d in shape)
    return (f"({dims},)" if len(shape) == 1 else f"({dims})"), str(dtype).replace("torch.", "")


def describe_nodes(model: fx.GraphModule) -> list[NodeInfo]:
    """A :class:`NodeInfo` for every node of ``model.graph`` but the output, in graph order."""
    from .model import Model

    calls: dict[str, list[NodeInfo]] = {}
    infos: list[NodeInfo] = []
    for node in model.graph.nodes:
        if node.op == "output":
            continue
        spec = node.meta.get("tg_spec")
        module = None
        num_params = num_trainable = 0
        if node.op == "placeholder":
            kind, label = "input", "Input"
        elif node.op == "call_module":
            module = model.get_submodule(node.target)
            kind = "model" if isinstance(module, Model) else "layer"
            label = type(module).__name__
            num_params, num_trainable, _ = param_stats(module.parameters())
        elif node.op == "get_attr":
            value = _get_attr(model, node.target)
            kind = "constant"
            if isinstance(value, torch.Tensor):
                label = "Parameter" if isinstance(value, nn.Parameter) else "Constant"
                dims = ", ".join(str(d) for d in value.shape)
                spec_shape = f"({dims},)" if value.dim() == 1 else f"({dims})"
                if isinstance(value, nn.Parameter):
                    num_params = value.numel()
                    num_trainable = num_params if value.requires_grad else 0
                info = NodeInfo(node, kind, label, None, spec_shape,
                                str(value.dtype).replace("torch.", ""), [], num_params, num_trainable)
                infos.append(info)
                continue
            label = type(value).__name__
        elif node.op == "call_method":
            kind, label = "function", f"Tensor.{node.target}"
        else:
            kind, label = "function", _function_label(node.target)
        output, dtype = format_spec(spec), format_dtype(spec)
        if spec is None:
            output, dtype = _fx_shape(node)
        info = NodeInfo(node, kind, label, module, output, dtype, _node_inputs(node), num_params,
                        num_trainable)
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(info)
        infos.append(info)
    for same in calls.values():
        for i, info in enumerate(same, start=1):
            info.call_index, info.num_calls = i, len(same)
    return infos


def output_entries(model: fx.GraphModule) -> list[tuple[str, Any]]:
    """``(output name, producing fx node)`` per model output tensor, flattened in output order."""
    from .trees import tree_leaves

    out_node = next(n for n in reversed(model.graph.nodes) if n.op == "output")
    paths, leaves = [], []
    for path, leaf in tree_leaves(out_node.args[0]):
        if leaf is not None:  # a None in the output structure is no output tensor
            paths.append(path)
            leaves.append(leaf)
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(leaves):  # a plain GraphModule: name the outputs by their paths
        names = (["output"] if paths == [()] else
                 ["output_" + "_".join(str(p) for p in path) for path in paths])
    return list(zip(names, leaves))


def check_built_model(model, who: str) -> None:
    """A clear error unless ``model`` is a GraphModule with inputs (summary and plot need both)."""
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"{who}: expected a tg.Model (a torch.fx.GraphModule); received "
                        f"{type(model).__name__}.")
    if not any(n.op == "placeholder" for n in model.graph.nodes):
        raise ValueError(f"{who}: the model '{type(model).__name__}' has no inputs yet (an unbuilt "
                         "tg.Sequential?). Build it first: give input_shape=..., add a tg.Input, or call "
                         "it once on a tensor.")


# --------------------------------------------------------------------------------------------
# Hierarchy: module paths and tg.scope, collapsed below a depth
# --------------------------------------------------------------------------------------------

# NOTE: [Depth] Levels follow calls, as a reader of the original code sees them: a node recorded
# inside a module's forward (tg.from_module) or a tg.scope is one level below that scope, and so is
# a layer called from there. A container that is never called itself (nn.ModuleDict, nn.ModuleList:
# `self.transformer.h[0](x)`) is no level: its children sit at the level of the code calling them.
# ``depth=N`` shows every node of level <= N and one group per scope of level N for the deeper
# ones; scopes above N are expanded (a header row / a cluster). Nested tg.Models count as levels.


def _node_scope(node: fx.Node) -> str:
    scope = node.meta.get("tg_scope")
    if scope is None and node.op == "get_attr":  # a parameter or constant: where it is first used
        scope = next((u.meta.get("tg_scope") for u in node.users if u.meta.get("tg_scope")), None)
    return scope or ""


def scope_chains(model: fx.GraphModule) -> dict[fx.Node, tuple[str, ...]]:
    """For every node but the output: the scopes it is nested in, outermost first (``("layer1",
    "layer1.0")``); its level is one more than their number."""
    # tg.from_module lists the modules that ran; without that list (tg.scope) every scope is a level.
    ran = (getattr(model, "meta", {}).get("torchgraph") or {}).get("scope_types")
    chains: dict[str, tuple[str, ...]] = {"": ()}
    out = {}
    for node in model.graph.nodes:
        if node.op == "output":
            continue
        scope = _node_scope(node)
        chain = chains.get(scope)
        if chain is None:
            parts = scope.split(".")
            prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            chain = chains[scope] = tuple(p for p in prefixes if ran is None or p in ran or p == scope)
        out[node] = chain
    return out


def node_path(node: fx.Node) -> tuple[str, ...]:
    """The scope of ``node`` split in parts, plus its name (for a quick look; see scope_chains)."""
    scope = _node_scope(node)
    return (*scope.split("."), node.name) if scope else (node.name,)


@dataclass
class Group:
    """The nodes under one module path or scope (``layer1.0``), shown as one row / box when collapsed."""

    path: str
    type_label: str
    level: int
    expanded: bool
    children: list = field(default_factory=list)   # NodeInfo | Group, in first-use order
    members: list = field(default_factory=list)    # every NodeInfo inside, at any depth
    inputs: list = field(default_factory=list)     # fx.Nodes outside that feed it, each once
    outputs: list = field(default_factory=list)    # member fx.Nodes read outside (or model outputs)
    output: str = ""
    dtype: str = ""
    num_params: int = 0
    num_trainable: int = 0

    kind = "group"

    @property
    def name(self) -> str:
        return self.path

    @property
    def trainable(self) -> str:
        return trainable_flag(self.num_params, self.num_trainable)


def tree_depth(model: fx.GraphModule) -> int:
    """The number of levels of ``model``'s module tree (1 for a model without scopes)."""
    return 1 + max((len(c) for c in scope_chains(model).values()), default=0)


def build_tree(model: fx.GraphModule, infos: list[NodeInfo], depth: int | None) -> tuple[list, dict]:
    """The top-level items (NodeInfo or Group) of ``model`` shown at ``depth`` (None: all levels).

    Returns ``(items, owner)`` where ``owner`` maps each fx node absorbed into a collapsed group to it.
    """
    types = (getattr(model, "meta", {}).get("torchgraph") or {}).get("scope_types") or {}
    top: list = []
    groups: dict[str, Group] = {}
    owner: dict[fx.Node, Group] = {}
    chains = scope_chains(model)
    for info in infos:
        chain = chains.get(info.node, ())
        info.level = len(chain) + 1
        container = top
        absorbed = False
        for level, gpath in enumerate(chain, start=1):
            group = groups.get(gpath)
            if group is None:
                label = types.get(gpath, "scope")
                group = groups[gpath] = Group(gpath, label, level, depth is None or level < depth)
                container.append(group)
            group.members.append(info)
            if not group.expanded:
                owner[info.node] = group
                absorbed = True
                break
            container = group.children
        if not absorbed:
            container.append(info)
    for group in groups.values():
        _summarise(model, group)
    return top, owner


def _summarise(model: fx.GraphModule, group: Group) -> None:
    inside = {i.node for i in group.members}
    inputs: dict[fx.Node, None] = {}
    for info in group.members:
        for n in info.inputs:
            if n not in inside:
                inputs.setdefault(n, None)
    group.inputs = list(inputs)
    group.outputs = [i.node for i in group.members if any(u not in inside for u in i.node.users)]
    tensors = []
    for info in group.members:
        if info.module is not None:
            tensors.extend(info.module.parameters())
        elif info.node.op == "get_attr" and info.num_params:
            tensors.append(_get_attr(model, info.node.target))
    group.num_params, group.num_trainable, _ = param_stats(tensors)
    by_node = {i.node: i for i in group.members}
    shapes = [by_node[n].output for n in group.outputs]
    group.output = shapes[0] if len(shapes) == 1 else "[" + ", ".join(shapes) + "]"
    dtypes = list(dict.fromkeys(by_node[n].dtype for n in group.outputs))
    group.dtype = "/".join(dtypes) or "?"


def check_depth(depth, who: str) -> None:
    """A clear error unless ``depth`` is None or an int >= 1."""
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
        raise ValueError(f"{who}: depth must be None (every node) or an int >= 1 (1: the model's direct "
                         f"children); received {depth!r}.")
