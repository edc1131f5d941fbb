"""ONNX export: ``export_onnx(model, path)`` writes a ``.onnx`` file and checks it in onnxruntime.

Design constraints:

- The user's model is never changed: export works on a deep copy in eval mode, in which every fused
  ``torchgraph`` op is swapped back to its pure-torch reference (ONNX has no such ops).
- Input and output names, and which dims are dynamic, come from the model itself: the batch dim and
  every dim declared ``None`` (or named) in ``tg.Input`` stay symbolic in the file. A dim that the
  exporter would fix to the example size is an error, never a silent fallback.
- ``verify=True`` proves it: onnxruntime runs the file at two batch sizes (and two sizes for every
  other dynamic dim), against the model in torch, and a mismatch raises with the largest difference.
- The file appears at ``path`` only once it is complete (and verified): it is written next to it
  under a temporary name first, then renamed.
- A failure of the exporter names the layer (or graph node) that ONNX cannot express.

NOTE: [Exporter choice] The default exporter is torch's dynamo-based one (``torch.export`` + ONNX
translation; ``exporter="dynamo"``). It is the one torch maintains (the TorchScript exporter,
``exporter="legacy"``, is deprecated), and ``torch.export`` *proves* the dynamic dims: it raises if
the model forces a dynamic dim to a constant, where tracing would silently bake the example size in.
The legacy exporter is faster (see docs/export.md and benchmarks/bench_export.py) and is kept as an
option.
"""

from __future__ import annotations

import copy
import importlib
import linecache
import os
import re
import shutil
import tempfile
import traceback
import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["export_onnx", "OnnxExportError", "reference_model", "fused_op_references", "input_specs",
           "example_inputs", "random_inputs", "verify_onnx", "InputSpec"]

_PIP_HINT = "pip install 'torchgraph-fx[onnx]'"
# Weights above this size go to an external ``<file>.data`` file (protobuf's limit is 2 GiB).
_EXTERNAL_DATA_BYTES = 1536 * 2**20
# Integer inputs that feed no embedding get ids in [0, _SMALL_INT_RANGE): safe for masks and type ids.
_SMALL_INT_RANGE = 2
# Ops through which an integer input keeps its values (so an embedding after them bounds the ids).
_ID_PRESERVING = frozenset({
    "getitem", "long", "int", "to", "view", "reshape", "flatten", "contiguous", "transpose", "permute",
    "unsqueeze", "squeeze", "narrow", "clone", "expand", "repeat", "t",
})
_TOLERANCE = {  # dtype -> (atol, rtol) for comparing onnxruntime with torch
    torch.float64: (1e-6, 1e-5),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


class OnnxExportError(RuntimeError):
    """The model could not be exported to ONNX, or the file does not match the model in torch."""


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

def export_onnx(model, path, dynamic_batch: bool = True, opset: int | None = None, verify: bool = True,
                *, exporter: str = "dynamo") -> str:
    """Export ``model`` to an ONNX file at ``path``, and check the file in onnxruntime.

    The ONNX inputs are named like the model's inputs (``model.input_names``) and the outputs like its
    outputs (``model.output_names``: the keys of a dict output). The batch dim and every dim declared
    ``None`` (or named) in ``tg.Input`` are dynamic in the file. The model is exported in eval mode
    (BatchNorm uses its running statistics, Dropout is off); the model passed in is not changed.

    Args:
        model (tg.Model): the model to export.
        path (str | os.PathLike): the ``.onnx`` file to write (replaced if it exists).
        dynamic_batch (bool): keep the batch dim dynamic. ``False`` fixes it to 1; the other dynamic
            dims stay dynamic.
        opset (int | None): the ONNX opset version; ``None`` takes the exporter's default (18+ for
            the dynamo exporter).
        verify (bool): run the file in onnxruntime on random inputs at two batch sizes (and two
            sizes for every other dynamic dim) and compare with the model in torch (eval mode).
            Integer inputs get valid ids (below the ``num_embeddings`` of the embedding they feed).
        exporter (str): ``"dynamo"`` (default: ``torch.export`` based, checks dynamic dims) or
            ``"legacy"`` (TorchScript based, deprecated in torch, faster).

    Returns:
        str: ``path``.

    Raises:
        OnnxExportError: the model contains something ONNX cannot express (the message names the
            layer), or onnxruntime's results differ from torch's (the message gives the largest
            difference). Nothing is written at ``path`` then.
        ImportError: onnx, onnxscript or onnxruntime is missing (``pip install 'torchgraph-fx[onnx]'``).

    Example:
        >>> import os, tempfile, torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(8,), name="features")
        >>> model = tg.Model(x, {"score": nn.Linear(8, 1)(x)})
        >>> path = tg.export_onnx(model, os.path.join(tempfile.mkdtemp(), "model.onnx"))
        >>> import onnx
        >>> graph = onnx.load(path).graph
        >>> [i.name for i in graph.input], [o.name for o in graph.output]
        (['features'], ['score'])
        >>> [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        ['batch', 8]
    """
    _check_arguments(model, path, dynamic_batch, opset, verify, exporter)
    _require("onnx", "onnxscript", *(["onnxruntime"] if verify else []))
    path = os.fspath(path)
    prepared = reference_model(model).eval()
    specs = input_specs(prepared, dynamic_batch)
    directory = os.path.dirname(os.path.abspath(path))
    tmpdir = tempfile.mkdtemp(prefix=".tg_onnx_", dir=directory)
    try:
        tmp_path = os.path.join(tmpdir, os.path.basename(path))
        external = _weight_bytes(prepared) > _EXTERNAL_DATA_BYTES
        try:
            _run_exporter(prepared, specs, tmp_path, opset, exporter, external)
        except OnnxExportError as error:
            if not (exporter == "dynamo" and _rnn_range_conflict(prepared, error)):
                raise
            # NOTE: [RNNs on older torch] torch 2.11's dynamo exporter cannot keep an LSTM/GRU's sequence
            # length dynamic ("conflicts between user-specified ranges"); 2.13's can. The legacy exporter
            # keeps it dynamic on both, and verification below runs the file at two sizes of every
            # dynamic dim, so this fallback never fixes a size silently.
            warnings.warn(f"tg.export_onnx: torch {torch.__version__}'s dynamo exporter cannot keep an RNN's "
                          "dynamic dims; exporting with exporter='legacy' instead.", UserWarning, stacklevel=2)
            _run_exporter(prepared, specs, tmp_path, opset, "legacy", external)
        if verify:
            verify_onnx(model, tmp_path, specs)
        _move_into_place(tmpdir, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _rnn_range_conflict(model: nn.Module, error: Exception) -> bool:
    has_rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    return has_rnn and "conflicts between user-specified ranges" in str(error)


def _check_arguments(model, path, dynamic_batch, opset, verify, exporter) -> None:
    from .model import Model

    if not isinstance(model, Model):
        raise TypeError(f"tg.export_onnx: expected a tg.Model; received {type(model).__name__}. "
                        "Build one with tg.Model(inputs, outputs), or call torch.onnx.export directly.")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"tg.export_onnx: path must be a str or os.PathLike; received "
                        f"{type(path).__name__}.")
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tg.export_onnx: the directory {directory!r} does not exist. Create it "
                                "first (os.makedirs).")
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or opset < 7):
        raise ValueError(f"tg.export_onnx: opset must be an int >= 7 or None; received {opset!r}.")
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"tg.export_onnx: exporter must be 'dynamo' or 'legacy'; received {exporter!r}.")
    for name, value in (("dynamic_batch", dynamic_batch), ("verify", verify)):
        if not isinstance(value, bool):
            raise TypeError(f"tg.export_onnx: {name} must be True or False; received {value!r}.")


def _require(*modules: str) -> None:
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(m)
    if missing:
        raise ImportError(f"tg.export_onnx requires {', '.join(missing)}: {_PIP_HINT}")


def _weight_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _move_into_place(tmpdir: str, path: str) -> None:
    # The external data file (if any) first: the .onnx file that refers to it appears last.
    name = os.path.basename(path)
    for entry in sorted(os.listdir(tmpdir), key=lambda e: e == name):
        os.replace(os.path.join(tmpdir, entry), os.path.join(os.path.dirname(os.path.abspath(path)), entry))


# ---------------------------------------------------------------------------------------------
# Fused ops -> pure-torch references
# ---------------------------------------------------------------------------------------------

def fused_op_references() -> dict:
    """``torchgraph.ops.REFERENCES`` (fused op -> pure-torch reference), or ``{}`` without it."""
    try:
        ops = importlib.import_module("torchgraph.ops")
    except ModuleNotFoundError as exc:
        if exc.name != "torchgraph.ops":
            raise
        return {}
    return dict(getattr(ops, "REFERENCES", None) or {})


def _reference_for(target, references: dict) -> Callable | None:
    if not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    keys: list = [target]
    if isinstance(target, torch._ops.OpOverload):
        keys += [target.overloadpacket, target.name(), str(target.overloadpacket._qualified_op_name)]
    else:
        keys += [target._qualified_op_name]
    for key in keys:
        try:
            ref = references.get(key)
        except TypeError:  # unhashable key type in a user mapping
            ref = None
        if ref is not None:
            return ref
    return None


def reference_model(model: fx.GraphModule, references: dict | None = None) -> fx.GraphModule:
    """A deep copy of ``model`` in which every fused op node calls its pure-torch reference.

    Nested models are rewritten too. ``references`` maps an op (``OpOverload``, its packet, or its
    qualified name ``"ns::op"``) to a function with the same signature; it defaults to
    ``torchgraph.ops.REFERENCES``. The model passed in is not changed.

    Example:
        >>> import torch.nn as nn, torchgraph as tg
        >>> from torchgraph.export import reference_model
        >>> x = tg.Input(shape=(4,))
        >>> model = tg.Model(x, nn.Linear(4, 2)(x))
        >>> reference_model(model) is model
        False
    """
    references = fused_op_references() if references is None else references
    copied = copy.deepcopy(model)
    if not references:
        return copied
    for gm in copied.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        changed = False
        for node in gm.graph.nodes:
            if node.op == "call_function":
                ref = _reference_for(node.target, references)
                if ref is not None:
                    node.target = ref
                    changed = True
        if changed:
            gm.recompile()
    return copied


# ---------------------------------------------------------------------------------------------
# Inputs: names, dynamic dims, example and random values
# ---------------------------------------------------------------------------------------------

@dataclass
class InputSpec:
    """One model input: name, dtype, static sizes, dynamic dims and two valid sizes for each."""

    name: str
    dtype: torch.dtype
    sizes: tuple          # per dim: an int (static) or a pair of valid sizes (dynamic)
    dim_names: dict       # dim index -> ONNX dim name, for the dynamic dims
    high: int | None      # integer inputs: ids are drawn from [0, high)

    def shape(self, which: int, batch: int | None = None) -> tuple:
        dims = [s if isinstance(s, int) else s[which] for s in self.sizes]
        if batch is not None and 0 in self.dim_names:
            dims[0] = batch
        return tuple(dims)


def input_specs(model: fx.GraphModule, dynamic_batch: bool = True) -> list[InputSpec]:
    """What each placeholder of ``model`` takes, from its ``tg_spec`` (shapes with dynamic dims)."""
    from .model import ValueSpec

    specs, dim_names = [], {}
    for node in model.graph.nodes:
        if node.op != "placeholder":
            continue
        spec = node.meta.get("tg_spec")
        if not isinstance(spec, ValueSpec) or spec.shape is None:
            raise OnnxExportError(f"tg.export_onnx: input '{node.name}' has no torchgraph shape; only "
                                  "tensor inputs built with tg.Input can be exported.")
        sizes, names = [], {}
        for i, (p0, p1) in enumerate(zip(*spec.probes)):
            if i == 0 and not dynamic_batch:
                sizes.append(1)
            elif p0 == p1:
                sizes.append(p0)
            else:
                # NOTE: [Dim names] A dynamic dim is identified by its probe pair (see symbolic.py):
                # the batch and named dims are shared across inputs, an anonymous None is its own.
                label = spec.shape[i]
                default = "batch" if i == 0 else (label if isinstance(label, str) else f"{node.name}_dim{i}")
                names[i] = dim_names.setdefault((p0, p1), default)
                sizes.append((p0, p1))
        high = None
        if not spec.dtype.is_floating_point and not spec.dtype.is_complex and spec.dtype != torch.bool:
            high = _id_bound(model, node)
        specs.append(InputSpec(node.name, spec.dtype, tuple(sizes), names, high))
    return specs


def _id_bound(gm: fx.GraphModule, node: fx.Node) -> int:
    """The smallest ``num_embeddings`` among the embeddings ``node`` feeds (through id-preserving ops)."""
    bounds = []
    for user in node.users:
        if user.op == "call_module":
            layer = gm.get_submodule(user.target)
            if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
                bounds.append(layer.num_embeddings)
            elif isinstance(layer, fx.GraphModule) and user.args and user.args[0] is node:
                inner = next((n for n in layer.graph.nodes if n.op == "placeholder"), None)
                if inner is not None:
                    bounds.append(_id_bound(layer, inner))
        elif user.op == "call_function" and getattr(user.target, "__name__", "") == "embedding":
            weight = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                bounds.append(int(_get_attr(gm, weight.target).shape[0]))
        elif user.op in ("call_function", "call_method"):
            name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
            if name in _ID_PRESERVING and user.args and user.args[0] is node:
                bounds.append(_id_bound(gm, user))
    return min(bounds) if bounds else _SMALL_INT_RANGE


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def random_inputs(specs: list[InputSpec], which: int, batch: int | None = None,
                  device: torch.device | str = "cpu", seed: int = 0,
                  sizes: dict[str, int] | None = None) -> list[torch.Tensor]:
    """Random inputs at size ``which`` (0 or 1) of every dynamic dim; ``batch`` overrides the batch,
    ``sizes`` (dim name -> size) any dynamic dim."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in specs:
        shape = list(s.shape(which, batch))
        for i, name in s.dim_names.items():
            if sizes and name in sizes:
                shape[i] = sizes[name]
        if s.dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        elif s.high is not None:
            t = torch.randint(0, s.high, shape, generator=g).to(s.dtype)
        else:
            t = torch.randn(shape, generator=g).to(s.dtype)
        out.append(t.to(device))
    return out


def example_inputs(model: nn.Module, specs: list[InputSpec], device) -> tuple:
    """The inputs to export with: small sizes for dynamic dims when the model runs at them.

    NOTE: [Export example size] Exporting an LSTM/GRU unrolls it over the example's sequence length
    while tracing (the file still gets one ONNX LSTM/GRU op): 48 steps cost ~20 s, 8 steps ~3 s. So
    the non-batch dynamic dims get distinct sizes 8, 9, ... if one eager forward succeeds at them
    (a strided CNN may need larger), else the sizes the model was built with. The batch stays 2: an
    example batch of 1 would be specialised by torch.export.
    """
    small: dict[str, int] = {}
    for s in specs:
        for i, name in s.dim_names.items():
            if i > 0 and min(s.sizes[i]) > 8 + len(small):
                small.setdefault(name, 8 + len(small))
    fallback = tuple(random_inputs(specs, 0, device=device))
    if not small:
        return fallback
    trial = tuple(random_inputs(specs, 0, device=device, sizes=small))
    try:
        with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(*trial)
    except Exception:  # noqa: BLE001 - the model needs larger sizes: use the build sizes
        return fallback
    return trial


# ---------------------------------------------------------------------------------------------
# Running the exporter
# ---------------------------------------------------------------------------------------------

def _run_exporter(model: fx.GraphModule, specs: list[InputSpec], path: str, opset: int | None,
                  exporter: str, external: bool) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    args = example_inputs(model, specs, device)
    input_names = [s.name for s in specs]
    output_names = model.output_names
    with warnings.catch_warnings(), _quiet_exporter_logs(), _ReferenceMode(fused_op_references()):
        # The legacy exporter's DeprecationWarning and the tracer's warnings are not the user's concern:
        # what matters is checked by verify_onnx.
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                # NOTE: [Dynamic dims as names] torch.onnx turns each name into Dim.DYNAMIC (torch.export
                # may refine its range, e.g. H >= 3 for a 3x3 conv, but raises if the model forces it
                # to a constant), patches the RNN decompositions so that LSTM/GRU keep a dynamic
                # sequence length, and names the file's dims after ours.
                dynamic_shapes = tuple(dict(s.dim_names) or None for s in specs)
                _clear_rnn_dispatch_caches()
                try:
                    program = torch.onnx.export(model, args, None, input_names=input_names,
                                                output_names=output_names, opset_version=opset,
                                                dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
                finally:
                    _clear_rnn_dispatch_caches()
                program.save(path, external_data=external)
            else:
                axes = {s.name: dict(s.dim_names) for s in specs if s.dim_names}
                torch.onnx.export(model, args, path, input_names=input_names, output_names=output_names,
                                  opset_version=opset, dynamo=False, dynamic_axes=axes)
        except Exception as exc:  # noqa: BLE001 - every exporter failure becomes one clear error
            where = _culprit(model, exc) or _culprit_in_program(model, args, specs, exc)
            raise OnnxExportError(_failure_message(where, exc)) from None


@contextlib.contextmanager
def _quiet_exporter_logs():
    """torch.onnx logs notes that are not the user's concern (e.g. "torchvision is not installed")."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _clear_rnn_dispatch_caches() -> None:
    # NOTE: [RNN dispatch cache] torch.onnx swaps in while-loop LSTM/GRU decompositions (for a dynamic
    # sequence length) by editing the ops' py_kernels, but the ops' dispatch caches keep the kernel
    # seen first: the second RNN export in a process then unrolls the loop and fails ("inferred a
    # static shape"). Measured with torch 2.13; clearing the caches around the export avoids it.
    for name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        packet = getattr(torch.ops.aten, name, None)
        for overload in (packet.overloads() if packet is not None else ()):
            cache = getattr(getattr(packet, overload), "_dispatch_cache", None)
            if isinstance(cache, dict):
                cache.clear()


class _ReferenceMode(torch.overrides.TorchFunctionMode):
    """Calls each fused op's reference instead of the op: for fused ops called inside layers."""

    def __init__(self, references: dict):
        super().__init__()
        self.references = references

    def __torch_function__(self, func, types, args=(), kwargs=None):
        ref = _reference_for(func, self.references) if self.references else None
        return (ref or func)(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------
# Failure messages that name the layer
# ---------------------------------------------------------------------------------------------

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


def _culprit(model: fx.GraphModule, exc: BaseException) -> str | None:
    """``layer 'block.gate' (Gate)`` or ``node 'histc' (histc)``: where the exporter failed."""
    stack = [(owner, node) for owner, node in _nodes_on_stack(exc) if node.op != "placeholder"]
    if not stack:
        return None
    path = [str(node.target) for _, node in stack[:-1] if node.op == "call_module"]
    return _describe(*stack[-1], path)


def _culprit_in_program(model: fx.GraphModule, args: tuple, specs: list[InputSpec],
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


def _reason(exc: BaseException) -> str:
    chain = _exception_chain(exc)
    # torch.onnx wraps the real cause in a long "next steps" text: report the innermost exception.
    root = chain[-1]
    text = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), type(root).__name__)
    if len(text) > 400:
        text = text[:397] + "..."
    return f"{type(root).__name__}: {text}"


def _failure_message(where: str | None, exc: BaseException) -> str:
    return (f"tg.export_onnx: {where or 'the model'} cannot be expressed in ONNX. The exporter reported: "
            f"{_reason(exc)}. Expected standard torch operations with static control flow; replace "
            "that part with exportable ops (torch.where instead of Python `if` on tensor values; a "
            "custom op needs an ONNX translation or a pure-torch reference in "
            "torchgraph.ops.REFERENCES), or try exporter='legacy'.")


# ---------------------------------------------------------------------------------------------
# Verification in onnxruntime
# ---------------------------------------------------------------------------------------------

def verify_onnx(model: fx.GraphModule, path: str, specs: list[InputSpec]) -> float:
    """Run ``path`` in onnxruntime at two sizes of every dynamic dim; compare with ``model`` (eval).

    Returns the largest absolute difference seen. Raises :class:`OnnxExportError` on a mismatch.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    _check_symbolic_dims(session, specs)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    feeds = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    # Two runs: every dynamic dim at its second valid size, then at its first; the batch at 3 and 5,
    # both different from the export example's 2, so a batch baked into the file cannot pass.
    has_batch = any(0 in s.dim_names for s in specs)
    worst = 0.0
    with _eval_mode(model), torch.no_grad():
        for run, (which, batch) in enumerate(((1, 3), (0, 5))):
            inputs = random_inputs(specs, which, batch if has_batch else None, device, seed=run)
            expected = _flat_outputs(model, model(*inputs))
            try:
                got = session.run(names, {s.name: t.cpu().numpy() for s, t in zip(specs, inputs)
                                          if s.name in feeds})
            except Exception as exc:  # noqa: BLE001
                shapes = ", ".join(f"{s.name}={tuple(t.shape)}" for s, t in zip(specs, inputs))
                raise OnnxExportError(f"tg.export_onnx: onnxruntime failed to run the exported file on "
                                      f"inputs {shapes}: {_reason(exc)}.") from None
            worst = max(worst, _compare(names, got, expected, inputs, specs))
    return worst


def _check_symbolic_dims(session, specs: list[InputSpec]) -> None:
    for i in session.get_inputs():
        spec = next((s for s in specs if s.name == i.name), None)
        if spec is None:
            continue
        fixed = [d for d in spec.dim_names if d < len(i.shape) and isinstance(i.shape[d], int)]
        if fixed:
            raise OnnxExportError(
                f"tg.export_onnx: input '{i.name}' has a fixed size in dim(s) {fixed} of the ONNX file "
                f"(shape {i.shape}). Expected them dynamic ({[spec.dim_names[d] for d in fixed]}); the "
                "exporter specialised them to the example size.")


class _eval_mode:
    """Puts a module in eval mode and restores each submodule's training flag afterwards."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


def _flat_outputs(model: fx.GraphModule, out) -> list:
    info = model.meta["torchgraph"]
    if info["output_kind"] == "dict":
        return list(out.values())
    if info["output_kind"] == "single":
        return [out]
    return list(out)


def _compare(names, got, expected, inputs, specs) -> float:
    import numpy as np

    worst = 0.0
    for name, a, e in zip(names, got, expected):
        e = e.detach().cpu() if isinstance(e, torch.Tensor) else torch.as_tensor(e)
        a = torch.from_numpy(np.asarray(a))
        shapes = ", ".join(f"{s.name}={tuple(t.shape)}" for s, t in zip(specs, inputs))
        if tuple(a.shape) != tuple(e.shape):
            raise OnnxExportError(
                f"tg.export_onnx: output '{name}' has shape {tuple(a.shape)} in onnxruntime but "
                f"{tuple(e.shape)} in torch (inputs {shapes}). Expected equal shapes; a dynamic dim was "
                "probably fixed to the example size during export.")
        if not e.dtype.is_floating_point:
            diff = (a.to(torch.float64) - e.to(torch.float64)).abs()
            bad = bool((diff > 0).any())
            atol, rtol = 0.0, 0.0
        else:
            atol, rtol = _TOLERANCE.get(e.dtype, (1e-4, 1e-3))
            a64, e64 = a.to(torch.float64), e.to(torch.float64)
            diff = (a64 - e64).abs().nan_to_num(nan=float("inf"))
            both_nan = a64.isnan() & e64.isnan()
            diff = torch.where(both_nan, torch.zeros_like(diff), diff)
            bad = bool((diff > atol + rtol * e64.abs().nan_to_num()).any())
        max_diff = float(diff.max()) if diff.numel() else 0.0
        if bad:
            raise OnnxExportError(
                f"tg.export_onnx: output '{name}' differs between onnxruntime and torch: max abs "
                f"difference {max_diff:.3g} (allowed {atol:g} + {rtol:g} * |torch value|), inputs "
                f"{shapes}. Expected the exported file to compute the model; rerun with verify=False to "
                "write the file anyway and inspect it.")
        worst = max(worst, max_diff)
    return worst
