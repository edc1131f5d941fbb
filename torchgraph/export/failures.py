"""Export failures that name the layer (or graph node) ONNX cannot express.

Example:
    >>> from torchgraph.export.failures import OnnxExportError
    >>> issubclass(OnnxExportError, RuntimeError)
    True
"""

from __future__ import annotations

import linecache
import re
import traceback

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["OnnxExportError", "culprit", "culprit_in_program", "failure_message", "reason"]


class OnnxExportError(RuntimeError):
    """The model could not be exported to ONNX, or the file does not match the model in torch."""


_ASSIGNED = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")
_TRANSLATING = re.compile(r"Error when translating node %([A-Za-z0-9_]+)")


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _nodes_on_stack(exc: BaseException) -> list[tuple[nn.Module, fx.Node]]:
    """The graph nodes being run when ``exc`` was raised, outermost first.

    torch.export runs a GraphModule through ``fx.Interpreter.run_node`` (the node is a local there);
    tracing runs its generated ``forward`` (a file named ``<eval_with_key>``; the line names the node).
    """
    for e in reversed(_exception_chain(exc)):  # the root cause first
        found = []
        for frame, lineno in traceback.walk_tb(e.__traceback__):
            owner = frame.f_locals.get("self")
            if frame.f_code.co_name == "run_node" and isinstance(owner, fx.Interpreter):
                node = frame.f_locals.get("n")
                if isinstance(node, fx.Node):
                    found.append((owner.module, node))
            elif frame.f_code.co_filename.startswith("<eval_with_key>") and isinstance(owner, fx.GraphModule):
                match = _ASSIGNED.match(linecache.getline(frame.f_code.co_filename, lineno))
                node = next((n for n in owner.graph.nodes if match and n.name == match.group(1)), None)
                if node is not None:
                    found.append((owner, node))
        if found:
            return found
    return []


def _describe(owner: nn.Module, node: fx.Node, path: list[str]) -> str:
    where = ".".join(path + [str(node.target) if node.op == "call_module" else node.name])
    if node.op == "call_module":
        return f"layer '{where}' ({type(owner.get_submodule(node.target)).__name__})"
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target)
    return f"node '{where}' ({target})"


def culprit(model: fx.GraphModule, exc: BaseException) -> str | None:
    """``layer 'block.gate' (Gate)`` or ``node 'histc' (histc)``: where the exporter failed."""
    stack = [(owner, node) for owner, node in _nodes_on_stack(exc) if node.op != "placeholder"]
    if not stack:
        return None
    path = [str(node.target) for _, node in stack[:-1] if node.op == "call_module"]
    return _describe(*stack[-1], path)


def culprit_in_program(model: fx.GraphModule, args: tuple, specs: list,
                        exc: BaseException) -> str | None:
    """For ONNX translation errors: find the failing node of the exported program, then its layer."""
    names = [m.group(1) for e in _exception_chain(exc) for m in [_TRANSLATING.search(str(e))] if m]
    if not names:
        return None
    try:
        dynamic_shapes = tuple({i: torch.export.Dim.DYNAMIC for i in s.dim_names} or None for s in specs)
        program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception:  # noqa: BLE001 - only used to improve the message
        return None
    node = next((n for n in program.graph.nodes if n.name == names[0]), None)
    if node is None:
        return None
    stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path]
    if stack:
        layer = stack[-1]
        try:
            return f"layer '{layer}' ({type(model.get_submodule(layer)).__name__})"
        except AttributeError:
            return f"layer '{layer}'"
    origin = [n.name for n in node.meta.get("from_node") or [] if hasattr(n, "name")]
    graph_node = next((n for n in model.graph.nodes if origin and n.name == origin[0]), None)
    return _describe(model, graph_node, []) if graph_node is not None else None


def reason(exc: BaseException) -> str:
    chain = _exception_chain(exc)
    # torch.onnx wraps the real cause in a long "next steps" text: report the innermost exception.
    root = chain[-1]
    text = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), type(root).__name__)
    if len(text) > 400:
        text = text[:397] + "..."
    return f"{type(root).__name__}: {text}"


def failure_message(where: str | None, exc: BaseException) -> str:
    return (f"tg.export_onnx: {where or 'the model'} cannot be expressed in ONNX. The exporter reported: "
            f"{reason(exc)}. Expected standard torch operations with static control flow; replace "
            "that part with exportable ops (torch.where instead of Python `if` on tensor values; a "
            "custom op needs an ONNX translation or a pure-torch reference in "
            "torchgraph.ops.REFERENCES), or try exporter='legacy'.")


