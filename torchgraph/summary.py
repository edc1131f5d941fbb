"""``model.summary()``: the model as a table of layers, shapes and parameter counts.

One row per fx node, in the order the forward runs them: inputs, layer calls, torch functions
(``torch.cat``, ``x + y``, ``Tensor.view``) and constants. A shared layer is one row (its parameters
counted once) followed by one indented line per later call site. A nested ``tg.Model`` is one row,
or its own rows indented below it with ``expand_nested=True``.

Design constraints:

- The text depends only on the model and ``line_length``: never on the terminal width or locale
  (plain ASCII), so it can be asserted in tests and pasted into issues.
- "Connected to" appears only when the graph is not a plain chain (Keras does the same).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import torch.fx as fx

from .describe import (Group, NodeInfo, build_tree, check_built_model, check_depth, describe_nodes,
                       format_bytes, format_count, output_entries, param_stats, tree_depth)
from .training.state import optimizer_state_size

__all__ = ["format_summary", "print_summary", "summary"]

_INDENT = "| "
_GAP = "  "
# Column caps when ``line_length`` is not given: longer cells wrap onto more lines.
_CAPS = {"name": 44, "shape": 32, "connected": 36}
_MIN_FLEX = 10


@dataclass
class _Row:
    name: str
    shape: str
    params: str
    connected: str
    trainable: str
    depth: int = 0
    extra: list = field(default_factory=list)  # (name, shape, connected) of a shared layer's later calls


def _is_chain(infos: list[NodeInfo]) -> bool:
    return all(info.inputs == [infos[i - 1].node] for i, info in enumerate(infos) if i > 0)


def _rows(model: fx.GraphModule, expand_nested: bool, depth: int | None, indent: int,
          chains: list[bool]) -> list[_Row]:
    infos = describe_nodes(model)
    chains.append(_is_chain(infos) and sum(i.kind == "input" for i in infos) == 1)
    items, owner = build_tree(model, infos, depth)
    rows: list[_Row] = []
    by_target: dict[str, _Row] = {}

    labels = {i.node: i.label for i in infos}

    def shown(nodes) -> str:  # "Connected to": a node, or the collapsed group holding it
        names = dict.fromkeys(owner[n].path if n in owner else labels.get(n, n.name) for n in nodes)
        return ", ".join(names) or "-"

    def emit(item, level: int) -> None:
        if isinstance(item, Group):
            rows.append(_Row(f"{item.path} ({item.type_label})", item.output, format_count(item.num_params),
                             shown(item.inputs), item.trainable, level))
            for child in item.children if item.expanded else ():
                emit(child, level + 1)
            return
        info = item
        connected = shown(info.inputs)
        first = by_target.get(info.node.target) if info.call_index > 1 else None
        if first is not None:
            # NOTE: [Shared layers] A shared layer is one row with its parameters counted once; each
            # later call site is a line under it, named like its fx node (what "Connected to" shows).
            first.extra.append((f"{info.name} (call {info.call_index} of {info.num_calls})", info.output,
                                connected))
            return
        label = info.type_label
        if info.num_calls > 1:
            label += f", shared: {info.num_calls} calls" if info.call_index == 1 else (
                f", call {info.call_index} of {info.num_calls}")
        row = _Row(f"{info.label} ({label})", info.output, format_count(info.num_params), connected,
                   info.trainable, level)
        rows.append(row)
        if info.num_calls > 1 and info.call_index == 1:
            by_target[info.node.target] = row
        if info.kind == "model":
            level_of_node = info.level
            if expand_nested if depth is None else level_of_node < depth:
                inner = None if depth is None else depth - level_of_node
                rows.extend(_rows(info.module, expand_nested, inner, level + 1, chains))

    for item in items:
        emit(item, indent)
    return rows


def _wrap(text: str, width: int, prefix: str = "") -> list[str]:
    inner = max(width - len(prefix), 4)
    lines = textwrap.wrap(text, inner, subsequent_indent="  ", break_on_hyphens=False) or [""]
    return [prefix + line for line in lines]


def _wrap_shape(text: str, width: int) -> list[str]:
    """Wrap a list of shapes between its shapes, never inside one unless a shape alone is too long."""
    if len(text) <= width or text[:1] not in "[{":
        return _wrap(text, width)
    pieces, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 1:
            pieces.append(text[start:i + 1])
            start = i + 2
    pieces.append(text[start:])
    lines = [""]
    for piece in pieces:
        candidate = f"{lines[-1]} {piece}" if lines[-1] else piece
        if len(candidate) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(" " + piece)
    return [out for line in lines for out in (_wrap(line, width) if len(line) > width else [line])]


def _widths(rows: list[_Row], headers: list[str], keys: list[str], line_length: int | None) -> dict:
    def natural(key: str) -> int:
        cells = [getattr(r, key) for r in rows]
        if key == "name":
            cells = [_INDENT * r.depth + r.name for r in rows]
            cells += [_INDENT * r.depth + "  " + e[0] for r in rows for e in r.extra]
        elif key == "shape":
            cells += [e[1] for r in rows for e in r.extra]
        elif key == "connected":
            cells += [e[2] for r in rows for e in r.extra]
        return max([len(c) for c in cells] + [len(headers[keys.index(key)])])

    widths = {key: natural(key) for key in keys}
    flex = [k for k in keys if k in _CAPS]
    if line_length is None:
        for k in flex:
            widths[k] = min(widths[k], _CAPS[k])
        return widths
    fixed = sum(widths[k] for k in keys if k not in _CAPS) + len(_GAP) * (len(keys) - 1)
    available = line_length - fixed
    if available < _MIN_FLEX * len(flex):
        raise ValueError(f"model.summary: line_length={line_length} is too small for this table. "
                         f"Expected at least {fixed + _MIN_FLEX * len(flex)}; received {line_length}.")
    # Shrink the widest flexible column first: short columns (shapes, usually) stay unwrapped.
    widths.update({k: min(widths[k], max(available, 0)) for k in flex})
    while sum(widths[k] for k in flex) > available:
        widest = max(flex, key=lambda k: widths[k])
        widths[widest] -= 1
    widths[flex[0]] += available - sum(widths[k] for k in flex)  # exact total width
    return widths


def _render_line(cells: dict, widths: dict, keys: list[str]) -> list[str]:
    """One table row; cells wrap to several lines, all columns aligned."""
    columns = []
    for k in keys:
        text, prefix = cells[k] if isinstance(cells[k], tuple) else (cells[k], "")
        if k == "params":
            columns.append([text])
        elif k == "shape":
            columns.append(_wrap_shape(text, widths[k]))
        else:
            columns.append(_wrap(text, widths[k], prefix))
    height = max(len(c) for c in columns)
    out = []
    for i in range(height):
        parts = []
        for k, col in zip(keys, columns):
            text = col[i] if i < len(col) else ""
            parts.append(text.rjust(widths[k]) if k == "params" else text.ljust(widths[k]))
        out.append(_GAP.join(parts).rstrip())
    return out


def _io_lines(model: fx.GraphModule) -> list[str]:
    infos = {i.name: i for i in describe_nodes(model)}
    ins = [f"{i.name} {i.output} {i.dtype}" for i in infos.values() if i.kind == "input"]
    outs = []
    for key, node in output_entries(model):
        info = infos.get(getattr(node, "name", None))
        where = "" if info is None or info.label == key else f" = {info.label}"
        outs.append(f"{key}{where} {info.output} {info.dtype}" if info else f"{key} ?")
    return ["Inputs:  " + "; ".join(ins), "Outputs: " + "; ".join(outs)]


def format_summary(model, expand_nested: bool = False, line_length: int | None = None,
                   depth: int | None = None) -> str:
    """The summary table of ``model`` as a string (what :func:`print_summary` prints).

    Args:
        model (tg.Model): a built model (any ``torch.fx.GraphModule`` with torchgraph shapes).
        expand_nested (bool): also list the rows of nested ``tg.Model`` s, indented under them.
        line_length (int): total width of the table; default: as wide as the content needs
            (each column capped, longer cells wrap).
        depth (int): show the module tree (tg.from_module paths, tg.scope, nested models) down to
            this level; everything deeper is one row per submodule. ``None``: every node.

    Returns:
        str: the table, lines joined by ``\\n`` (no trailing newline).

    Example:
        >>> import torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(8,))
        >>> text = format_summary(tg.Model(x, nn.Linear(8, 2)(x)))
        >>> print(text.splitlines()[-3])
        Total params: 18 (72 B)
    """
    check_built_model(model, "model.summary")
    if line_length is not None and (not isinstance(line_length, int) or isinstance(line_length, bool)):
        raise TypeError(f"model.summary: line_length must be an int or None; received {line_length!r}.")
    check_depth(depth, "model.summary")
    chains: list[bool] = []
    rows = _rows(model, expand_nested, depth, 0, chains)
    keys = ["name", "shape", "params"] + ([] if all(chains) else ["connected"]) + ["trainable"]
    titles = {"name": "Layer (type)", "shape": "Output Shape", "params": "Param #",
              "connected": "Connected to", "trainable": "Trainable"}
    headers = [titles[k] for k in keys]
    widths = _widths(rows, headers, keys, line_length)
    total_width = sum(widths.values()) + len(_GAP) * (len(keys) - 1)

    lines = [f'Model: "{type(model).__name__}"', *_io_lines(model)]
    levels = tree_depth(model)
    if depth is not None and depth < levels:
        lines.append(f"Depth: {depth} of {levels} (deeper nodes are collapsed into their submodule's row; "
                     f"depth=None lists all {sum(1 for n in model.graph.nodes if n.op != 'output')} nodes)")
    lines.append("=" * total_width)
    head = {k: t for k, t in titles.items()}
    head["params"] = titles["params"].rjust(widths["params"])
    lines += _render_line(head, widths, keys)
    lines.append("=" * total_width)
    for r in rows:
        indent = _INDENT * r.depth
        cells = {"name": (r.name, indent), "shape": r.shape, "params": r.params,
                 "connected": r.connected, "trainable": r.trainable}
        lines += _render_line(cells, widths, keys)
        for name, shape, connected in r.extra:
            cells = {"name": (name, indent + "  "), "shape": shape, "params": "",
                     "connected": connected, "trainable": ""}
            lines += _render_line(cells, widths, keys)
    lines.append("=" * total_width)

    total, trainable, size = param_stats(model.parameters())
    frozen_size = param_stats(p for p in model.parameters() if not p.requires_grad)[2]
    lines.append(f"Total params: {format_count(total)} ({format_bytes(size)})")
    lines.append(f"Trainable params: {format_count(trainable)} ({format_bytes(size - frozen_size)})")
    lines.append(f"Non-trainable params: {format_count(total - trainable)} ({format_bytes(frozen_size)})")
    buffers, _, buffer_size = param_stats(model.buffers())
    if buffers:
        lines.append(f"Buffers (not parameters, e.g. BatchNorm statistics): {format_count(buffers)} "
                     f"({format_bytes(buffer_size)})")
    optimizer = optimizer_state_size(model)  # Keras' "Optimizer params", once compiled for training
    if optimizer is not None:
        lines.append(f"Optimizer params: {format_count(optimizer[0])} ({format_bytes(optimizer[1])})")
    return "\n".join(lines)


def print_summary(model, print_fn=None, expand_nested: bool = False, line_length: int | None = None,
                  depth: int | None = None) -> None:
    """Print the summary table of ``model``; ``model.summary(...)`` calls this.

    Args:
        model (tg.Model): a built model.
        print_fn (callable): receives the whole text as one string; default ``print``.
        expand_nested (bool): also list the rows of nested ``tg.Model`` s, indented under them.
        line_length (int): total width of the table; default: as wide as the content needs.
        depth (int): collapse the module tree below this level (see :func:`format_summary`).

    Example:
        >>> import torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(8,), name="features")
        >>> model = tg.Model(x, nn.Linear(8, 2)(x), name="Tiny")
        >>> model.summary()
        Model: "Tiny"
        Inputs:  features (None, 8) float32
        Outputs: output = linear (None, 2) float32
        ==================================================
        Layer (type)      Output Shape  Param #  Trainable
        ==================================================
        features (Input)  (None, 8)           0  -
        linear (Linear)   (None, 2)          18  Y
        ==================================================
        Total params: 18 (72 B)
        Trainable params: 18 (72 B)
        Non-trainable params: 0 (0 B)
    """
    text = format_summary(model, expand_nested=expand_nested, line_length=line_length, depth=depth)
    if print_fn is None:
        print(text)
    elif not callable(print_fn):
        raise TypeError(f"model.summary: print_fn must be callable (it receives the text); received "
                        f"{type(print_fn).__name__}.")
    else:
        print_fn(text)


def summary(module_or_model, *inputs, depth: int | None = None, print_fn=None, expand_nested: bool = False,
            line_length: int | None = None, leaf_modules=None) -> None:
    """Print the summary table of a ``tg.Model``, or of any ``nn.Module`` on the given inputs.

    An ``nn.Module`` goes through :func:`tg.from_module <torchgraph.from_module.from_module>` first
    (``inputs`` as there: ``tg.Input`` s or sample shapes without the batch dim, or a dict for keyword
    arguments), so the table shows its layers under their module paths, with shapes, parameter counts
    and connections, without running any data.

    Args:
        module_or_model (nn.Module): a ``tg.Model`` (then no ``inputs``), or any module.
        *inputs: the module's inputs (see ``tg.from_module``).
        depth (int): show the module tree down to this level; deeper nodes are one row per
            submodule (``depth=1``: the model's direct children). ``None``: every node.
        print_fn (callable): receives the whole text as one string; default ``print``.
        expand_nested (bool): with ``depth=None``, also list the rows of nested ``tg.Model`` s.
        line_length (int): total width of the table.
        leaf_modules: submodules to keep as one row each (see ``tg.from_module``).

    Example:
        >>> import torch.nn as nn, torchgraph as tg
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 2))
        >>> tg.summary(net, (8,), depth=1)
        Model: "Sequential"
        Inputs:  input_1 (None, 8) float32
        Outputs: output = 1 (None, 2) float32
        Depth: 1 of 2 (deeper nodes are collapsed into their submodule's row; depth=None lists all 4 nodes)
        =================================================
        Layer (type)     Output Shape  Param #  Trainable
        =================================================
        input_1 (Input)  (None, 8)           0  -
        0 (Sequential)   (None, 16)        144  Y
        1 (Linear)       (None, 2)          34  Y
        =================================================
        Total params: 178 (712 B)
        Trainable params: 178 (712 B)
        Non-trainable params: 0 (0 B)
    """
    from .from_module import as_model

    model = as_model(module_or_model, inputs, "tg.summary", leaf_modules)
    print_summary(model, print_fn=print_fn, expand_nested=expand_nested, line_length=line_length, depth=depth)
