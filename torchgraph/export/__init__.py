"""ONNX export: ``export_onnx(model, path)`` writes a ``.onnx`` file and checks it in onnxruntime.

Modules: ``onnx_export`` (the entry point and the exporter run), ``references`` (fused ops swapped
to pure-torch references), ``inputs`` (names, dynamic dims, example and verification inputs),
``verify`` (onnxruntime against torch), ``failures`` (errors that name the layer).

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

from .failures import OnnxExportError
from .inputs import InputSpec, example_inputs, input_specs, random_inputs
from .onnx_export import export_onnx
from .references import fused_op_references, reference_model
from .verify import verify_onnx

__all__ = ["export_onnx", "OnnxExportError", "reference_model", "fused_op_references", "input_specs",
           "example_inputs", "random_inputs", "verify_onnx", "InputSpec"]
