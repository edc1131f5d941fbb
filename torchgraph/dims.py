"""Dynamic dims: the batch, ``None`` dims, named dims and bounded dims (:class:`Dim`), and their probes.

A dynamic dim is told apart from a static one by its two *probe sizes* (see ``symbolic.py``): every
value is computed twice, once with each probe size, and a dim that differs between the two is
dynamic. This module chooses those sizes.

Design constraints (see NOTE: [Probe sizes]):

- Deterministic: the same building code gets the same probe sizes in any process, in any thread,
  whatever was built (or rejected) before.
- Distinct: two dims of one build never share probe sizes, so mixing them up fails at build time.
- Small and inside the declared bounds: a learned table of 128 positions is not overrun.
- Far apart: a stride-32 network still sees two different sizes at its end.
"""

from __future__ import annotations

import functools
import os
import sys
import zlib

from .builds import current_build, end_build
from .errors import GraphBuildError

__all__ = ["BATCH", "Dim", "DynamicDim", "anonymous_dim", "declared_dim", "dim_for_probes", "new_build"]


class Dim:
    """A named dynamic dim with optional bounds, for ``tg.Input(shape=...)``.

    Like ``torch.export.Dim``: ``min`` and ``max`` bound the sizes the model accepts (checked when
    the model is called), and the sizes torchgraph probes the model with stay inside them. Inputs
    that use the same name share the dim; a plain string is the same as an unbounded ``Dim``.

    Args:
        name (str): the dim's name (shown in shapes, ONNX and error messages); ``None`` for an
            anonymous bounded dim.
        min (int): the smallest size accepted (default 0).
        max (int): the largest size accepted (default: unbounded).

    Example:
        >>> import torch, torchgraph as tg
        >>> ids = tg.Input(shape=(tg.Dim("T", max=512),), dtype=torch.long)
        >>> ids.static_shape
        (None, 'T')
        >>> model = tg.Model(ids, torch.nn.Embedding(100, 8)(ids))
        >>> model(torch.zeros(2, 7, dtype=torch.long)).shape
        torch.Size([2, 7, 8])
    """

    __slots__ = ("name", "min", "max")

    def __init__(self, name: str | None, min: int | None = None, max: int | None = None):  # noqa: A002
        if name is not None and (not isinstance(name, str) or not name):
            raise GraphBuildError(f"tg.Dim: name must be a non-empty string (or None); received {name!r}.")
        for what, bound in (("min", min), ("max", max)):
            if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool) or bound < 0):
                raise GraphBuildError(f"tg.Dim({name!r}): {what} must be a non-negative int or None; "
                                      f"received {what}={bound!r}.")
        if min is not None and max is not None and min > max:
            raise GraphBuildError(f"tg.Dim({name!r}): min={min} is larger than max={max}. Expected min <= max.")
        self.name = name
        self.min = 0 if min is None else min
        self.max = max

    def __repr__(self) -> str:
        bounds = "".join(f", {k}={v}" for k, v in (("min", self.min or None), ("max", self.max)) if v)
        return f"Dim({self.name!r}{bounds})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Dim) and (self.name, self.min, self.max) == (other.name, other.min, other.max)

    def __hash__(self) -> int:
        return hash((Dim, self.name, self.min, self.max))


class DynamicDim:
    """A dynamic dim of the values of one build: its name, bounds, and the two probe sizes.

    ``name`` is ``None`` for the batch and for anonymous dims; ``min``/``max`` are the accepted
    sizes (``max`` ``None``: unbounded); ``probes`` the two sizes used to propagate shapes.
    """

    __slots__ = ("name", "min", "max", "probes")

    def __init__(self, name: str | None, probes: tuple[int, int], min: int = 0, max: int | None = None):  # noqa: A002
        self.name = name
        self.probes = probes
        self.min = min
        self.max = max

    def __repr__(self) -> str:
        return "None" if self.name is None else self.name

    def __getstate__(self):
        return (self.name, self.probes, self.min, self.max)

    def __setstate__(self, state):
        self.name, self.probes, self.min, self.max = state


BATCH = DynamicDim(None, (2, 3))


# NOTE: [Probe sizes]
# Probe sizes used to come from a process-wide counter, so the same code built differently the
# second time (a table of 128 positions overrun), a rejected config shifted every later model, and
# two threads could hand out the same pair. Now:
#   * A *build* is per thread: it starts fresh after each tg.Model() call (and at new_build(), and
#     once no value of it is left: NOTE: [End of a build] in builds.py), so nothing earlier in the
#     process or in another thread can change a build's probe sizes.
#   * A dim's pair is a deterministic function of what declares it: its name and bounds for a named
#     dim; for an anonymous one (a None), the source line of the tg.Input call, how many Inputs that
#     line made in this build, and the dim's position. Inside one build a pair already taken is
#     skipped (so dims of one build are always distinct); across builds (a value of an earlier model
#     combined with new Inputs) a different source line almost always gives a different pair.
#   * Unbounded dims use p0 in [34, 62] and p1 in [p0 + 33, 127]: p1 <= 127 does not overrun tables of
#     128 entries, p0 >= 34 keeps stride-32 outputs >= 2, and p1 - p0 >= 33 keeps them apart. Named
#     dims take odd p0 and anonymous ones even p0, so the two kinds never collide. Bounded dims
#     choose inside [max(min, 2), max]; (2, 3) is the batch's.
#   * Sizes derived from dims (2 * T, T - 1) get no pair of their own: they are found again by
#     their probes (see dim_for_probes), or shown as an anonymous None.

_DEFAULT_LOW, _DEFAULT_HIGH, _MIN_GAP = 34, 127, 33


class _BuildDims:
    """The dims of one build (kept on its :class:`~torchgraph.builds.Build`, one per thread at a time)."""

    __slots__ = ("named", "by_probes", "site_counts")

    def __init__(self):
        self.named: dict[str, DynamicDim] = {}
        self.by_probes: dict[tuple[int, int], DynamicDim] = {BATCH.probes: BATCH}
        self.site_counts: dict[str, int] = {}


def _build_dims() -> _BuildDims:
    """The dims of this thread's build in progress (fresh after a build ended: NOTE: [End of a build])."""
    build = current_build()
    if build.dims is None:
        build.dims = _BuildDims()
    return build.dims


def new_build() -> None:
    """Start a new build in this thread: later dims get probe sizes as if nothing was built before."""
    end_build()  # and the build hold: NOTE: [finfo of a stand-in] in type_info.py


@functools.lru_cache(maxsize=256)
def _candidate_pairs(low: int, high: int | None, parity: int | None) -> tuple[tuple[int, int], ...]:
    """Probe pairs for a dim accepting sizes in [low, high] (high None: unbounded)."""
    lo = max(low, 2)
    top = max(_DEFAULT_HIGH, lo + 93)  # never probe larger than needed
    if high is not None:
        top = min(high, top)
    base = max(lo, _DEFAULT_LOW)
    if top - base < 2 * _MIN_GAP:
        base = lo
    pairs = []
    if top - base >= 2 * _MIN_GAP:  # room for far-apart pairs
        for p0 in range(base, min(base + 28, top - _MIN_GAP) + 1):
            if parity is not None and p0 % 2 != parity:
                continue
            pairs.extend((p0, p1) for p1 in range(p0 + _MIN_GAP, top + 1))
    else:
        gap = max(1, (top - base) // 3)
        for p0 in range(base, top - gap + 1):
            pairs.extend((p0, p1) for p1 in range(p0 + gap, top + 1))
    return tuple(p for p in pairs if p != BATCH.probes)


def _choose_probes(key: str, low: int, high: int | None, parity: int | None, what: str) -> tuple[int, int]:
    pairs = _candidate_pairs(low, high, parity)
    if pairs:
        start = zlib.crc32(key.encode()) % len(pairs)
        taken = _build_dims().by_probes
        for i in range(len(pairs)):
            pair = pairs[(start + i) % len(pairs)]
            if pair not in taken:
                return pair
    raise GraphBuildError(
        f"tg.Input: cannot choose two distinct probe sizes for {what} within min={low}, max={high} "
        "that no other dim of this model uses. Expected a wider range; received too narrow bounds. "
        "Widen the bounds (tg.Dim(name, min=..., max=...)), or use a static size."
    )


def _register(dim: DynamicDim) -> DynamicDim:
    _build_dims().by_probes.setdefault(dim.probes, dim)
    return dim


def declared_dim(spec) -> DynamicDim | int:
    """The dim for a string or a :class:`Dim` in ``tg.Input(shape=...)`` (shared by name in a build)."""
    if isinstance(spec, str):
        spec = Dim(spec)
    if spec.max is not None and spec.min == spec.max:
        return spec.min  # a dim with one possible size is static
    existing = _build_dims().named.get(spec.name) if spec.name is not None else None
    if existing is not None:
        return _with_bounds(existing, spec)
    what = f"dim {spec.name!r}"
    key = f"name={spec.name}:{spec.min}:{spec.max}"
    probes = _choose_probes(key, spec.min, spec.max, 1, what)
    dim = _register(DynamicDim(spec.name, probes, spec.min, spec.max))
    if spec.name is not None:
        _build_dims().named[spec.name] = dim
    return dim


def _with_bounds(dim: DynamicDim, spec: Dim) -> DynamicDim:
    """``dim`` (declared before in this build), with the bounds of a later declaration added."""
    if (spec.min, spec.max) == (0, None) or (spec.min, spec.max) == (dim.min, dim.max):
        return dim
    if (dim.min, dim.max) != (0, None):
        raise GraphBuildError(
            f"tg.Input: dim {dim.name!r} is declared twice with different bounds. Expected the same "
            f"bounds everywhere; received {Dim(dim.name, dim.min, dim.max)!r} and {spec!r}. Declare it "
            "once (T = tg.Dim(...)) and reuse it, or use the plain name after the first declaration."
        )
    if not all(spec.min <= p and (spec.max is None or p <= spec.max) for p in dim.probes):
        raise GraphBuildError(
            f"tg.Input: dim {dim.name!r} was first used without bounds and is now declared as {spec!r}. "
            "Declare the bounds at its first use."
        )
    dim.min, dim.max = spec.min, spec.max
    return dim


def anonymous_dim(site: str, position: int, spec: Dim | None = None) -> DynamicDim:
    """A new anonymous dynamic dim (a ``None``), keyed by where its ``tg.Input`` was made."""
    low, high = (spec.min, spec.max) if spec is not None else (0, None)
    if high is not None and low == high:
        return low  # type: ignore[return-value]
    key = f"{site}:{position}:{low}:{high}"
    probes = _choose_probes(key, low, high, 0, "a dynamic dim (None)")
    return _register(DynamicDim(None, probes, low, high))


def input_site() -> str:
    """``file:function:line#n``: the user's line making a ``tg.Input``, and how many it made this build."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    f = sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg):
        f = f.f_back
    where = "?" if f is None else (
        f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}:{f.f_lineno}")
    counts = _build_dims().site_counts
    n = counts.get(where, 0)
    counts[where] = n + 1
    return f"{where}#{n}"


def dim_for_probes(p0: int, p1: int, candidates=()) -> int | DynamicDim:
    """The static size, or the dynamic dim whose probes these are (an anonymous one if unknown).

    Dims of this build are found by their probes. Otherwise ``candidates`` -- dims, or the record
    whose arguments' dims to search -- are tried, so that values from an earlier build keep their
    dims (and names) when new operations use them.
    """
    if p0 == p1:
        return p0
    dim = _build_dims().by_probes.get((p0, p1))
    if dim is not None:
        return dim
    if not isinstance(candidates, (list, tuple)):
        candidates = _record_dims(candidates)
    for d in candidates:
        if d.probes[0] == p0 and d.probes[1] == p1:
            return d
    return DynamicDim(None, (p0, p1))


def _record_dims(record) -> list:
    """The dynamic dims of the tensor values a record takes."""
    from .symbolic import Value
    from .trees import tree_leaves

    out = []
    for _, leaf in tree_leaves((record.args, record.kwargs)):
        if isinstance(leaf, Value) and leaf.dims:
            out.extend(d for d in leaf.dims if isinstance(d, DynamicDim))
    return out
