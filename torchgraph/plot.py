"""``tg.plot_model`` / ``tg.model_to_dot``: the model as a picture, drawn by Graphviz ``dot``.

Each fx node becomes a small table -- ``name : type`` on a coloured header, the layer's settings,
then its input shapes, output shapes, (dtype,) and parameter count -- like Keras' ``plot_model``, plus
the layer settings and parameter counts Keras leaves out. Inputs (green, rounded) and outputs (red,
rounded) are separate nodes; layers are blue, torch functions grey, nested models purple (a purple
cluster with their own nodes when ``expand_nested=True``).

Design constraints:

- The Python ``graphviz`` package (pure Python, no dependencies) writes the DOT text; only rendering
  needs the ``dot`` program. Both are imported/called only here, so ``import torchgraph`` works
  without them, and ``model_to_dot(model).source`` works without ``dot``.
- Colours are 6-digit hex: dot 2.43 renders 3-digit ones black.
- Files are written atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import html
import operator
import os
import uuid

import torch.fx as fx
import torch.nn as nn

from .describe import (Group, NodeInfo, build_tree, check_built_model, check_depth, describe_nodes, format_count,
                       output_entries, param_stats, tree_depth)

__all__ = ["model_to_dot", "plot_model", "auto_depth", "MAX_NODES"]

# kind -> (header background, body background, border)
_COLORS = {
    "input": ("#2E7D32", "#E8F5E9", "#1B5E20"),
    "output": ("#C62828", "#FFEBEE", "#8E0000"),
    "layer": ("#1565C0", "#E3F2FD", "#0D47A1"),
    "model": ("#6A1B9A", "#F3E5F5", "#4A148C"),
    "function": ("#546E7A", "#F5F7F8", "#37474F"),
    "constant": ("#6D4C41", "#EFEBE9", "#3E2723"),
    "group": ("#00695C", "#E0F2F1", "#004D40"),
}
_SCOPE_BORDER = "#80CBC4"
_CAPTION = "#607D8B"
_CLUSTER_FILL = "#FBF7FC"
_FONT = "Helvetica"
_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".dot": "dot", ".gv": "dot"}
_CONFIG_CHARS = 56
MAX_NODES = 40
# Past this many boxes dot's crossing minimisation dominates (a flat DenseNet-121, 433 nodes: 400+ s
# by default, 17 s with these settings; measured with dot 2.43): fewer iterations, straight edges.
_FAST_LAYOUT_BOXES = 200
_FAST_LAYOUT = {"nslimit": "1", "nslimit1": "1", "mclimit": "0.1", "splines": "line"}
_PIP_HINT = "pip install 'torchgraph-fx[plot]'  (or: pip install graphviz)"
_DOT_HINT = ("Install Graphviz: `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` "
             "(macOS), `conda install graphviz`, or see https://graphviz.org/download/")


def _graphviz():
    try:
        import graphviz
    except ImportError:
        raise ImportError(f"tg.plot_model / tg.model_to_dot need the Python package 'graphviz': "
                          f"{_PIP_HINT}. {_DOT_HINT} for the `dot` program that renders it.") from None
    return graphviz


def _e(text) -> str:
    return html.escape(str(text), quote=True)


class _DotBuilder:
    """Adds one model's nodes (and, recursively, expanded nested models) to a graphviz graph."""

    def __init__(self, root, show_shapes: bool, show_dtype: bool, show_layer_names: bool,
                 expand_nested: bool):
        self.root = root
        self.show_shapes = show_shapes
        self.show_dtype = show_dtype
        self.show_layer_names = show_layer_names
        self.expand_nested = expand_nested
        self.edges: dict[tuple[str, str], None] = {}  # declared on the root graph, once each

    # ------------------------------------------------------------------ labels
    def _header(self, info_name: str, type_label: str, kind: str, note: str = "") -> str:
        head, _, _ = _COLORS[kind]
        title = (f"<B>{_e(info_name)}</B> : {_e(type_label)}" if self.show_layer_names
                 else f"<B>{_e(type_label)}</B>")
        if note:
            title += f' <I><FONT POINT-SIZE="9">{_e(note)}</FONT></I>'
        return f'<TR><TD COLSPAN="{{span}}" BGCOLOR="{head}"><FONT COLOR="#FFFFFF">{title}</FONT></TD></TR>'

    def _label(self, kind: str, header: str, config: str, cells: list[tuple[str, str]],
               rounded: bool = False, dashed: bool = False) -> str:
        _, body, border = _COLORS[kind]
        span = max(len(cells), 1)
        rows = [header.replace("{span}", str(span))]
        if config:
            rows.append(f'<TR><TD COLSPAN="{span}" BGCOLOR="{body}"><FONT POINT-SIZE="9" '
                        f'COLOR="{_CAPTION}">{_e(config)}</FONT></TD></TR>')
        if cells:
            captions = "".join(f'<TD BGCOLOR="{body}"><FONT POINT-SIZE="8" COLOR="{_CAPTION}">{_e(c)}'
                               f"</FONT></TD>" for c, _ in cells)
            values = "".join(f'<TD BGCOLOR="{body}">{v}</TD>' for _, v in cells)
            rows.append(f"<TR>{captions}</TR><TR>{values}</TR>")
        style = ' STYLE="ROUNDED"' if rounded else (' STYLE="DASHED"' if dashed else "")
        return (f'<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="0" CELLPADDING="3" COLOR="{border}"'
                f'{style}>{"".join(rows)}</TABLE>>')

    def _shapes_cell(self, infos: dict, nodes: list) -> str:
        shapes = [infos[n.name].output if n.name in infos else "?" for n in nodes]
        return "<BR/>".join(_e(s) for s in shapes) or "-"

    def _params_text(self, info: NodeInfo) -> str:
        text = format_count(info.num_params)
        if info.num_params and info.num_trainable == 0:
            text += " (frozen)"
        elif info.num_trainable != info.num_params:
            text += f" ({format_count(info.num_params - info.num_trainable)} frozen)"
        return _e(text)

    def node_label(self, info: NodeInfo, infos: dict) -> str:
        kind = info.kind
        note = f"shared, call {info.call_index} of {info.num_calls}" if info.num_calls > 1 else ""
        header = self._header(info.label, info.type_label, kind, note)
        config = ""
        if info.module is not None:
            if kind == "model":
                config = f"tg.Model, {len(list(info.module.children()))} layers"
            else:
                config = info.module.extra_repr().replace("\n", " ")
            if len(config) > _CONFIG_CHARS:
                config = config[: _CONFIG_CHARS - 3] + "..."
        cells: list[tuple[str, str]] = []
        if self.show_shapes:
            if kind not in ("input", "constant"):
                cells.append(("input", self._shapes_cell(infos, info.inputs)))
            cells.append(("output" if kind not in ("input", "constant") else "shape", _e(info.output)))
        if self.show_dtype or kind == "input":
            cells.append(("dtype", _e(info.dtype)))
        if kind in ("layer", "model") or info.num_params:
            cells.append(("params", self._params_text(info) if info.call_index == 1 else "shared"))
        return self._label(kind, header, config, cells, rounded=kind == "input",
                           dashed=info.call_index > 1)

    def group_label(self, group: Group, shapes_of) -> str:
        header = self._header(group.path, group.type_label, "group", f"{len(group.members)} nodes")
        config = ""
        cells: list[tuple[str, str]] = []
        if self.show_shapes:
            cells.append(("input", "<BR/>".join(_e(s) for s in shapes_of(group.inputs)) or "-"))
            cells.append(("output", "<BR/>".join(_e(s) for s in shapes_of(group.outputs)) or "-"))
        if self.show_dtype:
            cells.append(("dtype", _e(group.dtype)))
        info = NodeInfo(None, "group", group.type_label, None, "", "", [], group.num_params, group.num_trainable)
        cells.append(("params", self._params_text(info)))
        return self._label("group", header, config, cells, rounded=True)

    def output_label(self, name: str, info: NodeInfo | None) -> str:
        header = self._header(name, "Output", "output")
        cells = []
        if self.show_shapes:
            cells.append(("shape", _e(info.output if info else "?")))
        if self.show_dtype and info is not None:
            cells.append(("dtype", _e(info.dtype)))
        return self._label("output", header, "", cells, rounded=True)

    # ------------------------------------------------------------------ graph
    def add_model(self, graph, model: fx.GraphModule, prefix: str, sources: dict[str, list[str]],
                  depth: int | None = None):
        """Draw ``model``'s nodes into ``graph``; return ``{output key: node ids}`` of its outputs.

        ``sources`` maps an input name to the ids of the outer nodes feeding it (nested models);
        ``depth`` collapses the module tree below that level (see NOTE: [Depth] in describe.py).
        """
        infos_list = describe_nodes(model)
        infos = {i.name: i for i in infos_list}
        items, owner = build_tree(model, infos_list, depth)
        exits: dict[str, dict] = {}  # node name -> {output key: id} for expanded nested models

        def ids_of(node: fx.Node, index=None) -> list[str]:
            group = owner.get(node)
            if group is not None:
                return [f"{prefix}@{group.path}"]
            return self._ids_of(node, prefix, exits, index)

        def shapes_of(nodes) -> list[str]:
            return [infos[n.name].output if n.name in infos else "?" for n in nodes]

        def draw(items: list, g) -> None:
            for item in items:
                if isinstance(item, Group):
                    if item.expanded:
                        with g.subgraph(name=f"cluster_{prefix}@{item.path}") as cluster:
                            label = (f"<<B>{_e(item.path)}</B> : {_e(item.type_label)} "
                                     f"({_e(format_count(item.num_params))} params)>")
                            cluster.attr(label=label, style="rounded,dashed", color=_SCOPE_BORDER,
                                         fontname=_FONT, fontsize="11", labeljust="l")
                            draw(item.children, cluster)
                    else:
                        node_id = f"{prefix}@{item.path}"
                        g.node(node_id, self.group_label(item, shapes_of))
                        for n in item.inputs:
                            for src in ids_of(n):
                                self.edge(src, node_id)
                    continue
                info = item
                node_id = prefix + info.name
                if info.kind == "model":
                    level = info.level
                    if self.expand_nested if depth is None else level < depth:
                        inner = None if depth is None else depth - level
                        exits[info.name] = self._add_nested(g, info, prefix, exits, ids_of, inner)
                        continue
                g.node(node_id, self.node_label(info, infos))
                for src in sources.get(info.name, []):
                    self.edge(src, node_id)
                index = None
                if info.node.target is operator.getitem and len(info.node.args) == 2:
                    index = info.node.args[1]  # picks one output of an expanded nested model
                for n in info.inputs:
                    for src in ids_of(n, index):
                        self.edge(src, node_id)

        draw(items, graph)
        return {key: ids_of(node) if isinstance(node, fx.Node) else [] for key, node in output_entries(model)}

    def edge(self, src: str, dst: str) -> None:
        # NOTE: an edge statement inside a cluster pulls both ends into it: every edge is declared on
        # the root graph (after the nodes, which stay where they were declared).
        if src != dst and (src, dst) not in self.edges:
            self.edges[(src, dst)] = None
            self.root.edge(src, dst)

    def _ids_of(self, node: fx.Node, prefix: str, exits: dict, index=None) -> list[str]:
        """Ids to draw an edge from, for a value produced by ``node``."""
        if node.name in exits:
            outs = exits[node.name]
            if isinstance(index, (int, str)) and index in outs:
                return outs[index]
            return list(dict.fromkeys(i for ids in outs.values() for i in ids))
        return [prefix + node.name]

    def _add_nested(self, graph, info: NodeInfo, prefix: str, exits: dict, ids_of, depth: int | None) -> dict:
        model = info.module
        inner_prefix = f"{prefix}{info.name}/"
        names = list(getattr(model, "input_names", None) or
                     [n.name for n in model.graph.nodes if n.op == "placeholder"])
        sources: dict[str, list[str]] = {n: [] for n in names}
        node = info.node
        for i, a in enumerate(node.args):
            if isinstance(a, fx.Node) and i < len(names):
                sources[names[i]] += ids_of(a)
        for k, a in node.kwargs.items():
            if isinstance(a, fx.Node) and k in sources:
                sources[k] += ids_of(a)
        total = param_stats(model.parameters())[0]
        _, body, border = _COLORS["model"]
        with graph.subgraph(name=f"cluster_{inner_prefix}") as cluster:
            note = f", shared: call {info.call_index} of {info.num_calls}" if info.num_calls > 1 else ""
            label = (f"<<B>{_e(info.name)}</B> : {_e(info.type_label)} "
                     f"({_e(format_count(total))} params{_e(note)})>")
            style = "filled,rounded" + (",dashed" if info.call_index > 1 else "")
            cluster.attr(label=label, style=style, fillcolor=_CLUSTER_FILL, color=border,
                         fontname=_FONT, fontsize="12", labeljust="l")
            outs = self.add_model(cluster, model, inner_prefix, sources, depth)
        # Outer getitem nodes on this call pick one inner output: index by position or key.
        keyed: dict = {}
        for pos, (key, ids) in enumerate(outs.items()):
            keyed[key] = ids
            keyed[pos] = ids
        return keyed


def _check_options(model, rankdir, dpi) -> None:
    check_built_model(model, "tg.plot_model")
    if rankdir not in ("TB", "LR", "BT", "RL"):
        raise ValueError(f"tg.plot_model: rankdir must be 'TB', 'LR', 'BT' or 'RL'; received {rankdir!r}.")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or dpi <= 0:
        raise ValueError(f"tg.plot_model: dpi must be a positive number; received {dpi!r}.")


def _num_boxes(model: fx.GraphModule, depth: int | None) -> int:
    """How many boxes a picture of ``model`` at ``depth`` has (nodes, collapsed groups, outputs)."""
    items, _ = build_tree(model, describe_nodes(model), depth)
    count, stack = len(output_entries(model)), list(items)
    while stack:
        item = stack.pop()
        if isinstance(item, Group) and item.expanded:
            stack.extend(item.children)
        else:
            count += 1
    return count


def auto_depth(model: fx.GraphModule, max_nodes: int | None) -> int | None:
    """``None`` if ``model`` is drawn whole within ``max_nodes`` boxes, else the deepest level of its
    module tree that fits (1 at least). A model without a module tree is always drawn whole."""
    levels = tree_depth(model)
    if max_nodes is None or levels == 1 or _num_boxes(model, None) <= max_nodes:
        return None
    fitting = [d for d in range(1, levels) if _num_boxes(model, d) <= max_nodes]
    return max(fitting) if fitting else 1


def model_to_dot(model, show_shapes: bool = True, show_dtype: bool = False, show_layer_names: bool = True,
                 rankdir: str = "TB", expand_nested: bool = False, dpi: int = 96, *, inputs=None,
                 depth: int | None = None, max_nodes: int | None = MAX_NODES, leaf_modules=None):
    """The model's graph as a ``graphviz.Digraph`` (DOT text in ``.source``; needs no ``dot`` program).

    Args: as :func:`plot_model` (without ``to_file``).

    Returns:
        graphviz.Digraph: displays itself in Jupyter; ``.source`` is the DOT text; ``.render`` and
        ``.pipe`` render it (those need the ``dot`` program).

    Raises:
        ImportError: the Python package ``graphviz`` is missing (with the pip command).

    Example:
        >>> import torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(8,), name="features")
        >>> dot = tg.model_to_dot(tg.Model(x, nn.Linear(8, 2)(x)))
        >>> "features" in dot.source and "(None, 8)" in dot.source
        True
    """
    if not isinstance(model, fx.GraphModule) and isinstance(model, nn.Module):
        from .from_module import as_model

        model = as_model(model, () if inputs is None else tuple(inputs) if isinstance(inputs, list) else (inputs,),
                         "tg.plot_model", leaf_modules)
    _check_options(model, rankdir, dpi)
    check_depth(depth, "tg.plot_model")
    if max_nodes is not None and (not isinstance(max_nodes, int) or isinstance(max_nodes, bool) or max_nodes < 1):
        raise ValueError(f"tg.plot_model: max_nodes must be a positive int or None; received {max_nodes!r}.")
    graphviz = _graphviz()
    total = param_stats(model.parameters())[0]
    title = f"<B>{_e(type(model).__name__)}</B>  ({_e(format_count(total))} params)"
    levels = tree_depth(model)
    if depth is None:
        depth = auto_depth(model, max_nodes)
        if depth is not None:
            # NOTE: [Collapsed by default] dot's layout time grows much faster than the node count
            # (a DenseNet-121 drawn whole took 200+ s); past max_nodes the picture shows the deepest
            # level of the module tree that fits, and says so.
            num_nodes = sum(1 for n in model.graph.nodes if n.op != "output")
            title += (f'<BR/><FONT POINT-SIZE="10">{num_nodes} nodes, collapsed to depth {depth} of {levels}; '
                      f"depth={levels} draws every node</FONT>")
    elif depth < levels:
        title += f'<BR/><FONT POINT-SIZE="10">depth {depth} of {levels}</FONT>'
    fast = _num_boxes(model, depth) > _FAST_LAYOUT_BOXES
    if fast:
        title += ('<BR/><FONT POINT-SIZE="10">fast layout (straight edges) for this size; tg.scope or '
                  "tg.from_module give a model levels that depth= can collapse</FONT>")
    dot = graphviz.Digraph(name=type(model).__name__)
    dot.attr(rankdir=rankdir, dpi=str(dpi), fontname=_FONT, fontsize="14", labelloc="t",
             nodesep="0.25", ranksep="0.3", label=f"<{title}>", **(_FAST_LAYOUT if fast else {}))
    dot.attr("node", shape="plain", fontname=_FONT, fontsize="11")
    dot.attr("edge", color="#455A64", arrowsize="0.7")
    builder = _DotBuilder(dot, show_shapes, show_dtype, show_layer_names, expand_nested)
    outputs = builder.add_model(dot, model, "", {}, depth)
    infos = {i.name: i for i in describe_nodes(model)}
    for position, ((key, node), ids) in enumerate(zip(output_entries(model), outputs.values())):
        # Output keys are arbitrary strings (':' would read as a port): odd ones are ids by position.
        out_id = f"__output__/{key}" if str(key).isidentifier() else f"__output__/{position}"
        info = infos.get(node.name) if isinstance(node, fx.Node) else None
        dot.node(out_id, builder.output_label(key, info))
        for src in ids:
            builder.edge(src, out_id)
    return dot


def plot_model(model, to_file: str = "model.png", show_shapes: bool = True, show_dtype: bool = False,
               show_layer_names: bool = True, rankdir: str = "TB", expand_nested: bool = False,
               dpi: int = 96, *, inputs=None, depth: int | None = None, max_nodes: int | None = MAX_NODES,
               leaf_modules=None):
    """Draw the model's graph into ``to_file`` (PNG, SVG or PDF, chosen by the extension).

    Each node shows ``name : type``, the layer's settings, its input and output shapes (dynamic dims
    as ``None`` or their name), and its parameter count. Inputs and outputs are green and red rounded
    nodes; a shared layer's later calls have dashed borders; nested models are purple (clusters of
    their own nodes with ``expand_nested=True``). The module tree (``tg.from_module`` paths,
    ``tg.scope``) is drawn as dashed clusters, and below ``depth`` as one teal box per submodule
    with its input and output shapes and parameter count.

    Args:
        model (nn.Module): a built ``tg.Model``, or any module together with ``inputs`` (it goes
            through ``tg.from_module`` first).
        to_file (str | os.PathLike): ``.png``, ``.svg`` or ``.pdf`` (rendered by ``dot``), or
            ``.dot``/``.gv`` (the DOT text, no ``dot`` needed). Written atomically.
        show_shapes (bool): input and output shapes on each node.
        show_dtype (bool): the output dtype on each node (inputs always show theirs).
        show_layer_names (bool): ``name : type`` in the header; else the type only.
        rankdir (str): ``"TB"`` (top to bottom), ``"LR"``, ``"BT"`` or ``"RL"``.
        expand_nested (bool): draw nested ``tg.Model`` s as clusters of their own nodes.
        dpi (int): resolution of PNG output.
        inputs: for a module that is not a ``tg.Model``: its input (a ``tg.Input``, a sample shape
            such as ``(3, 224, 224)``, or a dict for keyword arguments), or a list of them.
        depth (int): draw the module tree down to this level (1: the model's direct children);
            deeper nodes become one box per submodule. Nested ``tg.Model`` s count as levels.
        max_nodes (int): with ``depth=None``, a graph of more nodes than this is drawn at the
            deepest level that fits (the title says so), since Graphviz's layout time grows steeply
            with size. ``None`` draws every node.
        leaf_modules: for a module: submodules to keep as one box each (see ``tg.from_module``).

    Returns:
        graphviz.Digraph: the graph (a notebook displays it; ``.source`` is the DOT text).

    Raises:
        ImportError: the Python package ``graphviz`` is missing.
        RuntimeError: the ``dot`` program is missing or failed (the message says how to install it;
            ``tg.model_to_dot(model).source`` still gives the DOT text).
        ValueError: an unsupported extension or option.

    Example:
        >>> import pathlib, tempfile, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(8,))
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "tiny.svg"
        >>> _ = tg.plot_model(tg.Model(x, nn.Linear(8, 2)(x)), to_file=path)
        >>> "(None, 2)" in path.read_text()
        True
    """
    path = os.fspath(to_file)
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise ValueError(f"tg.plot_model: cannot tell the format of {path!r} from its extension. Expected "
                         f"one of {', '.join(_FORMATS)}; received {ext or 'no extension'!r}.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tg.plot_model: the folder {folder!r} does not exist. Create it first "
                                "or choose another to_file.")
    dot = model_to_dot(model, show_shapes=show_shapes, show_dtype=show_dtype,
                       show_layer_names=show_layer_names, rankdir=rankdir, expand_nested=expand_nested,
                       dpi=dpi, inputs=inputs, depth=depth, max_nodes=max_nodes, leaf_modules=leaf_modules)
    fmt = _FORMATS[ext]
    data = dot.source.encode("utf-8") if fmt == "dot" else render(dot, fmt, path)
    # A fresh name in the target folder (created with the usual permissions), then an atomic rename.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dot


def render(dot, fmt: str, what: str = "the model") -> bytes:
    """``dot`` rendered to ``fmt`` bytes, with an install hint when the ``dot`` program is missing."""
    graphviz = _graphviz()
    try:
        return dot.pipe(format=fmt, quiet=True)
    except graphviz.ExecutableNotFound:
        raise RuntimeError(f"tg.plot_model: the Graphviz `dot` program was not found on PATH, so {what!r} "
                           f"cannot be rendered. {_DOT_HINT}. The DOT text is still available without it: "
                           "tg.model_to_dot(model).source (or save it with to_file='model.dot').") from None
    except graphviz.CalledProcessError as exc:
        stderr = (exc.stderr or b"").decode("utf-8", "replace").strip()
        raise RuntimeError(f"tg.plot_model: `dot` failed to render {what!r} as {fmt}: {stderr}") from None


def repr_mimebundle(model, include=None, exclude=None) -> dict:
    """What Jupyter shows for a model: a compact picture, or text when that is not possible.

    NOTE: [Notebook display] A cell ending in ``model.eval()`` displays the model. Drawn whole, a
    ResNet-50 is a 430 KB SVG one node wide; so a model of more than :data:`MAX_NODES` boxes shows
    the picture of its module tree collapsed to fit (``tg.plot_model``'s default), and a model without
    a module tree shows a short text (name, sizes, inputs, outputs, and how to see more).
    """
    small = sum(1 for n in model.graph.nodes if n.op != "output") <= MAX_NODES
    text = repr(model) if small else short_description(model)
    try:
        depth = auto_depth(model, MAX_NODES)
        if _num_boxes(model, depth) > MAX_NODES:
            return {"text/plain": text, "text/html": f"<pre>{html.escape(text)}</pre>"}
        svg = render(model_to_dot(model, depth=depth), "svg").decode("utf-8")
        return {"image/svg+xml": svg, "text/plain": text}
    except (ImportError, RuntimeError, ValueError, TypeError):
        return {"text/plain": text}


def short_description(model) -> str:
    """A few lines about ``model``: name, node and parameter counts, inputs, outputs, how to see more."""
    from .summary import _io_lines

    num_nodes = sum(1 for n in model.graph.nodes if n.op != "output")
    total = param_stats(model.parameters())[0]
    levels = tree_depth(model)
    depth = f"depth={min(2, levels)}" if levels > 1 else ""
    plot_args = ", ".join(['to_file="model.svg"'] + ([depth] if depth else []))
    return "\n".join([
        f"{type(model).__name__} (tg.Model): {num_nodes} nodes, {format_count(total)} params",
        *_io_lines(model),
        f"model.summary({depth}) lists its layers; tg.plot_model(model, {plot_args}) draws it.",
    ])
