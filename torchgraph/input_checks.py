"""Checks of a model's inputs at call time: count, rank, static dims, dtype, shared dims and bounds.

NOTE: [Input checks] They run eagerly only, before the generated forward: traced and compiled
programs (torch.compile, torch.export, ONNX) never see them. A model with one input and no bounds
checks only its rank, static dims and dtype (~1 us); dims shared between inputs (the batch, a named
dim such as "T") are compared across inputs, and bounded dims (tg.Dim(..., max=...)) against their
bounds, so a model never silently broadcasts a batch of 1 against a batch of 2.
"""

from __future__ import annotations

import itertools

import torch
import torch.fx as fx

__all__ = ["cast_float_dtype", "check_call", "input_checks", "model_float_dtype"]


def _dim_key(dim):
    """Inputs share a dim when they have the same named dim, the batch, or the same anonymous dim."""
    name = getattr(dim, "name", None)
    if name is not None:
        return ("name", name)
    if tuple(dim.probes) == (2, 3):
        return ("batch",)
    return ("dim", id(dim))


def _label(dim, i: int) -> str:
    name = getattr(dim, "name", None)
    if name is not None:
        return f"'{name}'"
    return "the batch dim" if i == 0 and tuple(dim.probes) == (2, 3) else f"dim {i}"


def cast_float_dtype(fn) -> torch.dtype | None:
    """The floating dtype that ``model._apply(fn)`` casts to (``model.half()``, ``.to(torch.bfloat16)``), else None.

    NOTE: [Cast without parameters] A model's floating inputs may come in the build dtype or in its
    parameters' dtype (``model.to(torch.bfloat16)``, then bf16 inputs). A model without floating
    parameters or buffers has no parameter to read that cast from, so ``Model._apply`` asks ``fn``
    what it does to a float32 and a float64 tensor and remembers the answer: after ``model.half()``
    such a model takes float16 inputs, as the same code run eagerly would. A device move keeps each
    dtype (nothing to remember), and an ``fn`` that fails on a CPU tensor (a move to a device this
    process lacks) tells nothing either.

    Example:
        >>> import torch
        >>> cast_float_dtype(lambda t: t.half() if t.is_floating_point() else t)
        torch.float16
        >>> cast_float_dtype(lambda t: t.cpu()) is None   # a device move: each dtype kept
        True
    """
    try:
        probes = [fn(torch.zeros((), dtype=dtype)) for dtype in (torch.float32, torch.float64)]
    except Exception:  # noqa: BLE001 - an fn that cannot run here says nothing about dtypes
        return None
    dtypes = {p.dtype if isinstance(p, torch.Tensor) else None for p in probes}
    if len(dtypes) != 1:  # each kept its own dtype: a device move, not a cast
        return None
    dtype = dtypes.pop()
    return dtype if dtype is not None and dtype.is_floating_point else None


def model_float_dtype(model) -> torch.dtype | None:
    """The dtype of the model's first floating parameter or buffer; without any, the floating dtype it
    was last cast to (NOTE: [Cast without parameters]); else None."""
    state = itertools.chain(model.parameters(), model.buffers())
    return next((t.dtype for t in state if t.dtype.is_floating_point), model.__dict__.get("_tg_float_dtype"))


def input_checks(model) -> tuple:
    """``(static checks per input, shared dim groups, bounds)`` from the placeholders' specs."""
    from .value_spec import ValueSpec

    per_input = []
    float_dtype = model_float_dtype(model)
    occurrences: dict = {}
    bounds = []
    for node in model.graph.nodes:
        if node.op != "placeholder":
            continue
        spec = node.meta.get("tg_spec")
        if not isinstance(spec, ValueSpec) or spec.shape is None:
            continue
        static = tuple((i, d) for i, d in enumerate(spec.shape) if isinstance(d, int) and i > 0)
        allowed = {spec.dtype}
        if spec.dtype.is_floating_point and float_dtype is not None:
            allowed.add(float_dtype)
        index = len(per_input)
        per_input.append((node.name, len(spec.shape), static, frozenset(allowed), spec))
        for i, dim in enumerate(spec.dims or ()):
            if isinstance(dim, int):
                continue
            occurrences.setdefault(_dim_key(dim), []).append((index, i, dim))
            low, high = getattr(dim, "min", 0) or 0, getattr(dim, "max", None)
            if low > 0 or high is not None:
                bounds.append((index, i, low, high, dim))
    shared = tuple(tuple(group) for group in occurrences.values() if len(group) > 1)
    return tuple(per_input), shared, tuple(bounds)


def check_call(model, checks: tuple, args: tuple, kwargs: dict) -> None:
    per_input, shared, bounds = checks
    n = len(per_input)
    by_keyword = {c[0] for c in per_input[len(args):]} if kwargs else None  # inputs not given by position
    if len(args) + len(kwargs) != n or (kwargs and not kwargs.keys() <= by_keyword):
        names = [c[0] for c in per_input]
        unexpected = [k for k in kwargs if k not in names]
        twice = [k for k in kwargs if k in names[:len(args)]]
        detail = "".join(f"; {what} {keys}" for what, keys in (("unexpected keyword(s)", unexpected),
                                                                  ("given twice", twice)) if keys)
        raise TypeError(f"{model._get_name()} takes {n} input(s) {names}; received {len(args)} positional "
                        f"and {len(kwargs)} keyword argument(s) {list(kwargs)}{detail}. Pass one tensor per "
                        "input, by position or by input name.")
    across = bool(shared or bounds)
    shapes = []
    for i, (name, ndim, static, allowed, spec) in enumerate(per_input):
        x = args[i] if i < len(args) else kwargs.get(name)
        if not isinstance(x, torch.Tensor):
            if x is None and name not in kwargs and i >= len(args):
                raise TypeError(f"{model._get_name()}: missing input '{name}'.")
            if isinstance(x, fx.Proxy):  # being traced by torch.fx: nothing to check
                return
            raise TypeError(f"{model._get_name()}: input '{name}' must be a tensor; received "
                            f"{type(x).__name__}.")
        shape = x.shape
        if len(shape) != ndim or any(shape[d] != size for d, size in static):
            raise ValueError(
                f"{model._get_name()}: input '{name}' expects shape {spec.format()}; received "
                f"{tuple(shape)}. (The first dim is the batch; dims shown as None may take any size.)"
            )
        if x.dtype not in allowed:
            want = " or ".join(sorted(str(d).replace("torch.", "") for d in allowed))
            raise ValueError(
                f"{model._get_name()}: input '{name}' expects dtype {want}; received "
                f"{str(x.dtype).replace('torch.', '')}. Cast the input (x.to({sorted(allowed, key=str)[0]})) or "
                "the model (model.to(dtype))."
            )
        if across:
            shapes.append(shape)
    if across:
        _check_across(model, per_input, shapes, shared, bounds)


def _check_across(model, per_input, shapes, shared, bounds) -> None:
    for group in shared:
        first, first_dim, _ = group[0]
        size = shapes[first][first_dim]
        for index, i, _ in group[1:]:
            if shapes[index][i] != size:
                _shared_mismatch(model, per_input, shapes, group, index, i)
    for index, i, low, high, dim in bounds:
        size = shapes[index][i]
        if size < low or (high is not None and size > high):
            name = per_input[index][0]
            bound = f"{low} <= size" + (f" <= {high}" if high is not None else "")
            raise ValueError(
                f"{model._get_name()}: input '{name}' dim {i} ({_label(dim, i)}) must satisfy {bound} "
                f"(declared with tg.Dim); received {size}. Pass a smaller or larger input, or rebuild the "
                "model with other bounds."
            )


def _shared_mismatch(model, per_input, tensors, group, index, i):
    first, first_dim, dim = group[0]
    a, b = per_input[first][0], per_input[index][0]
    raise ValueError(
        f"{model._get_name()}: inputs '{a}' and '{b}' share {_label(dim, first_dim)} (dim {first_dim} of "
        f"'{a}', dim {i} of '{b}'), so they need the same size there; received {tensors[first][first_dim]} "
        f"and {tensors[index][i]} (shapes {tuple(tensors[first])} and {tuple(tensors[index])}). Pass inputs "
        "that agree, or build the model with different dims for them."
    )
