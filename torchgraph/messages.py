"""Build-time error messages: who failed, what it received, what it expected, how to fix it.

Template (see STYLE.md): "<who, by name>: <what happened>. Expected <x>; received <y>. <fix>."
Shapes are shown with dynamic dims as ``None`` (or their name), never as the probe sizes used inside.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

__all__ = ["describe_module", "module_failure", "function_failure", "precheck", "user_location"]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def user_location() -> str:
    """``"file.py:12"`` of the innermost frame outside torch and torchgraph (the user's line)."""
    f = sys._getframe(1)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if not (path.startswith(_PKG_DIR) or path.startswith(_TORCH_DIR) or path.startswith("<")):
            return f"{os.path.basename(path)}:{f.f_lineno}"
        f = f.f_back
    return "<unknown>"


def describe_module(module: nn.Module) -> str:
    """``Layer 'encoder' (Linear(in_features=64, out_features=10, bias=True))``."""
    from .naming import user_name

    name = user_name(module)
    extra = module.extra_repr() if hasattr(module, "extra_repr") else ""
    cls = type(module).__name__
    if len(extra) > 120:
        extra = extra[:117] + "..."
    who = f"{cls}({extra})"
    return f"Layer '{name}' ({who})" if name else f"Layer {who}"


def _shape_of(o) -> str | None:
    from .symbolic import SymbolicInt, SymbolicTensor, format_shape

    if isinstance(o, SymbolicInt):
        return "a dynamic size (int)"
    if isinstance(o, SymbolicTensor):
        v = o._tg_value
        if v is not None:
            return f"{format_shape(v.dims)} {str(v.dtype).replace('torch.', '')}"
        return f"{tuple(o._tg_shadow.shape)} {str(o._tg_shadow.dtype).replace('torch.', '')}"
    if isinstance(o, torch.Tensor):
        return f"{tuple(o.shape)} {str(o.dtype).replace('torch.', '')} (a constant)"
    return None


def _input_shapes(args, kwargs) -> list[str]:
    from .trees import tree_leaves

    out = []
    for _, leaf in tree_leaves((args, kwargs)):
        s = _shape_of(leaf)
        if s is not None:
            out.append(s)
    return out


def _first_symbolic(args):
    from .trees import tree_leaves
    from .symbolic import SymbolicTensor

    for _, leaf in tree_leaves(args):
        if isinstance(leaf, SymbolicTensor) and leaf._tg_value is not None:
            return leaf._tg_value
    return None


def _layer_hint(module: nn.Module, args) -> str | None:
    """What the layer expects and how to fix the call, for the layers people use most."""
    v = _first_symbolic(args)
    if v is None or v.dims is None:
        return None
    shape, ndim, dtype = v.dims, len(v.dims), v.dtype
    last = shape[-1] if ndim else None
    if isinstance(module, nn.Linear) and isinstance(last, int) and last != module.in_features:
        return (f"Expected the last dim to be in_features={module.in_features}; received {last}. "
                f"Fix: use nn.Linear({last}, {module.out_features}), or make the previous layer output "
                f"{module.in_features} features.")
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                           nn.ConvTranspose3d)):
        spatial = len(module.kernel_size)
        if ndim not in (spatial + 1, spatial + 2):
            return (f"Expected a {spatial + 2}-d input (batch, channels, {spatial} spatial dims); received "
                    f"{ndim} dims. Fix: reshape the input, or use Conv{ndim - 2}d.")
        channels = shape[1] if ndim == spatial + 2 else shape[0]
        if isinstance(channels, int) and channels != module.in_channels:
            name = type(module).__name__
            return (f"Expected {module.in_channels} input channels (in_channels); received {channels}. "
                    f"Fix: use nn.{name}({channels}, {module.out_channels}, ...), or make the previous "
                    f"layer output {module.in_channels} channels.")
        return ("The input is smaller than the kernel (after padding) in some spatial dim. Fix: a larger "
                "input, padding, or a smaller kernel/stride earlier in the model.")
    if isinstance(module, (nn.modules.batchnorm._NormBase,)) and ndim >= 2:
        if isinstance(shape[1], int) and shape[1] != module.num_features:
            return (f"Expected {module.num_features} channels (num_features) in dim 1; received {shape[1]}. "
                    f"Fix: use {type(module).__name__}({shape[1]}).")
    if isinstance(module, nn.LayerNorm):
        norm = tuple(module.normalized_shape)
        got = tuple(shape[-len(norm):]) if ndim >= len(norm) else tuple(shape)
        if got != norm:
            return (f"Expected the trailing dims to be normalized_shape={norm}; received "
                    f"{tuple(None if not isinstance(d, int) else d for d in got)}. Fix: "
                    f"nn.LayerNorm({got[-1] if got else '...'}) or reshape the input.")
    if isinstance(module, nn.Embedding) and (dtype.is_floating_point or dtype == torch.bool):
        return (f"Expected integer indices (torch.long); received {str(dtype).replace('torch.', '')}. "
                f"Fix: tg.Input(..., dtype=torch.long).")
    if isinstance(module, nn.MultiheadAttention) and isinstance(last, int) and last != module.embed_dim:
        return (f"Expected the last dim to be embed_dim={module.embed_dim}; received {last}.")
    if isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)) and isinstance(last, int) and last != module.input_size:
        return (f"Expected the last dim to be input_size={module.input_size}; received {last}. "
                f"Fix: nn.{type(module).__name__}({last}, {module.hidden_size}).")
    return None


def precheck(module: nn.Module, args) -> str | None:
    """Checks that meta kernels do not make on every torch version (e.g. Embedding's index dtype)."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        v = _first_symbolic(args)
        if v is not None and v.dtype is not None and (v.dtype.is_floating_point or v.dtype == torch.bool):
            shape = _input_shapes(args, {})
            return (f"{describe_module(module)} cannot be called on input of shape {', '.join(shape)}. "
                    f"{_layer_hint(module, args)} (at {user_location()})")
    return None


def _torch_detail(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(text) > 300:
        text = text[:297] + "..."
    return (f"torch reported: {type(exc).__name__}: {text} (sizes in torch's message use probe values "
            "for dynamic dims).")


def module_failure(module: nn.Module, args, kwargs, exc: BaseException) -> str:
    shapes = _input_shapes(args, kwargs)
    received = ", ".join(shapes) if shapes else "no tensors"
    head = f"{describe_module(module)} cannot be called on input of shape {received}"
    hint = _layer_hint(module, args)
    parts = [head + "."]
    if hint:
        parts.append(hint)
    parts.append(_torch_detail(exc))
    parts.append(f"(at {user_location()})")
    return " ".join(parts)


def _function_hint(name: str, args) -> str | None:
    from .trees import tree_leaves
    from .symbolic import SymbolicTensor

    tensors = [leaf._tg_value for _, leaf in tree_leaves(args)
               if isinstance(leaf, SymbolicTensor) and leaf._tg_value is not None]
    if name in ("cat", "concat", "concatenate") and len(tensors) >= 2:
        return ("torch.cat needs all tensors to have the same number of dims and equal sizes in every dim "
                "except the one being concatenated.")
    if name in ("stack",):
        return "torch.stack needs all tensors to have exactly the same shape."
    if name in ("matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "linear"):
        return "For a @ b the last dim of a must equal the second-to-last dim of b (the inner dims)."
    if name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
                "add", "sub", "mul", "div"):
        return ("Elementwise operations need shapes that broadcast: aligned from the right, each pair of "
                "dims equal or one of them 1.")
    if name in ("view", "reshape"):
        return "The new shape must have the same number of elements; use -1 for one inferred dim."
    return None


def function_failure(name: str, func, args, kwargs, exc: BaseException) -> str:
    shapes = _input_shapes(args, kwargs)
    pretty = name.strip("_") if name.startswith("__") else name
    head = f"'{pretty}' cannot be applied to inputs of shape {', '.join(shapes) or '(none)'}."
    parts = [head]
    hint = _function_hint(name, args)
    if hint:
        parts.append(hint)
    parts.append(_torch_detail(exc))
    parts.append(f"(at {user_location()})")
    return " ".join(parts)
