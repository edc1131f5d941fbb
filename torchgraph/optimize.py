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
from .probing import data_device

__all__ = ["GPU_CHANNELS_LAST", "GPU_SKIPPED_PASSES", "GPU_TRAINING_SKIPPED_PASSES", "OPTIMIZE_META", "optimize"]


def optimize(model: Model, inference: bool = True, *, channels_last: bool | None = None,
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

    A model whose weights are on a GPU is rewritten for the GPU: the passes listed in
    ``GPU_SKIPPED_PASSES`` (CPU kernels and what needs channels_last) are skipped (NOTE: [Passes on
    a GPU]); with ``inference=False`` also ``GPU_TRAINING_SKIPPED_PASSES``, the fusions whose backward
    costs a GPU more than eager's autograd (NOTE: [Training on a GPU]). Optimize the model where it
    will run: one optimized on the CPU and moved to a GPU gives the same results, with the CPU's choices.

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
        channels_last (bool | None): with ``inference``, run convolution stacks in channels_last with
            weights prepacked for oneDNN (float32 CPU tensors), making tensors contiguous again
            where they leave the stack (views, reshapes, the outputs). ``None`` (the default) means
            on for a model on the CPU: measured here, every convolution of ResNet-18 and ResNet-50 ran
            0-30% faster that way than ``F.conv2d`` on contiguous tensors (NOTE: [Packed channels_last
            convs] in ``fused/weights.py``); for a model on a GPU, ``GPU_CHANNELS_LAST``. ``False`` keeps
            contiguous activations (prepacked weights only for 3x3-and-larger convolutions with >= 16
            input channels).

        dtype (torch.dtype): ``torch.bfloat16`` computes in bfloat16 behind a float32 interface
            (inference only): weights are stored in bfloat16, inputs are cast on entry and outputs
            back to their dtype on exit; convolutions and linear layers run oneDNN's bfloat16
            kernels (AMX / AVX512-BF16, float32 accumulation) and norms, softmax and attention
            accumulate in float32 (``passes/precision.py``). A model on a GPU computes in bfloat16
            there (compute capability 8.0 or later). On a CPU without bfloat16 instructions, or
            an older GPU, it warns and computes in float32. ``None`` or ``torch.float32``: float32.

    Returns:
        tg.Model: a new model with the same inputs, outputs, names and ``state_dict`` keys (minus
        folded BatchNorm layers), in eval mode for ``inference=True`` (it refuses ``.train()``:
        BatchNorm is folded, dropout removed) with its parameters frozen (``requires_grad=False``, so
        calls outside ``torch.no_grad()`` run as fast), else in ``model``'s mode, following
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
    device = _weights_device(model)
    compute_dtype = _compute_dtype(dtype, inference, device)
    # NOTE: [Inference-mode builds] Tensors made under torch.inference_mode have no version counter,
    # so the packed-weight caches (fused/weights.py) cannot tell when they change and repack them on every call:
    # ResNet-50 (b8 64x64) optimized inside `with torch.inference_mode():` ran 1.8x slower (128 vs
    # 71 ms). The copy is made with inference mode off, whatever the caller's mode (reading the
    # original's tensors, inference tensors or not, is allowed there).
    with torch.inference_mode(False):
        result = _rewrite(model, inference, channels_last, compute_dtype, on_gpu=device.type == "cuda")
    result.meta[OPTIMIZE_META] = {"dtype": str(compute_dtype or torch.float32).replace("torch.", "")}
    if inference:
        result.meta[OPTIMIZE_META]["inference"] = True  # NOTE: [Inference-only models] in model.py
        # NOTE: [Frozen inference weights] The inference ops have no backward and BatchNorm is folded:
        # gradients for these weights were never available. Left requiring grad, they made every call made
        # without torch.no_grad() (`model.eval(); model(x)`) take the per-call paths that keep autograd
        # working (F.conv2d, no plans): MobileNetV2 b8 16.7 ms against 6.8 ms under no_grad (eager: 18 ms).
        # The copy's own parameters only (the original's are never shared: NOTE: [Copy once]).
        result.requires_grad_(False)
    return result


# NOTE: [Passes on a GPU] A model whose weights are on a GPU at optimize time is rewritten for the GPU: the
# passes whose ops are CPU kernels (oneDNN, torchgraph's AVX2/AVX-512 kernels) are skipped, so the graph keeps
# eager's own calls there. Small models on a GPU are bound by the host's time per call (launches and Python),
# not by arithmetic: what pays is fewer launches. Measured on an H200 (torch 2.11, cuDNN 9.19,
# `bench_peers.py --device cuda --reps 11 --iters 20`, 2026-12-04, speed-up over eager float32):
# - the conv and linear + bias + activation wrappers (fuse_conv_act, fuse_linear_act: the convolution or GEMM,
#   then the bias and activation in one CUDA kernel) pay: skipping them too took ResNet-50 b8 from 1.52x to
#   1.37x (1.34x vs 1.92x in a second run), b1 1.55x to 1.40x, MobileNetV2 1.58-1.63x to 1.55-1.56x; the GPT
#   stack and ViT-S were level (1.06x, 1.33-1.43x);
# - channels_last (GPU_CHANNELS_LAST) was level in one run (ResNet-50 b8 1.36x vs 1.37x, MobileNetV2
#   1.50-1.58x vs 1.55-1.56x) and not in another: off, which needs no layout conversions;
# - every pass as on the CPU (the CPU kernels run their references or SDPA there, behind wrappers) was level
#   or behind: ViT-S 1.24-1.33x vs 1.33-1.43x, the GPT stack 0.97-1.02x vs 1.06-1.11x; expanding
#   nn.TransformerEncoderLayer into primitive ops was level with its native fused fast path (1.08x vs 1.07x);
#   measured alone (bench_kernels.py --device cuda), ops.max_pool2d_inference ran 0.72-0.82x eager's max-pool
#   and ops.rms_norm_inference 0.17x F.rms_norm.
#: Passes tg.optimize skips for a model whose weights are on a GPU, with why.
GPU_SKIPPED_PASSES = {
    "expand_transformer_layers": "level with nn.TransformerEncoderLayer's native fused fast path, which stays",
    "fuse_conv_add": "needs channels_last (GPU_CHANNELS_LAST is off)",
    "fuse_qkv_attention": "a CPU kernel: on the GPU it is split + SDPA + merge as written, behind a wrapper",
    "use_inference_attention": "a CPU kernel: on the GPU it is SDPA behind a wrapper",
    "fuse_rms_norm": "a CPU kernel: on the GPU its reference ran 0.17x F.rms_norm",
    "use_inference_max_pool": "the CUDA max-pool kernel ran 0.72-0.82x eager's",
}
#: Passes tg.optimize also skips for a model on a GPU with ``inference=False`` (NOTE: [Training on a GPU]).
GPU_TRAINING_SKIPPED_PASSES = {
    "fuse_linear_act": "bias + activation forward and backward through a custom op: 0.52x eager's autograd",
    "fuse_conv_act": "the same bias + activation op as linears'",
    "fuse_add_layer_norm": "add + LayerNorm forward and backward: 0.54-0.57x eager's autograd",
    "fuse_add_relu": "add + ReLU forward and backward: 0.67x eager's autograd",
}
# NOTE: [Training on a GPU] the fused ops' backward goes through custom ops, whose host time per call a
# GPU at these sizes feels: forward + backward on an H200 (bench_kernels.py --device cuda --quick, 2026-12-04)
# ran 0.52x eager's autograd for bias + GELU (1024 x 1024), 0.54-0.57x for add + LayerNorm (1024 x 1024 and
# x 256), 0.67x for add + ReLU (8 x 64 x 32 x 32). So a trainable model on a GPU keeps eager's ops: it gets the
# inlining and canonical forms (and attention written as SDPA), not the fused calls.
#: Whether convolution stacks run channels_last on a GPU when ``channels_last`` is left to tg.optimize.
GPU_CHANNELS_LAST = False


def _rewrite(model: Model, inference: bool, channels_last: bool | None,
             compute_dtype: torch.dtype | None, on_gpu: bool) -> Model:
    # NOTE: [Copy once] With inference=True, folding replaces the weight of every Conv2d followed by
    # a BatchNorm, so copying it first would copy ~90% of a ResNet's bytes twice: deepcopy shares
    # the Conv2d weights, and _unshare copies whatever a pass did not replace.
    shared = {id(m.weight): m.weight for m in model.modules() if type(m) is nn.Conv2d} if inference else {}
    root = copy.deepcopy(model, dict(shared))
    graph = root.graph
    skipped = {}
    if on_gpu:  # NOTE: [Passes on a GPU], NOTE: [Training on a GPU]
        skipped = GPU_SKIPPED_PASSES if inference else {**GPU_SKIPPED_PASSES, **GPU_TRAINING_SKIPPED_PASSES}
    if channels_last is None:
        channels_last = GPU_CHANNELS_LAST if on_gpu else True

    def run(name: str, *args, **kwargs) -> None:
        if name not in skipped:
            getattr(passes, name)(root, graph, *args, **kwargs)

    if inference:
        root.eval()
    run("inline_modules")
    run("canonicalize", inference)
    if inference:
        run("expand_transformer_layers")
        run("fold_batchnorm")
        run("fold_preactivation_batchnorm")
        run("fold_layer_scale")
    run("write_gelu_as_function")  # HuggingFace's spellings (passes/written_layers.py)
    if inference:
        run("linear_from_addmm")
    run("sink_activation_through_view")
    run("fuse_linear_act")
    run("fuse_conv_act", channels_last=inference and channels_last)
    _unshare(root, set(shared))
    run("write_attention_as_sdpa")
    run("fuse_qkv_attention")
    if inference:
        run("use_inference_attention")
        run("drop_repeated_kv")
        run("fuse_rms_norm")
    run("fuse_add_layer_norm")
    run("fuse_add_relu")
    if inference:
        run("use_inference_max_pool")
        if channels_last:
            run("fuse_conv_add")
            run("keep_layout_local", float32=compute_dtype is None)
            if compute_dtype is None:  # the kernel is float32's; the pool measured in float32 only
                run("fuse_expand_depthwise")
                run("use_global_avg_pool")
    if compute_dtype is not None:
        passes.compute_in(root, graph, compute_dtype)
    return _rebuild(root, graph)


def _compute_dtype(dtype, inference: bool, device: torch.device) -> torch.dtype | None:
    """``torch.bfloat16`` when asked for and supported on ``device`` (the model's weights'), else None (float32)."""
    if dtype is None or dtype == torch.float32:
        return None
    if dtype != torch.bfloat16:
        raise ValueError(f"tg.optimize: dtype must be None, torch.float32 or torch.bfloat16; received {dtype}. "
                         "Other dtypes: convert the model yourself (model.to(dtype)) before or after optimizing.")
    if not inference:
        raise ValueError("tg.optimize: dtype=torch.bfloat16 is for inference; received inference=False. "
                         "For bfloat16 training use torch.autocast('cpu', torch.bfloat16) around the "
                         "optimized model, or drop dtype.")
    # NOTE: [bfloat16 where the weights are] the model runs where its weights are: a model on a GPU is
    # asked about that GPU (cuDNN / cuBLAS bf16 kernels), not about the host CPU, whose lack of bf16
    # instructions would otherwise keep a GPU model in float32.
    if device.type == "cuda":
        supported, why = passes.cuda_bfloat16_supported(device)
    else:
        supported, why = passes.bfloat16_supported()
    if not supported:
        warnings.warn(f"tg.optimize: dtype=torch.bfloat16 requested, but {why}: computing in float32 "
                      "instead (bfloat16 would be emulated, slower than float32).", UserWarning, stacklevel=3)
        return None
    return torch.bfloat16


def _weights_device(model: nn.Module) -> torch.device:
    """Where the model's weights are: the first device other than the CPU among its parameters and buffers
    (``probing.data_device``, the rule real probes follow), else the CPU."""
    return data_device(model) or torch.device("cpu")


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
    for module in result.modules():
        if isinstance(module, nn.RNNBase):
            # NOTE: [Copied RNN weights] the copy holds each weight apart; cuDNN wants them in one buffer, or
            # every call warns and compacts them first (nn.LSTM on an H200: 0.75x eager). A no-op on the CPU.
            module.flatten_parameters()
    result.recompile()
    return result


def _delete_unused_submodules(model: nn.Module) -> None:
    # fx's own delete_all_unused_submodules keeps modules reached via get_attr ("conv1.weight") but
    # not their parents' other children; ours only drops layers nothing in the graph refers to.
    model.delete_all_unused_submodules()
