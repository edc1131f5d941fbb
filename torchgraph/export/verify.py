"""Verification: onnxruntime runs the exported file and must agree with the model in torch.

Example:
    >>> from torchgraph.export.verify import tolerance
    >>> tolerance(__import__("torch").float32)
    (0.0001, 0.001)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .failures import OnnxExportError, culprit, reason
from .inputs import InputSpec, eval_mode, random_inputs, verification_plans

__all__ = ["verify_onnx", "tolerance"]

_TOLERANCE = {  # dtype -> (atol, rtol) for comparing onnxruntime with torch
    torch.float64: (1e-6, 1e-5),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for outputs of ``dtype``."""
    return _TOLERANCE.get(dtype, (1e-4, 1e-3))


def verify_onnx(model: fx.GraphModule, path: str, specs: list[InputSpec],
                plans: list[list[dict[str, int]]] | None = None) -> float:
    """Run ``path`` in onnxruntime at two sizes of every dynamic dim; compare with ``model`` (eval).

    ``plans`` are candidate sizes for the two runs, by ONNX dim name, in order of preference (default:
    :func:`~torchgraph.export.inputs.verification_plans`): the first one at which the model runs in
    torch is used. Returns the largest absolute difference seen. Raises :class:`OnnxExportError` on a
    mismatch, when onnxruntime fails, and when torch fails at every candidate (naming the layer).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - an invalid file is an export failure, not a raw ORT error
        raise OnnxExportError(f"tg.export_onnx: onnxruntime cannot load the exported file: {reason(exc)}. "
                              "Expected a valid ONNX model; try exporter='legacy', or report the model "
                              "to torchgraph.") from None
    _check_symbolic_dims(session, specs)
    feeds = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    worst = 0.0
    with eval_mode(model), torch.no_grad():
        for inputs, expected in _torch_runs(model, specs, plans or verification_plans(specs)):
            shapes = ", ".join(f"{s.name}={tuple(t.shape)}" for s, t in zip(specs, inputs))
            try:
                got = session.run(names, {s.name: t.cpu().numpy() for s, t in zip(specs, inputs)
                                          if s.name in feeds})
            except Exception as exc:  # noqa: BLE001
                raise OnnxExportError(
                    f"tg.export_onnx: onnxruntime failed to run the exported file on inputs {shapes} (sizes "
                    f"unlike the export example's): {reason(exc)}. Expected the file to run at every size of "
                    "its dynamic dims; the exporter probably fixed one to the example's size (the legacy "
                    "exporter traces sizes: try exporter='dynamo').") from None
            worst = max(worst, _compare(names, got, expected, inputs, specs))
    return worst


def _torch_runs(model: fx.GraphModule, specs: list[InputSpec], plans: list) -> list[tuple[list, list]]:
    """``(inputs, outputs in torch)`` of both runs of the first plan the model accepts in torch."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    tried = []
    for plan in plans:
        runs = []
        for run, run_sizes in enumerate(plan):
            inputs = random_inputs(specs, 0, None, device, seed=run, sizes=run_sizes)
            shapes = ", ".join(f"{s.name}={tuple(t.shape)}" for s, t in zip(specs, inputs))
            try:
                runs.append((inputs, _flat_outputs(model, model(*inputs))))
            except Exception as exc:  # noqa: BLE001 - the model rejects these sizes: the next plan, or say where
                tried.append(shapes)
                failure = (culprit(model, exc) or "the model", exc, shapes, sorted(run_sizes))
                break
        else:
            return runs
    where, exc, shapes, dims = failure
    also = f" (also tried {'; '.join(tried[:-1])})" if len(tried) > 1 else ""
    raise OnnxExportError(
        f"tg.export_onnx: {where} fails in torch on the verification inputs {shapes}{also}: {reason(exc)}. "
        f"Expected sizes the model accepts: pass verify_sizes={{dim name: (size, size)}} for the dims "
        f"{dims}, or declare their range with tg.Dim(name, min=..., max=...).") from None


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
            atol, rtol = tolerance(e.dtype)
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
