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

from .describe import (NodeInfo, check_built_model, describe_nodes, format_count, output_entries,
                       param_stats)

__all__ = ["model_to_dot", "plot_model"]

# kind -> (header background, body background, border)
_COLORS = {
    "input": ("#2E7D32", "#E8F5E9", "#1B5E20"),
    "output": ("#C62828", "#FFEBEE", "#8E0000"),
    "layer": ("#1565C0", "#E3F2FD", "#0D47A1"),
    "model": ("#6A1B9A", "#F3E5F5", "#4A148C"),
    "function": ("#546E7A", "#F5F7F8", "#37474F"),
    "constant": ("#6D4C41", "#EFEBE9", "#3E2723"),
}
_CAPTION = "#607D8B"
_CLUSTER_FILL = "#FBF7FC"
_FONT = "Helvetica"
_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".dot": "dot", ".gv": "dot"}
_CONFIG_CHARS = 56
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
        header = self._header(info.name, info.type_label, kind, note)
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

    def output_label(self, name: str, info: NodeInfo | None) -> str:
        header = self._header(name, "Output", "output")
        cells = []
        if self.show_shapes:
            cells.append(("shape", _e(info.output if info else "?")))
        if self.show_dtype and info is not None:
            cells.append(("dtype", _e(info.dtype)))
        return self._label("output", header, "", cells, rounded=True)

    # ------------------------------------------------------------------ graph
    def add_model(self, graph, model: fx.GraphModule, prefix: str, sources: dict[str, list[str]]):
        """Draw ``model``'s nodes into ``graph``; return ``{output key: node id}`` of its outputs.

        ``sources`` maps an input name to the ids of the outer nodes feeding it (nested models).
        """
        infos = {i.name: i for i in describe_nodes(model)}
        exits: dict[str, dict] = {}  # node name -> {output key: id} for expanded nested models
        for info in infos.values():
            node_id = prefix + info.name
            if info.kind == "model" and self.expand_nested:
                exits[info.name] = self._add_nested(graph, info, prefix, exits)
                continue
            graph.node(node_id, self.node_label(info, infos))
            for src in sources.get(info.name, []):
                # NOTE: an edge statement inside a cluster pulls both ends into it: edges from outside
                # a nested model are declared on the root graph.
                self.root.edge(src, node_id)
            index = None
            if info.node.target is operator.getitem and len(info.node.args) == 2:
                index = info.node.args[1]  # picks one output of an expanded nested model
            for n in info.inputs:
                for src in self._ids_of(n, prefix, exits, index):
                    graph.edge(src, node_id)
        return {key: self._ids_of(node, prefix, exits) if isinstance(node, fx.Node) else []
                for key, node in output_entries(model)}

    def _ids_of(self, node: fx.Node, prefix: str, exits: dict, index=None) -> list[str]:
        """Ids to draw an edge from, for a value produced by ``node``."""
        if node.name in exits:
            outs = exits[node.name]
            if isinstance(index, (int, str)) and index in outs:
                return outs[index]
            return list(dict.fromkeys(i for ids in outs.values() for i in ids))
        return [prefix + node.name]

    def _add_nested(self, graph, info: NodeInfo, prefix: str, exits: dict) -> dict:
        model = info.module
        inner_prefix = f"{prefix}{info.name}/"
        names = list(getattr(model, "input_names", None) or
                     [n.name for n in model.graph.nodes if n.op == "placeholder"])
        sources: dict[str, list[str]] = {n: [] for n in names}
        node = info.node
        for i, a in enumerate(node.args):
            if isinstance(a, fx.Node) and i < len(names):
                sources[names[i]] += self._ids_of(a, prefix, exits)
        for k, a in node.kwargs.items():
            if isinstance(a, fx.Node) and k in sources:
                sources[k] += self._ids_of(a, prefix, exits)
        total = param_stats(model.parameters())[0]
        _, body, border = _COLORS["model"]
        with graph.subgraph(name=f"cluster_{inner_prefix}") as cluster:
            note = f", shared: call {info.call_index} of {info.num_calls}" if info.num_calls > 1 else ""
            label = (f"<<B>{_e(info.name)}</B> : {_e(info.type_label)} "
                     f"({_e(format_count(total))} params{_e(note)})>")
            style = "filled,rounded" + (",dashed" if info.call_index > 1 else "")
            cluster.attr(label=label, style=style, fillcolor=_CLUSTER_FILL, color=border,
                         fontname=_FONT, fontsize="12", labeljust="l")
            outs = self.add_model(cluster, model, inner_prefix, sources)
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


def model_to_dot(model, show_shapes: bool = True, show_dtype: bool = False, show_layer_names: bool = True,
                 rankdir: str = "TB", expand_nested: bool = False, dpi: int = 96):
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
    _check_options(model, rankdir, dpi)
    graphviz = _graphviz()
    total = param_stats(model.parameters())[0]
    dot = graphviz.Digraph(name=type(model).__name__)
    dot.attr(rankdir=rankdir, dpi=str(dpi), fontname=_FONT, fontsize="14", labelloc="t",
             nodesep="0.25", ranksep="0.3",
             label=f"<<B>{_e(type(model).__name__)}</B>  ({_e(format_count(total))} params)>")
    dot.attr("node", shape="plain", fontname=_FONT, fontsize="11")
    dot.attr("edge", color="#455A64", arrowsize="0.7")
    builder = _DotBuilder(dot, show_shapes, show_dtype, show_layer_names, expand_nested)
    outputs = builder.add_model(dot, model, "", {})
    infos = {i.name: i for i in describe_nodes(model)}
    for position, ((key, node), ids) in enumerate(zip(output_entries(model), outputs.values())):
        # Output keys are arbitrary strings (':' would read as a port): odd ones are ids by position.
        out_id = f"__output__/{key}" if str(key).isidentifier() else f"__output__/{position}"
        info = infos.get(node.name) if isinstance(node, fx.Node) else None
        dot.node(out_id, builder.output_label(key, info))
        for src in ids:
            dot.edge(src, out_id)
    return dot


def plot_model(model, to_file: str = "model.png", show_shapes: bool = True, show_dtype: bool = False,
               show_layer_names: bool = True, rankdir: str = "TB", expand_nested: bool = False,
               dpi: int = 96):
    """Draw the model's graph into ``to_file`` (PNG, SVG or PDF, chosen by the extension).

    Each node shows ``name : type``, the layer's settings, its input and output shapes (dynamic dims
    as ``None`` or their name), and its parameter count. Inputs and outputs are green and red rounded
    nodes; a shared layer's later calls have dashed borders; nested models are purple (clusters of
    their own nodes with ``expand_nested=True``).

    Args:
        model (tg.Model): a built model.
        to_file (str | os.PathLike): ``.png``, ``.svg`` or ``.pdf`` (rendered by ``dot``), or
            ``.dot``/``.gv`` (the DOT text, no ``dot`` needed). Written atomically.
        show_shapes (bool): input and output shapes on each node.
        show_dtype (bool): the output dtype on each node (inputs always show theirs).
        show_layer_names (bool): ``name : type`` in the header; else the type only.
        rankdir (str): ``"TB"`` (top to bottom), ``"LR"``, ``"BT"`` or ``"RL"``.
        expand_nested (bool): draw nested ``tg.Model`` s as clusters of their own nodes.
        dpi (int): resolution of PNG output.

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
                       dpi=dpi)
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
    """What Jupyter shows for a model: its SVG picture, or its text when it cannot be drawn."""
    try:
        dot = model_to_dot(model)
        return {"image/svg+xml": render(dot, "svg").decode("utf-8"), "text/plain": repr(model)}
    except (ImportError, RuntimeError, ValueError, TypeError):
        return {"text/plain": repr(model)}
