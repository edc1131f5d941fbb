"""A model's input and output structure, and user data flattened into it.

Everything is normalised to flat tuples in the model's own order, so the loop never looks at
structure again:

  - inputs: a tuple of tensors in ``model.input_names`` order (dict inputs are matched by key);
  - targets (and sample weights): one tensor for a model whose output is a bare tensor, else a
    tuple in ``model.output_names`` order, also when a list or dict holds a single output;
  - outputs: ``flatten_outputs`` / ``pack_outputs`` convert between the model's output structure
    and that tuple.

Outputs may be addressed by their output name (``"output_0"``, a dict key) or, as in Keras, by the
name of the layer (or fx node) that produces them (``"linear_2"``), when that name is unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..trees import plain_containers, tree_leaves, tree_map

__all__ = ["IOInfo", "io_info", "to_tensor", "flatten_inputs", "flatten_targets", "flatten_outputs",
           "pack_outputs"]


@dataclass(frozen=True)
class IOInfo:
    """A model's input and output structure, as the data pipeline needs it."""

    input_names: tuple
    input_kind: str     # "single" | "list" | "tuple" | "dict"
    input_dtypes: tuple  # the dtype each input expects (None when unknown)
    output_names: tuple  # one per output tensor, flattened (nested outputs: "aux_0", ...)
    output_kind: str
    output_template: Any = None  # the output structure (fx nodes as leaves), to rebuild it
    output_aliases: dict = field(default_factory=dict)  # producing layer / node name -> output name

    @property
    def single(self) -> bool:
        """True when the model returns one bare tensor (targets are then a bare tensor too)."""
        return self.output_kind == "single"

    def output_key(self, key: Any, who: str) -> str:
        """The output name that ``key`` (an output name or a producing layer's name) stands for."""
        if key in self.output_names:
            return key
        if key in self.output_aliases:
            return self.output_aliases[key]
        aliases = f", or the layers producing them {sorted(self.output_aliases)}" if self.output_aliases else ""
        raise ValueError(f"{who} names {key!r}, which is not an output of this model. Expected output "
                         f"names {list(self.output_names)}{aliases}.")


def _aliases(names: list[str], template: Any) -> dict[str, str]:
    """Producing layer / node names of each output leaf, where each names exactly one output."""
    found: dict[str, set] = {}
    for name, (_, node) in zip(names, tree_leaves(template)):
        for alias in {getattr(node, "name", None), getattr(node, "target", None)
                      if getattr(node, "op", None) == "call_module" else None} - {None}:
            found.setdefault(str(alias), set()).add(name)
    return {a: next(iter(outs)) for a, outs in found.items() if len(outs) == 1 and a not in names}


def io_info(model: torch.nn.Module) -> IOInfo:
    """The structure of ``model`` (a tg.Model; a plain module counts as one input, one output)."""
    meta = getattr(model, "meta", {}).get("torchgraph") if hasattr(model, "meta") else None
    if meta is None:
        return IOInfo(("input",), "single", (None,), ("output",), "single")
    specs = {n.name: n.meta.get("tg_spec") for n in model.graph.nodes if n.op == "placeholder"}
    dtypes = tuple(getattr(specs.get(name), "dtype", None) for name in meta["input_names"])
    template = plain_containers(next(n for n in reversed(model.graph.nodes) if n.op == "output").args[0])
    names = list(model.output_names)
    return IOInfo(tuple(meta["input_names"]), meta["input_kind"], dtypes, tuple(names),
                  meta["output_kind"], template, _aliases(names, template))


def to_tensor(a: Any, what: str, want_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``a`` as a tensor; NumPy floats become ``want_dtype`` (or torch's default float dtype)."""
    if isinstance(a, torch.Tensor):
        return a
    if hasattr(a, "__array__"):
        t = torch.as_tensor(a)
        # NumPy's default float64 meets float32 models: cast floats to what the model expects.
        if t.is_floating_point():
            t = t.to(want_dtype if want_dtype is not None and want_dtype.is_floating_point
                     else torch.get_default_dtype())
        return t
    raise TypeError(f"{what} must be a tensor (or a NumPy array); received {type(a).__name__}.")


def flatten_inputs(info: IOInfo, x: Any, where: str) -> tuple:
    """``x`` as a tuple of tensors in ``info.input_names`` order."""
    names, k = info.input_names, len(info.input_names)
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        extra = [key for key in x if key not in names]
        if missing or extra:
            detail = "; ".join(part for part in (f"unexpected {extra}" if extra else "",
                                                 f"missing {missing}" if missing else "") if part)
            raise ValueError(f"{where}: the keys of x do not match the model's inputs ({detail}). Expected "
                             f"keys {list(names)}; received {list(x)}.")
        items = [x[n] for n in names]
    elif isinstance(x, (list, tuple)):
        if len(x) != k:
            raise ValueError(f"{where}: x does not match the model's inputs. Expected {k} array(s) for "
                             f"{list(names)}; received {len(x)} arrays. Pass one array per input (or a "
                             "dict keyed by input name).")
        items = list(x)
    else:
        if k != 1:
            raise ValueError(f"{where}: the model takes {k} inputs {list(names)}; received one "
                             f"{type(x).__name__}. Pass a list/tuple or a dict with one array per input.")
        items = [x]
    return tuple(to_tensor(a, f"{where}: input '{n}'", d)
                 for a, n, d in zip(items, names, info.input_dtypes))


def flatten_targets(info: IOInfo, y: Any, where: str, what: str = "y"):
    """``y`` in the model's output order: one tensor when ``info.single``, else a tuple.

    ``y`` is a dict by output name (or producing layer name; outputs left out get None), a
    structure with one tensor per output in order (a list, or the outputs' own nesting), or, for a
    model with one output, that tensor alone. None stays None. ``what`` names the argument in
    errors (``"y"``, ``"sample_weight"``).
    """
    if y is None:
        return None
    names = info.output_names
    if info.single:
        if isinstance(y, dict):
            if len(y) != 1:
                raise ValueError(f"{where}: the keys of {what} do not match the model's outputs. Expected "
                                 f"{list(names)}; received {list(y)}.")
            info.output_key(next(iter(y)), f"{where}: {what}")
            y = next(iter(y.values()))
        elif isinstance(y, (list, tuple)) and len(y) == 1:
            y = y[0]
        return to_tensor(y, f"{where}: {what}")
    if isinstance(y, dict) and all(k in names or k in info.output_aliases for k in y):
        by_name = {info.output_key(k, f"{where}: {what}"): v for k, v in y.items()}
        return tuple(None if by_name.get(n) is None else to_tensor(by_name[n], f"{where}: {what}['{n}']")
                     for n in names)
    if len(names) == 1 and not isinstance(y, (dict, list, tuple)):
        return (to_tensor(y, f"{where}: {what}"),)
    leaves = [leaf for _, leaf in tree_leaves(y)] if isinstance(y, (dict, list, tuple)) else [y]
    if len(leaves) != len(names):
        keys = f" with keys {list(y)}" if isinstance(y, dict) else ""
        raise ValueError(f"{where}: {what} does not match the model's {len(names)} outputs {list(names)}. "
                         f"Expected one entry per output; received {len(leaves)}{keys}. Pass a dict "
                         "keyed by output name, or a list in output order.")
    return tuple(None if a is None else to_tensor(a, f"{where}: {what}['{n}']") for a, n in zip(leaves, names))


def flatten_outputs(info: IOInfo, out: Any) -> tuple:
    """The model's output structure as a tuple in ``info.output_names`` order."""
    if info.single:
        return (out,)
    return tuple(leaf for _, leaf in tree_leaves(out))


def pack_outputs(info: IOInfo, flat: list) -> Any:
    """The inverse of ``flatten_outputs``."""
    if info.single:
        return flat[0]
    items = iter(flat)
    return tree_map(lambda _: next(items), info.output_template)
