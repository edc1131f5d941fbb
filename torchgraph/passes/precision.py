"""Compute in bfloat16 behind a float32 interface: ``tg.optimize(model, dtype=torch.bfloat16)``.

The graph's floating parameters and buffers are stored in bfloat16, floating inputs are cast to
bfloat16 as they enter and floating outputs back to their recorded dtype as they leave, so callers
pass and get what they did before. What runs in between:

* convolutions and linear layers: oneDNN's bfloat16 kernels (AMX / AVX512-BF16), which accumulate in
  float32 (:mod:`torchgraph.fused`);
* LayerNorm, BatchNorm, softmax and attention: ATen's and torchgraph's CPU kernels, which read
  bfloat16 but accumulate their statistics in float32 (``ops.qkv_attention`` keeps its attention
  weights in float32);
* everything else (adds, activations, pooling): elementwise in bfloat16, rounded once per op.

A model whose weights are on a GPU computes there the same way, on cuDNN's and cuBLAS's bfloat16 kernels
(float32 accumulation); whether bfloat16 is native is asked of that GPU (``cuda_bfloat16_supported``),
not of the host CPU (NOTE: [bfloat16 where the weights are] in ``optimize.py``).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import fused
from .aliasing import in_place_hazards
from .common import module_of, set_spec

__all__ = ["bfloat16_supported", "compute_in", "cuda_bfloat16_supported"]


def bfloat16_supported() -> tuple[bool, str]:
    """Whether this CPU runs bfloat16 natively through oneDNN, and what was found."""
    if not torch.backends.mkldnn.is_available():
        return False, "PyTorch was built without oneDNN (mkldnn)"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, "this CPU has neither AVX512-BF16 nor AMX bf16 instructions"
    return True, "AMX" if torch.cpu._is_amx_tile_supported() else "AVX512-BF16"


def cuda_bfloat16_supported(device: torch.device) -> tuple[bool, str]:
    """Whether the GPU ``device`` runs bfloat16 natively (compute capability 8.0 or later), and what was found."""
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if major < 8:
        return False, f"the GPU {name} (compute capability {major}.{minor}) has no native bfloat16 (8.0 or later)"
    return True, f"{name} (compute capability {major}.{minor})"


def _spec_with_dtype(spec, dtype):
    if spec is None or getattr(spec, "dtype", None) is None or not spec.dtype.is_floating_point:
        return spec
    return type(spec)(spec.shape, dtype, spec.probes)


def compute_in(root: nn.Module, graph: fx.Graph, dtype: torch.dtype) -> int:
    """Store ``root``'s floating parameters and buffers in ``dtype``; cast floating inputs to it and
    floating outputs back to their recorded dtypes. Returns how many casts were inserted."""
    for module in root.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point():
                setattr(module, name, nn.Parameter(param.detach().to(dtype), param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)
        for name, value in list(vars(module).items()):  # constants fx keeps as plain attributes
            if type(value) is torch.Tensor and value.is_floating_point():  # noqa: E721
                setattr(module, name, value.to(dtype))
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    changed = in_place_hazards(root, graph)
    casts = _cast_outputs(graph, output, dtype)
    casts |= _cast_upcast_inputs(root, graph, dtype)
    for node in list(graph.nodes):
        if node in casts:
            continue
        spec = node.meta.get("tg_spec")
        if node.op == "placeholder" and getattr(spec, "dtype", None) is not None and spec.dtype.is_floating_point:
            with graph.inserting_after(node):
                cast = graph.call_method("to", (node, dtype))
            set_spec(cast, _spec_with_dtype(spec, dtype))
            node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
            casts.add(cast)
            if node in changed:  # NOTE: [Inputs changed in a bfloat16 graph]
                with graph.inserting_before(output):
                    graph.call_method("copy_", (node, cast))
        elif node.op in ("call_module", "call_function", "call_method"):
            if isinstance(spec, tuple):
                node.meta["tg_spec"] = tuple(_spec_with_dtype(s, dtype) for s in spec)
            else:
                node.meta["tg_spec"] = _spec_with_dtype(spec, dtype)
    return len(casts)


# NOTE: [Inputs changed in a bfloat16 graph] The graph changes the bfloat16 copy of an input, not
# the caller's tensor: `x += conv(x)` changed nothing the caller sees. So an input that may change in
# place (aliasing.in_place_hazards) gets the copy written back as the graph ends (`x.copy_(x_bf16)`):
# the caller sees the change, and the input rounded to bfloat16 where the model left it unchanged.
def _cast_outputs(graph: fx.Graph, output: fx.Node, dtype: torch.dtype) -> set[fx.Node]:
    """Each floating output, cast back to its recorded dtype (the new cast nodes)."""
    casts: dict[fx.Node, fx.Node] = {}

    def cast_back(value):
        if not isinstance(value, fx.Node):
            return value
        spec = value.meta.get("tg_spec")
        recorded = getattr(spec, "dtype", None)
        if recorded is None or not recorded.is_floating_point or recorded == dtype:
            return value
        if value not in casts:
            with graph.inserting_before(output):
                casts[value] = graph.call_method("to", (value, recorded))
            set_spec(casts[value], spec)
        return casts[value]

    output.args = (fx.node.map_aggregate(output.args[0], cast_back),)
    return set(casts.values())


# NOTE: [Float32 islands] Code written for mixed precision upcasts where it needs float32 and casts
# back where the model's own dtype is expected: LLaMA's RMSNorm ends with `hidden.to(input_dtype)`,
# T5's layer norm with `if self.weight.dtype in (float16, bfloat16): hidden = hidden.to(weight.dtype)`.
# The second is a branch on a real parameter's dtype, answered in float32 when the model was built,
# so in a graph computed in bfloat16 T5's float32 island never ends: `weight * hidden` is float32 and
# the next linear, whose weight is bfloat16, fails ("expected m1 and m2 to have the same dtype").
# Eager T5 in bfloat16 casts that value to bfloat16 before the linear; so does the graph: a value
# reached from an explicit float32 cast (`.float()`, `.to(torch.float32)`) through operations that
# keep its dtype is cast to the compute dtype where it enters a linear or convolution. Any other
# `.to()`/`.type_as()` ends an island; a cast of a value that is already bfloat16 costs nothing.
_TO_DTYPE = {"to", "type", "type_as", "float", "half", "bfloat16", "double"}
_WEIGHTED_FUNCTIONS = {fused.linear_act, fused.conv2d_act, fused.conv2d_add_act, F.linear, F.conv2d}


def _is_float32_cast(node: fx.Node) -> bool:
    if node.op != "call_method" or node.target not in _TO_DTYPE:
        return False
    if node.target == "float":
        return True
    wanted = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, torch.dtype)]
    return node.target in ("to", "type") and wanted == [torch.float32]


def _cast_upcast_inputs(root: nn.Module, graph: fx.Graph, dtype: torch.dtype) -> set[fx.Node]:
    """Cast values of float32 islands to ``dtype`` where they enter a linear or convolution."""
    island: set[fx.Node] = set()
    casts: set[fx.Node] = set()
    for node in list(graph.nodes):
        if _is_float32_cast(node):
            island.add(node)
            continue
        if node.op == "call_method" and node.target in _TO_DTYPE:
            continue  # another cast ends the island
        weighted = (node.op == "call_function" and node.target in _WEIGHTED_FUNCTIONS) or \
            isinstance(module_of(root, node), (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        x = node.args[0] if node.args else None
        if weighted and isinstance(x, fx.Node) and x in island:
            with graph.inserting_before(node):
                cast = graph.call_method("to", (x, dtype))
            set_spec(cast, _spec_with_dtype(x.meta.get("tg_spec"), dtype))
            node.replace_input_with(x, cast)
            casts.add(cast)
            continue
        if any(isinstance(a, fx.Node) and a in island for a in node.all_input_nodes):
            island.add(node)
    return casts
