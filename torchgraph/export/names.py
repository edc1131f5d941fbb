"""Value names in the exported file: the outputs get the model's output names, and nothing else does.

ONNX needs every value name defined once. The exporters name intermediate values after the graph's
nodes (``linear``, ``relu``...), so a dict output whose key is also a node's name (``{"linear":
relu(linear(x))}``) used to give a file with two definitions of ``linear`` that onnxruntime refuses
("Duplicate definition of name"). So the file is exported with placeholder output names, then the
intermediate values that take an output's name are renamed, then the outputs get their names.

Example:
    >>> from torchgraph.export.names import placeholder_names
    >>> len(placeholder_names(["logits", "features"]))
    2
"""

from __future__ import annotations

import uuid

__all__ = ["check_names", "placeholder_names", "name_outputs"]


def check_names(input_names: list[str], output_names: list[str]) -> None:
    """Refuse an output named like an input (ONNX cannot have both)."""
    from .failures import OnnxExportError

    clash = sorted(set(input_names) & set(output_names))
    if clash:
        raise OnnxExportError(
            f"tg.export_onnx: output(s) {clash} have the name of an input. Expected different names: ONNX "
            "defines each value name once. Rename the output key (or the input, with tg.Input(name=...)).")


def placeholder_names(output_names: list[str]) -> list[str]:
    """Names to export the outputs under, unlike any name the exporters give."""
    tag = uuid.uuid4().hex[:8]
    return [f"tg_output_{i}_{tag}" for i in range(len(output_names))]


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _defined(model) -> set[str]:
    names = set()
    for g in _graphs(model.graph):
        names.update(v.name for v in g.input)
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.update(node.output)
    return names


def _rename(model, mapping: dict[str, str]) -> None:
    def new(name):
        return mapping.get(name, name)

    for g in _graphs(model.graph):
        for node in g.node:
            inputs, outputs = [new(v) for v in node.input], [new(v) for v in node.output]
            del node.input[:]
            node.input.extend(inputs)
            del node.output[:]
            node.output.extend(outputs)
        for values in (g.input, g.output, g.value_info):
            for v in values:
                v.name = new(v.name)
        for t in g.initializer:
            t.name = new(t.name)


def name_outputs(path: str, placeholders: list[str], output_names: list[str]) -> None:
    """Rename the file's placeholder outputs to ``output_names``, moving any value in the way."""
    import onnx

    model = onnx.load(path, load_external_data=False)  # external weights stay where they are
    defined = _defined(model)
    wanted = set(output_names)
    mapping: dict[str, str] = {}
    for name in sorted(defined & wanted):
        k = 1
        while f"{name}_{k}" in defined or f"{name}_{k}" in wanted:
            k += 1
        mapping[name] = f"{name}_{k}"
        defined.add(mapping[name])
    mapping.update(zip(placeholders, output_names))
    _rename(model, mapping)
    onnx.save(model, path)
