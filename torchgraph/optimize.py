"""``tg.optimize``: rewrite a model's graph into fused kernels, with no compile step.

A torchgraph model is an fx graph whose layers are known by type, so the fusions a compiler would
search for can be matched directly on the graph when the model is built. The rewrite returns a new
``tg.Model``; the model passed in is never changed.

Design constraints:

- The result is a deep copy: every layer is copied, including those no pass touches, so training or
  moving one model never affects the other. (Folding writes new weights into the copy's layers.)
- Rewritten nodes call :mod:`torchgraph.fused` (linear/conv + bias + activation, choosing oneDNN or
  standard ops per call) and :mod:`torchgraph.ops` (the fused kernels, with reference fallbacks), so
  the optimized model runs on any device and dtype, and when the C++ extension is not built.
- Parameters stay where they were (``conv1.weight`` is still ``conv1.weight``; new nodes read them
  through ``get_attr``), so ``state_dict`` keys are those of the original, minus folded BatchNorms.
- New nodes carry ``tg_spec``; ``model.meta["torchgraph"]`` is kept. Summary, plots, configs and
  ``tg.export_onnx`` work on the result (export swaps the fused ops back to standard ones).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from . import passes
from .model import OPTIMIZE_META, Model

__all__ = ["OPTIMIZE_META", "optimize"]


def optimize(model: Model, inference: bool = True, *, channels_last: bool = True,
             dtype: torch.dtype | None = None) -> Model:
    """A copy of ``model`` with its graph rewritten into fused ops.

    First, in both modes, nested modules (``nn.Sequential``, ``tg.Model``, custom blocks such as
    torchvision's ``Bottleneck``) are inlined down to ``torch.nn`` layers (a block that cannot be
    traced stays one call) and activation modules become their functions, so code written with
    ``nn.ReLU(inplace=True)`` modules fuses like code written with ``F.relu``. Then, with
    ``inference=True`` (the default):

    - ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` / self-attention
      ``nn.MultiheadAttention`` without masks become their primitive ops (fused below);
    - BatchNorm after a Conv/Linear is folded into its weights (using the running statistics);
    - ``Linear`` and ``Conv2d`` (+ a following ReLU/GELU/SiLU) become one fused call
      (:func:`torchgraph.fused.linear_act`, :func:`torchgraph.fused.conv2d_act`): oneDNN's fused
      ops on float32 CPU tensors, standard ops elsewhere;
    - ``relu(a + b)`` becomes :func:`torchgraph.ops.add_relu`, ``layer_norm(a + b)``
      :func:`torchgraph.ops.add_layer_norm`, and ``nn.MaxPool2d``
      :func:`torchgraph.ops.max_pool2d_inference` (no indices, so no backward);
    - with ``channels_last``, ``relu(conv(x) + r)`` and ``conv(x) + r`` (a ResNet block's residual,
      MobileNetV2's) become :func:`torchgraph.fused.conv2d_add_act`: the add and ReLU run in the
      convolution's epilogue;
    - attention written out as ``softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v`` (timm's
      ``fused_attn=False`` path; no mask or dropout) becomes ``F.scaled_dot_product_attention``;
    - self-attention written as ``qkv.chunk(3, -1)`` or ``qkv.split(E, 2)`` (nanoGPT) or
      ``reshape/permute/unbind`` (timm), head split, ``F.scaled_dot_product_attention`` and head
      merge becomes :func:`torchgraph.fused.qkv_attention` (one kernel that reads the
      heads in place, for short sequences on the CPU; SDPA elsewhere);
    - every other ``F.scaled_dot_product_attention`` call (HF LLaMA's, masked, cross-attention)
      becomes :func:`torchgraph.fused.scaled_dot_product_attention`: SDPA's forward with its
      products on oneDNN where that is faster (CPUs whose MKL GEMMs are slow), SDPA elsewhere;
    - RMSNorm written as HF ``LlamaRMSNorm`` writes it, and torch's ``nn.RMSNorm`` / ``F.rms_norm``, become
      :func:`torchgraph.ops.rms_norm_inference`;
    - a layer scale after a linear layer (timm's ``LayerScale``, ConvNeXt's ``gamma``) is folded into its
      weight (``passes.fold_layer_scale``).

    With ``inference=False`` the model stays trainable: no folding, no inference-only max-pool, the
    same layouts; only fusions with a backward (bias + activation, add + ReLU, add + LayerNorm,
    attention).
    Gradients match the original's.

    Serving on Linux: call :func:`torchgraph.retain_freed_memory` once at start-up, or repeated
    forwards (eager's and this model's alike) may spend a third of their time page-faulting freed
    activations back in, depending on the process's history (NOTE: [Page faults from freed memory]).

    Args:
        model (tg.Model): the model to optimize (not modified).
        inference (bool): rewrite for inference (``True``) or keep the model trainable (``False``).
        channels_last (bool): with ``inference``, run convolution stacks in channels_last with
            weights prepacked for oneDNN (float32 CPU tensors), making tensors contiguous again
            where they leave the stack (views, reshapes, the outputs). On by
            default: measured here, every convolution of ResNet-18 and ResNet-50 ran 0-30% faster
            that way than ``F.conv2d`` on contiguous tensors (NOTE: [Packed channels_last convs]
            in ``fused/weights.py``). ``False`` keeps contiguous activations (prepacked weights only for
            3x3-and-larger convolutions with >= 16 input channels).

        dtype (torch.dtype): ``torch.bfloat16`` computes in bfloat16 behind a float32 interface
            (inference only): weights are stored in bfloat16, inputs are cast on entry and outputs
            back to their dtype on exit; convolutions and linear layers run oneDNN's bfloat16
            kernels (AMX / AVX512-BF16, float32 accumulation) and norms, softmax and attention
            accumulate in float32 (``passes/precision.py``). On a CPU without bfloat16
            instructions it warns and computes in float32. ``None`` or ``torch.float32``: float32.

    Returns:
        tg.Model: a new model with the same inputs, outputs, names and ``state_dict`` keys (minus
        folded BatchNorm layers), in eval mode for ``inference=True`` (it refuses ``.train()``:
        BatchNorm is folded, dropout removed), else in ``model``'s mode, following
        ``.train()``/``.eval()`` like the original.

    Raises:
        TypeError: ``model`` is not a ``tg.Model``.
        ValueError: an unsupported ``dtype``, or ``dtype=torch.bfloat16`` with ``inference=False``.

    Example:
        >>> import torch, torch.nn as nn, torch.nn.functional as F, torchgraph as tg
        >>> x = tg.Input(shape=(16,))
        >>> model = tg.Model(x, nn.Linear(32, 4)(F.gelu(nn.Linear(16, 32)(x))))
        >>> fast = tg.optimize(model)
        >>> "linear_act" in fast.code
        True
        >>> data = torch.randn(3, 16)
        >>> torch.allclose(fast(data), model.eval()(data), atol=1e-5)
        True
    """
    if not isinstance(model, Model):
        raise TypeError(f"tg.optimize: expected a tg.Model; received {type(model).__name__}. Build the "
                        "model with tg.Model(inputs, outputs) (or wrap it: x = tg.Input(...); "
                        "tg.Model(x, module(x))).")
    compute_dtype = _compute_dtype(dtype, inference)
    # NOTE: [Inference-mode builds] Tensors made under torch.inference_mode have no version counter,
    # so the packed-weight caches (fused/weights.py) cannot tell when they change and repack them on every call:
    # ResNet-50 (b8 64x64) optimized inside `with torch.inference_mode():` ran 1.8x slower (128 vs
    # 71 ms). The copy is made with inference mode off, whatever the caller's mode (reading the
    # original's tensors, inference tensors or not, is allowed there).
    with torch.inference_mode(False):
        result = _rewrite(model, inference, channels_last, compute_dtype)
    result.meta[OPTIMIZE_META] = {"dtype": str(compute_dtype or torch.float32).replace("torch.", "")}
    if inference:
        result.meta[OPTIMIZE_META]["inference"] = True  # NOTE: [Inference-only models] in model.py
    return result


def _rewrite(model: Model, inference: bool, channels_last: bool, compute_dtype: torch.dtype | None) -> Model:
    # NOTE: [Copy once] With inference=True, folding replaces the weight of every Conv2d followed by
    # a BatchNorm, so copying it first would copy ~90% of a ResNet's bytes twice: deepcopy shares
    # the Conv2d weights, and _unshare copies whatever a pass did not replace.
    shared = {id(m.weight): m.weight for m in model.modules() if type(m) is nn.Conv2d} if inference else {}
    root = copy.deepcopy(model, dict(shared))
    graph = root.graph
    if inference:
        root.eval()
    passes.inline_modules(root, graph)
    passes.canonicalize(root, graph, inference)
    if inference:
        passes.expand_transformer_layers(root, graph)
        passes.fold_batchnorm(root, graph)
        passes.fold_preactivation_batchnorm(root, graph)
        passes.fold_layer_scale(root, graph)
    passes.write_gelu_as_function(root, graph)  # HuggingFace's spellings (passes/written_layers.py)
    if inference:
        passes.linear_from_addmm(root, graph)
    passes.sink_activation_through_view(root, graph)
    passes.fuse_linear_act(root, graph)
    passes.fuse_conv_act(root, graph, channels_last=inference and channels_last)
    _unshare(root, set(shared))
    passes.write_attention_as_sdpa(root, graph)
    passes.fuse_qkv_attention(root, graph)
    if inference:
        passes.use_inference_attention(root, graph)
        passes.drop_repeated_kv(root, graph)
        passes.fuse_rms_norm(root, graph)
    passes.fuse_add_layer_norm(root, graph)
    passes.fuse_add_relu(root, graph)
    if inference:
        passes.use_inference_max_pool(root, graph)
        if channels_last:
            passes.fuse_conv_add(root, graph)
            passes.keep_layout_local(root, graph, float32=compute_dtype is None)
    if compute_dtype is not None:
        passes.compute_in(root, graph, compute_dtype)
    return _rebuild(root, graph)


def _compute_dtype(dtype, inference: bool) -> torch.dtype | None:
    """``torch.bfloat16`` when asked for and supported here, else None (float32)."""
    if dtype is None or dtype == torch.float32:
        return None
    if dtype != torch.bfloat16:
        raise ValueError(f"tg.optimize: dtype must be None, torch.float32 or torch.bfloat16; received {dtype}. "
                         "Other dtypes: convert the model yourself (model.to(dtype)) before or after optimizing.")
    if not inference:
        raise ValueError("tg.optimize: dtype=torch.bfloat16 is for inference; received inference=False. "
                         "For bfloat16 training use torch.autocast('cpu', torch.bfloat16) around the "
                         "optimized model, or drop dtype.")
    supported, why = passes.bfloat16_supported()
    if not supported:
        warnings.warn(f"tg.optimize: dtype=torch.bfloat16 requested, but {why}: computing in float32 "
                      "instead (bfloat16 would be emulated, slower than float32).", UserWarning, stacklevel=3)
        return None
    return torch.bfloat16


def _unshare(root: nn.Module, shared: set) -> None:
    for module in root.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in shared:
                setattr(module, name, nn.Parameter(param.detach().clone(), param.requires_grad))


def _rebuild(root: Model, graph: fx.Graph) -> Model:
    # an in-place op whose result nobody reads still changes its target (`y[:, :4].relu_()`)
    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or passes.has_effect(root, node))
    graph.lint()
    passes.share_attribute_walks(graph)
    name = root._get_name()
    result = Model(root, graph, class_name=name)
    result.meta = copy.deepcopy(root.meta)
    result.training = root.training
    _delete_unused_submodules(result)
    result.recompile()
    return result


def _delete_unused_submodules(model: nn.Module) -> None:
    # fx's own delete_all_unused_submodules keeps modules reached via get_attr ("conv1.weight") but
    # not their parents' other children; ours only drops layers nothing in the graph refers to.
    model.delete_all_unused_submodules()
