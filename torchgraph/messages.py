"""Build-time error messages: who failed, what it received, what it expected, how to fix it.

Template (see STYLE.md): "<who, by name>: <what happened>. Expected <x>; received <y>. <fix>."
Shapes are shown with dynamic dims as ``None`` (or their name), never as the probe sizes used inside.
"""

from __future__ import annotations

import linecache
import os
import sys

import torch
import torch.nn as nn

__all__ = ["below_torch_function", "called_from_torch", "describe_call", "describe_module", "dtype_number_as_number",
           "dynamic_number_output", "dynamic_size_as_number", "frame_line", "function_failure", "inner_failure",
           "input_reshaped_in_place", "layer_hint", "module_failure", "precheck", "replay_mismatch", "tensor_shape", "untracked_output", "user_frame",
           "user_location"]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def user_frame():
    """The innermost frame outside torch and torchgraph (the user's line), or None."""
    f = sys._getframe(1)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if not (path.startswith(_PKG_DIR) or path.startswith(_TORCH_DIR) or path.startswith("<")):
            return f
        f = f.f_back
    return None


def frame_line(frame) -> tuple[str, str]:
    """``("file.py:12", the stripped source line)`` of ``frame`` (``"<unknown>"`` and ``""`` for None)."""
    if frame is None:
        return "<unknown>", ""
    where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
    return where, linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()


def user_location() -> str:
    """``"file.py:12"`` of the innermost frame outside torch and torchgraph (the user's line)."""
    return frame_line(user_frame())[0]


def called_from_torch() -> bool:
    """Whether the innermost frame outside torchgraph is torch's own code (e.g. a layer's __init__)."""
    f = sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_PKG_DIR):
        f = f.f_back
    return f is not None and os.path.abspath(f.f_code.co_filename).startswith(_TORCH_DIR)


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
    return layer_hint(module, v.dims, v.dtype)


def _linear_hint(module: nn.Linear, shape: tuple, last) -> str:
    expect = f"Expected the last dim to be in_features={module.in_features}; received {last}."
    trailing = shape[1:]
    flat = None
    if len(shape) > 2 and all(isinstance(d, int) for d in trailing):
        flat = 1
        for d in trailing:
            flat *= d
    if flat == module.in_features:
        return (f"{expect} Fix: flatten the input first (x.flatten(1) or nn.Flatten() gives (None, {flat})); "
                "a Linear only mixes the last dim.")
    fix = f"Fix: use nn.Linear({last}, {module.out_features}), or make the previous layer output " \
          f"{module.in_features} features."
    if flat is not None:
        fix += (f" If the input should be flattened, x.flatten(1) gives {flat} features: "
                f"nn.Linear({flat}, {module.out_features}).")
    return f"{expect} {fix}"


def layer_hint(module: nn.Module, shape: tuple, dtype) -> str | None:
    """The hint for ``module`` called on a tensor with ``shape`` (ints, dynamic dims) and ``dtype``."""
    ndim = len(shape)
    last = shape[-1] if ndim else None
    weight = next((p for p in module.parameters(recurse=False) if p.dtype.is_floating_point), None)
    if weight is not None and dtype is not None and dtype.is_floating_point and dtype != weight.dtype:
        have, want = str(dtype).replace("torch.", ""), str(weight.dtype).replace("torch.", "")
        return (f"Expected a {want} input (the layer's weights are {want}); received {have}. Fix: cast the "
                f"input (x.to(torch.{want})) or the layer (layer.to(torch.{have})).")
    if isinstance(module, nn.Linear) and isinstance(last, int) and last != module.in_features:
        return _linear_hint(module, tuple(shape), last)
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


def _pretty_path(path: str) -> str:
    """``layer3.1.conv1`` -> ``layer3[1].conv1`` (indices of Sequential/ModuleList as subscripts)."""
    out = ""
    for part in path.split("."):
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _short_repr(module: nn.Module) -> str:
    extra = module.extra_repr() if hasattr(module, "extra_repr") else ""
    if len(extra) > 120:
        extra = extra[:117] + "..."
    return f"{type(module).__name__}({extra})"


def module_failure(module: nn.Module, args, kwargs, exc: BaseException, inner: tuple | None = None) -> str:
    """The message for a layer whose probe run failed; ``inner`` names the failing sub-layer."""
    shapes = _input_shapes(args, kwargs)
    received = ", ".join(shapes) if shapes else "no tensors"
    head = f"{describe_module(module)} cannot be called on input of shape {received}"
    parts = [head + "."]
    if inner is not None:
        from .dims import dim_for_probes
        from .symbolic import format_shape

        path, layer, pairs = inner
        inner_shapes = []
        first = None
        for s0, s1, dtype in pairs:
            dims = tuple(dim_for_probes(a, b) for a, b in zip(s0, s1)) if len(s0) == len(s1) else s0
            first = first or (dims, dtype)
            inner_shapes.append(f"{format_shape(dims)} {str(dtype).replace('torch.', '')}")
        parts.append(f"Inside it, {_pretty_path(path)}: {_short_repr(layer)} failed on input of shape "
                     f"{', '.join(inner_shapes) or 'no tensors'}.")
        hint = layer_hint(layer, *first) if first is not None else None
    else:
        hint = _layer_hint(module, args)
    if hint:
        parts.append(hint)
    parts.append(_torch_detail(exc))
    parts.append(f"(at {user_location()})")
    return " ".join(parts)


def inner_failure(module: nn.Module, exc: BaseException, k: int, rerun) -> tuple | None:
    """``(path, layer, [(shape at probe 0, shape at probe 1, dtype), ...])`` of the innermost failing
    sub-layer; the other probe is run again to tell its static dims from its dynamic ones."""
    first = _innermost_call(module, exc)
    if first is None:
        return None
    path, layer, shapes = first
    other = shapes
    try:
        rerun(1 - k)
    except Exception as exc1:  # noqa: BLE001 - the same failure at the other probe size
        second = _innermost_call(module, exc1)
        if second is not None and second[0] == path and len(second[2]) == len(shapes):
            other = second[2]
    pairs = [(a[0], b[0], a[1]) for a, b in zip(shapes, other)]
    if k == 1:
        pairs = [(b, a, dtype) for a, b, dtype in pairs]
    return (path, layer, pairs)


def _innermost_call(module: nn.Module, exc: BaseException):
    from .symbolic import SymbolicTensor
    from .trees import tree_leaves

    names = {id(m): n for n, m in module.named_modules() if n}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        f = tb.tb_frame
        if f.f_code is nn.Module._call_impl.__code__:
            layer = f.f_locals.get("self")
            if id(layer) in names:
                shapes = [(tuple(leaf._tg_shadow.shape), leaf._tg_shadow.dtype)
                          for _, leaf in tree_leaves(f.f_locals.get("args", ()))
                          if isinstance(leaf, SymbolicTensor) and leaf._tg_shadow is not None]
                found = (names[id(layer)], layer, shapes)
        tb = tb.tb_next
    return found


def untracked_output(module: nn.Module, path: tuple, left_torch: bool) -> str:
    where = f" (output {list(path)})" if path else ""
    if left_torch:
        return (f"{describe_module(module)} returned a tensor{where} made from data that left torch (its "
                "forward calls .numpy()/.tolist(), so it was probed with small real tensors, and the "
                "result came back through torch.from_numpy or another call torch does not let torchgraph "
                "see). torchgraph cannot connect that tensor to the layer's inputs, so it would be a "
                "constant of the build sizes. Expected tensors made by torch functions. Fix: use "
                "torch.as_tensor(array) (or x.new_tensor(array)) instead of torch.from_numpy(array); "
                f"those are seen and recorded. (at {user_location()})")
    return (f"{describe_module(module)} returned a tensor{where} that torchgraph did not see being made: "
            "it was created outside torch functions (by a C extension, or kept from an earlier call), so "
            "it may be a constant of the build sizes. Expected outputs computed by torch operations. "
            f"Compute it with torch functions in forward, or register it as a buffer. (at {user_location()})")


def lost_call(module: nn.Module, path: tuple) -> str:
    where = f" (output {list(path)})" if path else ""
    return (f"{describe_module(module)}: its forward depends on the data or on random draws (it was "
            f"probed with small real tensors), and on that data it returned its input object unchanged{where}, "
            "so the call cannot be recorded: the model would skip the layer whatever the data. Expected a forward that "
            "computes its outputs. Make that branch compute something (`return x.clone()`), or make the "
            f"condition depend on shapes only. (at {user_location()})")


def dynamic_number_output(module: nn.Module, path: tuple) -> str:
    where = f" (output {list(path)})" if path else ""
    return (f"{describe_module(module)} returned a Python number{where} that depends on a dynamic size "
            "(it differs between the sizes torchgraph probes with), and a model cannot return a Python "
            "number computed at build time. Expected tensor outputs. Return it as a tensor "
            f"(torch.tensor(n)), or compute it at the top level from x.size(...). (at {user_location()})")


def input_reshaped_in_place(module: nn.Module, value) -> str:
    from .symbolic import format_shape

    return (f"{describe_module(module)} changes the shape of its input of shape {format_shape(value.dims)} "
            "in place (e.g. x.unsqueeze_(0)); later uses of that input outside the layer would see a "
            "shape torchgraph cannot follow. Expected in-place ops that keep the shape. Use the "
            f"out-of-place op (x = x.unsqueeze(0)). (at {user_location()})")


def tensor_shape(t: torch.Tensor) -> tuple:
    """A tensor's shape at probe 0: a shadow's probe, a recorded value's first probe, a real tensor's own."""
    from .symbolic import SymbolicTensor

    if isinstance(t, SymbolicTensor):
        return tuple(t._tg_shadow.shape if t._tg_shadow is not None else t._tg_value.probes[0].shape)
    return tuple(t.shape)


def _describe_argument(o, known: dict, depth: int = 0) -> str:
    from .symbolic import SymbolicInt, SymbolicTensor, format_shape

    if isinstance(o, SymbolicTensor):
        v = o._tg_value
        if v is not None:
            return f"{format_shape(v.dims)} {str(v.dtype).replace('torch.', '')}"
        shape = known.get(id(o)) or tensor_shape(o)
        return f"{format_shape(shape)} {str(o._tg_shadow.dtype).replace('torch.', '')}"
    if isinstance(o, torch.Tensor):
        return f"{known.get(id(o), 'constant')} {format_shape(tuple(o.shape))} {str(o.dtype).replace('torch.', '')}"
    if isinstance(o, SymbolicInt):
        return "a dynamic size"
    if type(o) in (tuple, list) and depth < 2:
        inner = ", ".join(_describe_argument(x, known, depth + 1) for x in o[:6]) + (", ..." if len(o) > 6 else "")
        return f"({inner})" if type(o) is tuple else f"[{inner}]"
    if type(o) is slice:
        text = ":".join("" if x is None else _describe_argument(x, known, depth + 1) for x in (o.start, o.stop, o.step))
        return text.rstrip(":") or ":"
    text = repr(o)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_call(name: str, args, kwargs, known: dict | None = None) -> str:
    """``'masked_fill' on ((None, 2, 5, 5) float32, (1, 1, 5, 5) bool, -inf)``: a call and its arguments.

    ``known`` maps ``id`` of a tensor to what to show: the dims of a shadow (None where dynamic), the
    name of a real tensor (``"buffer 'bias'"``); other real tensors show as constants.
    """
    known = known or {}
    parts = [_describe_argument(a, known) for a in args]
    parts += [f"{k}={_describe_argument(v, known)}" for k, v in kwargs.items()]
    text = ", ".join(parts)
    if len(text) > 300:
        text = text[:297] + "..."
    return f"'{name}' on ({text})"


def replay_mismatch(module: nn.Module, position: int, expected: tuple | None, received: tuple, known: dict) -> str:
    """A layer's forward called again did not do what its probe run did (NOTE: [Module scopes]).

    ``expected`` and ``received`` are ``(kind, name, args, kwargs)``; ``expected`` is None when the
    probe run had no operation ``position``; ``known`` is as for :func:`describe_call`.
    """
    def describe(call) -> str:
        kind, name, args, kwargs = call
        text = describe_call(name, args, kwargs, known)
        if expected is not None and expected[1] == received[1] and expected[0] != received[0]:
            text += " (an operation on the inputs)" if kind == "op" else " (making a new tensor from plain values)"
        return text

    if expected is None:
        happened = ("its forward did more operations when it was called again than on its probe run. Expected "
                    f"{position - 1} operations, as on its probe run; received a call of {describe(received)} "
                    f"as operation {position}")
    else:
        happened = ("its forward did different operations when it was called again than on its probe run. "
                    f"Expected operation {position} to be {describe(expected)}, as on its probe run; "
                    f"received {describe(received)}")
    return (f"{describe_module(module)}: {happened}. torchgraph runs a layer's forward more than once while it "
            "builds the model (on probe tensors, then the call itself), and the runs must match. Make the "
            "forward choose its operations the same way each time: from its inputs' shapes and its settings, "
            "not from random numbers, call counters or other Python state that changes between calls. "
            f"(at {user_location()})")


def dynamic_size_as_number(what: str):
    from .errors import GraphBuildError

    return GraphBuildError(
        f"A dynamic size was used {what} (at {user_location()}): its value is only known when the model "
        "runs, and there it would become a fixed number before torchgraph can see the call, so the call "
        "cannot be recorded. Expected it where torch passes it on: in a size list (x.view(n, -1), "
        "torch.zeros(n, 4)), as an argument of a symbolic tensor's method (x.narrow(1, 0, n), x[:, :n]), "
        "or to a factory together with device=x.device (torch.arange(0, n, device=x.device) is "
        "recorded). To slice a real tensor or parameter by it, do it inside an nn.Module's forward "
        "(where sizes are plain ints) or index it with a recorded range: "
        "table[:, torch.arange(n, device=x.device)]."
    )


def dtype_number_as_number(what: str):
    from .errors import GraphBuildError

    return GraphBuildError(
        f"A number of a dtype (torch.finfo(x.dtype).min and the like) was used {what} (at {user_location()}): "
        "it depends on the dtype the model runs in (float32's min is not bfloat16's), so it cannot become a "
        "fixed number of a recorded model. Expected it passed to torch where the model computes with it "
        "(t * m, t.masked_fill(mask, m), torch.where(mask, 0.0, m), torch.full(size, m, device=x.device)), or "
        "in Python arithmetic on it (m - 1000). Code that needs it as a plain number belongs inside an "
        "nn.Module's forward, where dtypes are real."
    )


def below_torch_function(func, args):
    """The error for an operation that reached a symbolic tensor below the torch function layer."""
    from .errors import GraphBuildError
    from .symbolic import SymbolicInt

    name = str(func)
    if args and isinstance(args[0], SymbolicInt) and ("_local_scalar_dense" in name or "item" in name
                                                      or "detach" in name):
        from .type_info import dtype_source

        if dtype_source(args[0]._tg_value) is not None:
            return dtype_number_as_number("where torch takes a plain number (outside tg.from_module, "
                                          "torch.full(size, m) without device=x.device, torch.tensor(m))")
        return dynamic_size_as_number(
            "where torch takes a single number (torch.arange(n), t.narrow(0, 0, n) or torch.tensor(n), "
            "with t a real tensor)")
    return GraphBuildError(
        f"torchgraph: '{func}' reached a symbolic tensor below the torch function layer, where it "
        f"cannot be recorded (at {user_location()}). Expected torch functions and tensor methods called "
        "on symbolic tensors. Call this code inside an nn.Module's forward, or on real tensors."
    )


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
