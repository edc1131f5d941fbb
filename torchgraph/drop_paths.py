"""Drop path modules of other libraries recognised by what they compute, so that models using them save.

NOTE: [Drop path at save time] timm's ``DropPath``, torchvision's ``StochasticDepth``, HuggingFace's
``SwinDropPath``, ``SegformerDropPath``... (44 classes in transformers alone), and the copies of timm's
``drop_path`` in research repos, stay opaque layers of a graph (NOTE: [Returned inputs] in
returned_inputs.py), and their classes are not registered: their constructor arguments are unknown.
When ``layer_to_config`` meets such a module, :func:`as_drop_path` checks whether it computes exactly
what ``tg.layers.DropPath`` computes with some arguments, and if so the config says
``torchgraph.layers.DropPath(...)``: ``tg.load`` gives that layer. Trusting the class name alone
would be a guess, so the module is *run*:

- it is a module with no parameters, buffers or submodules, of a class neither registered nor of
  torch.nn's table, with a drop probability attribute (``drop_prob``, ``p``, ``drop_rate``) in [0, 1];
- in eval mode it returns its input object itself, on tensors of two ranks;
- in train mode, under fixed seeds (``torch.random.fork_rng``: the caller's random state is left as
  it was), it leaves its input unchanged (no ``x.mul_(mask)``: the caller would see it) and gives
  exactly the candidate layer's output (same values, shape and dtype) on those
  tensors, at its own probability and, on a shallow copy with the attribute set to 0.5, at 0.5 (at a
  small probability few samples are dropped, which would let a different mask shape or an extra scale
  pass unseen). The candidates are the spellings of ``tg.layers.DropPath`` (``noise``, ``mode``,
  ``scale_by_keep``), narrowed by the module's own ``mode``/``scale_by_keep`` attributes.

Anything else (a forward that raises, reads something the copy does not change, differs in one
value) is not recognised, and saving fails with the old clear error. The module is never changed:
the checks run a shallow copy, whose ``training`` flag and probability are its own.

Why at save time and not when ``tg.from_module`` records: the live model keeps running the user's
module object (what eager runs, hooks and all; tests and docs check ``model.x.drop_path is
net.x.drop_path``), so nothing the check could miss changes the model in hand; it covers every path
to a config (hand-written ``tg.Input`` code, ``tg.Sequential``, ``get_config``, ``tg.clone_model``),
not only ``tg.from_module``; and its cost (at most ~80 calls on tensors of a few hundred elements,
about 1-2 ms per module) is paid by saving, not by every build. The loaded model has
``tg.layers.DropPath`` where the original had the library's class, which computes the same outputs
in both modes under the same seed.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn as nn

__all__ = ["as_drop_path", "drop_probability_attribute", "is_drop_path"]

# Attribute names under which drop path modules keep their probability (timm and HF, torchvision, others).
PROBABILITY_NAMES = ("drop_prob", "p", "drop_rate")
_CHECK_SHAPES = ((64, 3), (16, 2, 3, 3))  # two ranks, enough samples that a probability of 0.5 drops some
_CHECK_PROBABILITY = 0.5
_SEEDS = (0, 1)


def drop_probability_attribute(module: nn.Module) -> str | None:
    """The name of the module's drop probability attribute (a number in [0, 1]), or None."""
    for name in PROBABILITY_NAMES:
        value = module.__dict__.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
            return name
    return None


def is_drop_path(module: nn.Module) -> bool:
    """A ``tg.layers.DropPath``, or a module :func:`as_drop_path` recognises: the identity in eval mode,
    a random mask in train mode, so passes must neither trace it (that would freeze its mode) nor
    keep it in inference."""
    from .layers import DropPath

    return isinstance(module, DropPath) or as_drop_path(module) is not None


def as_drop_path(module: nn.Module):
    """The ``tg.layers.DropPath`` that computes exactly what ``module`` computes, or None.

    Example:
        >>> import torch, torch.nn as nn
        >>> class StochasticDepth(nn.Module):               # a copy of timm's, under another name
        ...     def __init__(self, drop_prob):
        ...         super().__init__()
        ...         self.drop_prob = drop_prob
        ...     def forward(self, x):
        ...         if self.drop_prob == 0.0 or not self.training:
        ...             return x
        ...         keep = 1 - self.drop_prob
        ...         mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        ...         return x * mask.div_(keep)
        >>> as_drop_path(StochasticDepth(0.1))
        DropPath(drop_prob=0.1, scale_by_keep=True, mode='row', noise='bernoulli')
        >>> as_drop_path(nn.Linear(2, 2)) is None
        True
    """
    name = drop_probability_attribute(module)
    if name is None or module._modules or any(True for _ in itertools.chain(module.parameters(), module.buffers())):
        return None
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's random state is left as it was
            return _recognise(module, name)
    except Exception:  # noqa: BLE001 - a forward that fails on the check's tensors is not a drop path we know
        return None


def _recognise(module: nn.Module, name: str):
    from .layers import DropPath

    probability = getattr(module, name)
    modes = [module.mode] if isinstance(getattr(module, "mode", None), str) else ["row", "batch"]
    scales = [module.scale_by_keep] if isinstance(getattr(module, "scale_by_keep", None), bool) else [True, False]
    if not set(modes) <= {"row", "batch"}:
        return None
    candidates = [{"scale_by_keep": s, "mode": m, "noise": n} for n in ("bernoulli", "uniform_floor")
                  for m in modes for s in scales]
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator) for shape in _CHECK_SHAPES]
    probe = copy.copy(module)  # its own `training` flag and probability; the user's module is left alone
    probe.training = False
    if any(probe.forward(x) is not x for x in inputs):
        return None
    probe.training = True
    for p in (probability, _CHECK_PROBABILITY):
        setattr(probe, name, p)
        expected = [_seeded_copy(probe, x, seed, p) for x in inputs for seed in _SEEDS]
        if any(e is None for e in expected):
            return None
        candidates = [c for c in candidates
                      if all(_identical(_seeded(DropPath(p, **c), x, seed), e)
                             for (x, seed), e in zip(itertools.product(inputs, _SEEDS), expected))]
        if not candidates:
            return None
    return DropPath(probability, **candidates[0])


def _seeded_copy(probe: nn.Module, x: torch.Tensor, seed: int, p: float):
    """The probe's output on a copy of ``x``; None if it changed its input in place (``x.mul_(mask)``: the
    caller's tensor would change too, which the layer never does)."""
    given = x.clone()
    out = _seeded(probe, given, seed)
    if not torch.equal(given, x) or (p > 0 and out is given):
        return None
    return out


def _seeded(layer: nn.Module, x: torch.Tensor, seed: int):
    torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed costs ~1 ms)
    return layer.forward(x)


def _identical(a, b) -> bool:
    """Same shape, dtype and values (NaN where the other has NaN: HuggingFace's spelling at probability 1)."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all()))
