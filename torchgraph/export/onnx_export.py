"""``export_onnx``: the entry point, the exporter run, and the file put in place.

NOTE: [Exporter choice] The default exporter is torch's dynamo-based one (``torch.export`` + ONNX
translation; ``exporter="dynamo"``). It is the one torch maintains (the TorchScript exporter,
``exporter="legacy"``, is deprecated), and ``torch.export`` *proves* the dynamic dims: it raises if
the model forces a dynamic dim to a constant, where tracing would silently bake the example size in.
The legacy exporter is faster (see docs/export.md and benchmarks/bench_export.py) and is kept as an
option.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import tempfile
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from .failures import OnnxExportError, culprit, culprit_in_program, failure_message
from .inputs import InputSpec, example_inputs, example_sizes, input_specs, verification_plans
from .names import check_names, name_outputs, placeholder_names
from .references import ReferenceMode, fused_op_references, reference_model
from .verify import verify_onnx

__all__ = ["export_onnx"]

_PIP_HINT = "pip install 'torchgraph-fx[onnx]'"
# Weights above this size go to an external ``<file>.data`` file (protobuf's limit is 2 GiB).
_EXTERNAL_DATA_BYTES = 1536 * 2**20


def export_onnx(model, path, dynamic_batch: bool = True, opset: int | None = None, verify: bool = True,
                *, exporter: str = "dynamo", verify_sizes: dict | None = None) -> str:
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
            sizes for every other dynamic dim, sizes the model accepts in torch) and compare with
            the model in torch (eval mode). Integer inputs get valid ids (below the
            ``num_embeddings`` of the embedding they feed); masks are right-padded.
        exporter (str): ``"dynamo"`` (default: ``torch.export`` based, checks dynamic dims) or
            ``"legacy"`` (TorchScript based, deprecated in torch, faster).
        verify_sizes (dict): the sizes verification runs dynamic dims at, by ONNX dim name
            (``"batch"``, a ``tg.Input`` dim name, ``"<input>_dim<i>"``): a size, or a pair of sizes
            (one per run). Default: the batch at 3 then 5, every other dim at small sizes unlike the
            export example's that the model accepts (else the sizes it was built with), inside its
            ``tg.Dim`` bounds; see docs/export.md.

    Returns:
        str: ``path``.

    Raises:
        OnnxExportError: the model contains something ONNX cannot express (the message names the
            layer); an output is named like an input; onnxruntime's results differ from torch's (the
            message gives the largest difference); the model fails in torch at the verification sizes
            (the message names the layer). Nothing is written at ``path`` then.
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
    check_names(model.input_names, model.output_names)
    prepared = reference_model(model).eval()
    specs = input_specs(prepared, dynamic_batch)
    device = next((p.device for p in prepared.parameters()), torch.device("cpu"))
    example = example_sizes(prepared, specs, device)
    plans = verification_plans(specs, verify_sizes, example) if verify else None
    directory = os.path.dirname(os.path.abspath(path))
    tmpdir = tempfile.mkdtemp(prefix=".tg_onnx_", dir=directory)
    try:
        tmp_path = os.path.join(tmpdir, os.path.basename(path))
        external = _weight_bytes(prepared) > _EXTERNAL_DATA_BYTES
        try:
            _run_exporter(prepared, specs, example, tmp_path, opset, exporter, external)
        except OnnxExportError as error:
            if not (exporter == "dynamo" and _rnn_range_conflict(prepared, error)):
                raise
            # NOTE: [RNNs on older torch] torch 2.11's dynamo exporter cannot keep an LSTM/GRU's sequence
            # length dynamic ("conflicts between user-specified ranges"); 2.13's can. The legacy exporter
            # keeps it dynamic on both, and verification below runs the file at two sizes of every
            # dynamic dim, so this fallback never fixes a size silently.
            warnings.warn(f"tg.export_onnx: torch {torch.__version__}'s dynamo exporter cannot keep an RNN's "
                          "dynamic dims; exporting with exporter='legacy' instead.", UserWarning, stacklevel=2)
            _run_exporter(prepared, specs, example, tmp_path, opset, "legacy", external)
        if verify:
            verify_onnx(model, tmp_path, specs, plans)
        _move_into_place(tmpdir, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _rnn_range_conflict(model: nn.Module, error: Exception) -> bool:
    has_rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    return has_rnn and "conflicts between user-specified ranges" in str(error)


def _check_arguments(model, path, dynamic_batch, opset, verify, exporter) -> None:
    from ..model import Model

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


def _run_exporter(model: fx.GraphModule, specs: list[InputSpec], example: dict[str, int], path: str,
                  opset: int | None, exporter: str, external: bool) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    args = example_inputs(model, specs, device, example)
    input_names = [s.name for s in specs]
    output_names = placeholder_names(model.output_names)  # see names.py
    with warnings.catch_warnings(), _quiet_exporter_logs(), ReferenceMode(fused_op_references()):
        # The legacy exporter's DeprecationWarning and the tracer's warnings are not the user's concern:
        # what matters is checked by verify_onnx.
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                # NOTE: [Dynamic dims as names] torch.onnx turns each name into Dim.DYNAMIC (torch.export
                # may refine its range, e.g. H >= 3 for a 3x3 conv, but raises if the model forces it
                # to a constant), patches the RNN decompositions so that LSTM/GRU keep a dynamic
                # sequence length, and names the file's dims after ours.
                dynamic_shapes = _dynamic_shapes(specs)
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
            where = culprit(model, exc) or culprit_in_program(model, args, specs, exc)
            raise OnnxExportError(failure_message(where, exc)) from None
    name_outputs(path, output_names, model.output_names)


def _dynamic_shapes(specs: list[InputSpec]) -> tuple:
    """Per input, dim index -> its name (torch.onnx makes it Dim.DYNAMIC), or a ``torch.export.Dim``
    with the ``tg.Dim`` bounds when the dim has some (one object per name, shared across inputs)."""
    bounded: dict[str, torch.export.Dim] = {}
    for s in specs:
        for i, (low, high) in s.bounds.items():
            name = s.dim_names[i]
            if name not in bounded:
                # torch.export specialises sizes 0 and 1, so its ranges start at 2.
                bounded[name] = torch.export.Dim(name, min=max(low, 2), max=high)
    return tuple({i: bounded.get(n, n) for i, n in s.dim_names.items()} or None for s in specs)


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
