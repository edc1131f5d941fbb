"""The exported model's inputs: names, dynamic dims, and example and verification values.

Example:
    >>> import torch, torch.nn as nn, torchgraph as tg
    >>> from torchgraph.export import input_specs
    >>> x = tg.Input(shape=(None, 4), name="seq")
    >>> [(s.name, s.dim_names) for s in input_specs(tg.Model(x, nn.Linear(4, 2)(x)))]
    [('seq', {0: 'batch', 1: 'seq_dim1'})]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from .failures import OnnxExportError

__all__ = ["InputSpec", "input_specs", "random_inputs", "example_sizes", "example_inputs", "eval_mode",
           "verification_plans"]

# Integer inputs that feed no embedding get values in [0, _SMALL_INT_RANGE): masks (see NOTE: [Masks]).
_SMALL_INT_RANGE = 2
# Ops through which an integer input keeps its values (so an embedding after them bounds the ids).
_ID_PRESERVING = frozenset({
    "getitem", "long", "int", "to", "view", "reshape", "flatten", "contiguous", "transpose", "permute",
    "unsqueeze", "squeeze", "narrow", "clone", "expand", "repeat", "t",
})


@dataclass
class InputSpec:
    """One model input: name, dtype, static sizes, dynamic dims and two valid sizes for each."""

    name: str
    dtype: torch.dtype
    sizes: tuple          # per dim: an int (static) or a pair of valid sizes (dynamic)
    dim_names: dict       # dim index -> ONNX dim name, for the dynamic dims
    high: int | None      # integer inputs: ids are drawn from [0, high)
    bounds: dict = field(default_factory=dict)  # dim index -> (min, max or None), for bounded dims
    mask: bool = False    # a bool input, or an integer one that feeds no embedding (NOTE: [Masks])

    def shape(self, which: int, batch: int | None = None) -> tuple:
        dims = [s if isinstance(s, int) else s[which] for s in self.sizes]
        if batch is not None and 0 in self.dim_names:
            dims[0] = batch
        return tuple(dims)


def input_specs(model: fx.GraphModule, dynamic_batch: bool = True) -> list[InputSpec]:
    """What each placeholder of ``model`` takes, from its ``tg_spec`` (shapes with dynamic dims)."""
    from ..value_spec import ValueSpec
    from ..replay import spec_dim

    specs, dim_names = [], {}
    for node in model.graph.nodes:
        if node.op != "placeholder":
            continue
        spec = node.meta.get("tg_spec")
        if not isinstance(spec, ValueSpec) or spec.shape is None:
            raise OnnxExportError(f"tg.export_onnx: input '{node.name}' has no torchgraph shape; only "
                                  "tensor inputs built with tg.Input can be exported.")
        sizes, names, bounds = [], {}, {}
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
                dim = spec_dim(spec, i)  # tg.Dim bounds, when this torchgraph has them
                low, high = getattr(dim, "min", 0) or 0, getattr(dim, "max", None)
                if low or high is not None:
                    bounds[i] = (low, high)
        high, mask = None, spec.dtype == torch.bool
        if not spec.dtype.is_floating_point and not spec.dtype.is_complex and not mask:
            high = _id_bound(model, node)
            mask = high is None
            high = _SMALL_INT_RANGE if mask else high
        specs.append(InputSpec(node.name, spec.dtype, tuple(sizes), names, high, bounds, mask))
    return specs


def _clamp(size: int, bounds: tuple | None) -> int:
    if bounds is None:
        return size
    low, high = bounds
    return max(low, size) if high is None else min(max(low, size), high)


# NOTE: [Verification sizes] Verification runs every dynamic dim at two sizes unlike the export
# example's, which the model must accept in torch: the batch at 3 then 5, and each other dim, in order
# of preference, at twice and three times its example size (when the example ran at small sizes, see
# example_sizes), at one and two past it, then at the two sizes the model was built with (probe
# sizes: 34 to 127 unless a tg.Dim bounds them, see NOTE: [Probe sizes] in dims.py). The first candidate at which the model runs in torch is compared with
# onnxruntime; the small ones come first because a position table (nn.Embedding(32) indexed by
# 0..T-1) rejects the build sizes, and an LSTM verified at hundreds of steps takes seconds. A
# tg.Dim's bounds clamp every candidate; verify_sizes fixes a dim's sizes in all of them.
def verification_plans(specs: list[InputSpec], verify_sizes: dict | None = None,
                       example: dict[str, int] | None = None) -> list[list[dict[str, int]]]:
    """Candidate sizes for the two verification runs, in order of preference (NOTE: [Verification
    sizes]): each candidate is ``[run 0 sizes, run 1 sizes]``, by ONNX dim name.

    ``verify_sizes`` maps a dim name to a size or to a pair of sizes (one per run); ``example`` gives
    the export example's size of the dims that ran small (:func:`example_sizes`).
    """
    dims: dict[str, tuple] = {}  # name -> (build pair, bounds, is the batch)
    for s in specs:
        for i, name in s.dim_names.items():
            dims.setdefault(name, ((s.sizes[i][1], s.sizes[i][0]), s.bounds.get(i), i == 0))
    given = _given_sizes(dims, verify_sizes)
    example = example or {}
    candidates = []
    for kind in ("double", "next", "build"):
        plan = {}
        for name, (build, bounds, batch) in dims.items():
            e = example.get(name)
            if name in given:
                pair = given[name]
            elif batch:
                pair = tuple(_clamp(p, bounds) for p in (3, 5))
            elif kind == "double" and e:
                pair = tuple(_clamp(p, bounds) for p in (2 * e, 3 * e))
            elif kind == "next" and e:
                pair = tuple(_clamp(p, bounds) for p in (e + 1, e + 2))
            else:
                pair = tuple(_clamp(p, bounds) for p in build)
            plan[name] = pair
        runs = [{n: p[run] for n, p in plan.items()} for run in (0, 1)]
        if runs not in candidates:
            candidates.append(runs)
    return candidates


def _given_sizes(dims: dict, verify_sizes) -> dict[str, tuple]:
    """``verify_sizes`` checked: dim name -> (size, size)."""
    if verify_sizes is not None and not isinstance(verify_sizes, dict):
        raise TypeError(f"tg.export_onnx: verify_sizes must be a dict of dim name -> size or (size, size); "
                        f"received {type(verify_sizes).__name__}.")
    given = {}
    for name, value in (verify_sizes or {}).items():
        if name not in dims:
            raise ValueError(f"tg.export_onnx: verify_sizes names {name!r}, which is not a dynamic dim of the "
                             f"model. Expected some of {sorted(dims)}.")
        pair = (value, value) if isinstance(value, int) else value
        low, high = dims[name][1] or (0, None)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and max(low, 1) <= v and (high is None or v <= high)
                for v in pair)):
            raise ValueError(f"tg.export_onnx: verify_sizes[{name!r}] must be a size or a pair of sizes in "
                             f"[{max(low, 1)}, {'inf' if high is None else high}]; received {value!r}.")
        given[name] = tuple(pair)
    return given


def _id_bound(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The smallest ``num_embeddings`` among the embeddings ``node`` feeds (through id-preserving ops);
    None when it feeds none."""
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
    bounds = [b for b in bounds if b is not None]
    return min(bounds) if bounds else None


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
        if s.mask:
            t = _padding_mask(shape, s.dtype, g)
        elif s.high is not None:
            t = torch.randint(0, s.high, shape, generator=g).to(s.dtype)
        else:
            t = torch.randn(shape, generator=g).to(s.dtype)
        out.append(t.to(device))
    return out


# NOTE: [Masks] A bool input, or an integer one that feeds no embedding, is taken for a mask: random
# values would mask whole rows (every key of a query), whose outputs no runtime defines (NaN in torch's
# attention, zeros or the mean of the values in others: issue 13 saw ONNX Runtime and torch differ on
# GPT-2 there). So each row along the last dim is right-padded as real batches are: a prefix of l >= 1
# real positions (False in PyTorch's key_padding_mask convention, 1 in Hugging Face's attention_mask)
# and padding after it (True / 0). The first position is always real, so causal attention keeps a key.
def _padding_mask(shape: list, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if not shape:
        real = torch.tensor(True)
    else:
        length = max(shape[-1], 1)
        lengths = torch.randint(1, length + 1, (*shape[:-1], 1), generator=g)
        real = torch.arange(shape[-1]) < lengths
    return ~real if dtype == torch.bool else real.to(dtype)


def example_sizes(model: nn.Module, specs: list[InputSpec], device) -> dict[str, int]:
    """Small sizes for the non-batch dynamic dims (by ONNX dim name) when the model runs at them in
    torch, else ``{}`` (the sizes it was built with); see NOTE: [Export example size].

    NOTE: [Export example size] Exporting an LSTM/GRU unrolls it over the example's sequence length
    while tracing (the file still gets one ONNX LSTM/GRU op): 48 steps cost ~20 s, 8 steps ~3 s. So
    the non-batch dynamic dims get distinct sizes 8, 9, ... if one eager forward succeeds at them
    (a strided CNN may need larger), else the sizes the model was built with. The batch stays 2: an
    example batch of 1 would be specialised by torch.export.
    """
    small: dict[str, int] = {}
    for s in specs:
        for i, name in s.dim_names.items():
            if i > 0 and min(s.sizes[i]) > 8 + len(small) and name not in small:
                small[name] = _clamp(8 + len(small), s.bounds.get(i))
    if not small:
        return {}
    trial = tuple(random_inputs(specs, 0, device=device, sizes=small))
    try:
        with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(*trial)
    except Exception:  # noqa: BLE001 - the model needs larger sizes: use the build sizes
        return {}
    return small


def example_inputs(model: nn.Module, specs: list[InputSpec], device, sizes: dict[str, int] | None = None) -> tuple:
    """The inputs to export with: the dynamic dims at ``sizes`` (default :func:`example_sizes`).

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> from torchgraph.export import example_inputs, input_specs
        >>> x = tg.Input(shape=(None, 4), name="seq")
        >>> model = tg.Model(x, nn.Linear(4, 2)(x))
        >>> [tuple(t.shape) for t in example_inputs(model, input_specs(model), "cpu")]
        [(2, 8, 4)]
    """
    if sizes is None:
        sizes = example_sizes(model, specs, device)
    return tuple(random_inputs(specs, 0, device=device, sizes=sizes))


class eval_mode:
    """Puts a module in eval mode and restores each submodule's training flag afterwards."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
