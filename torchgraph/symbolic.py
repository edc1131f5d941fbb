"""Symbolic values: what a layer call on a placeholder returns.

A :class:`SymbolicTensor` stands for a tensor that will exist when the model runs. It knows its shape
(with dynamic dims), its dtype, and the recorded call that produces it. Calling a module or a torch
function on it records that call instead of computing anything.

Design constraints:

- Each value carries two *probes*: meta tensors (no storage) computed with two different sizes for
  every dynamic dim. A dim that is equal in both probes is static; one that differs is dynamic. This
  is how ``None`` dims survive arbitrary torch code without a symbolic shape engine.
- A :class:`SymbolicTensor` is a ``torch.Tensor`` wrapper subclass so that ``isinstance(x, Tensor)``
  checks in third-party modules pass, but every operation on it is intercepted by
  ``__torch_function__`` (see ``recording.py``); its own storage is never touched.
- Values are immutable and shared: the same value can feed several models (``model.get_output`` to
  build a feature extractor).
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch

from .builds import supersede_failed_build, track_record
from .dims import BATCH, Dim, DynamicDim, anonymous_dim, declared_dim, dim_for_probes, input_site
from .errors import GraphBuildError
from .scopes import current_scope

__all__ = ["Dim", "DynamicDim", "Input", "SymbolicDevice", "SymbolicDtype", "SymbolicInt", "SymbolicTensor"]

_SEQ = itertools.count()


def format_shape(dims) -> str:
    """``(None, 3, 32, 32)``: dynamic dims as None or their name, never as a probe size."""
    inner = ", ".join(repr(d) for d in dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


class Record:
    """One recorded call: a placeholder, a module call, a function call or a method call.

    ``effect`` marks a call that a model needs even when no output uses its result: ``"mutation"``
    (an in-place op, or a module call that mutates an input) and ``"guard"`` (a recorded check such
    as ``assert T <= block_size``). See NOTE: [Effects] in ``collecting.py``.
    """

    __slots__ = ("op", "target", "args", "kwargs", "seq", "location", "out", "effect", "scope",
                 "needs_real_data", "__weakref__")

    def __init__(self, op: str, target: Any, args: tuple = (), kwargs: dict | None = None,
                 location: str | None = None):
        self.op = op            # "placeholder" | "call_module" | "call_function" | "call_method"
        self.target = target    # Input name | nn.Module | callable | method name
        self.args = args        # leaves: Value (symbolic), real tensors (constants), plain Python
        self.kwargs = kwargs or {}
        self.seq = next(_SEQ)   # creation order: the emitted code follows the user's program order
        self.location = location
        self.out = None          # tree of Values (and plain outputs), set once probed
        self.effect = None
        self.scope = current_scope()  # "encoder.block1": tg.scope names / tg.from_module module path
        self.needs_real_data = False  # probed with real data (the meta device could not run it)
        track_record(self)  # a build lasts while its records do (NOTE: [End of a build] in builds.py)


class Value:
    """What a symbolic object points at: output ``path`` of ``record``, with its two probes.

    ``base`` is the value whose storage this one shares (itself unless it is a view of another
    value); ``effects`` are the effect records (mutations through any view of it, guards reading
    its sizes) that a model containing this value must also contain.
    """

    __slots__ = ("record", "path", "probes", "dims", "dtype", "base", "effects")

    def __init__(self, record: Record, path: tuple, probes: tuple, candidates=None):
        self.record = record
        self.path = path
        self.probes = probes
        self.base = self
        self.effects = None
        p0, p1 = probes
        if isinstance(p0, torch.Tensor):
            self.dims = tuple(dim_for_probes(a, b, candidates if candidates is not None else record)
                              for a, b in zip(p0.shape, p1.shape))
            self.dtype = p0.dtype
        else:  # a Python number (a dynamic size), or a device/dtype
            self.dims = None
            self.dtype = None

    @property
    def shape(self) -> tuple:
        """Shape with ``None`` (or a dim name) for dynamic dims."""
        return tuple(d if isinstance(d, int) else (d.name if d.name else None) for d in self.dims)

    def add_effect(self, record: Record) -> None:
        if self.effects is None:
            self.effects = []
        self.effects.append(record)


class SymbolicTensor(torch.Tensor):
    """Symbolic tensor: a shape and a dtype, standing for a tensor the model will compute.

    Returned by :func:`Input` and by every module or torch function called on symbolic tensors.
    ``shape`` shows dynamic dims as ``None`` (or their name); using them in shape arithmetic
    (``x.size(0)``, ``x.shape[0] * 2``) is recorded, never baked in.

    Example:
        >>> import torch, torchgraph as tg
        >>> x = tg.Input(shape=(3, 32, 32))
        >>> x.shape
        (None, 3, 32, 32)
        >>> y = torch.nn.Conv2d(3, 8, 3)(x).flatten(1)
        >>> y.shape, y.dtype
        ((None, 7200), torch.float32)
    """

    @staticmethod
    def __new__(cls, value: Value | None = None, shadow: torch.Tensor | None = None):
        probe = shadow if shadow is not None else value.probes[0]
        self = torch.Tensor._make_wrapper_subclass(
            cls, probe.shape, dtype=probe.dtype, device="meta", requires_grad=False
        )
        self._tg_value = value      # the current value (an in-place op moves it on); None for a shadow
        self._tg_origin = value     # the value this object was created as (what tg.Model(inputs=...) means)
        self._tg_shadow = shadow    # the probe a shadow (a value inside a module's forward) stands for
        return self

    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from .recording import dispatch

        return dispatch(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from .messages import below_torch_function

        raise below_torch_function(func, args)

    def __iter__(self):
        from .recording import dispatch

        return dispatch(torch.Tensor.__iter__, (self,), {})

    @property
    def static_shape(self) -> tuple:
        """The shape as plain data: ints for static dims, ``None`` (or the dim's name) for dynamic ones.

        Unlike ``x.shape``, whose dynamic entries are recorded when used in shape arithmetic, this
        is for inspection (tests, printing, deciding layer sizes).
        """
        if self._tg_value is None:
            return tuple(self._tg_shadow.shape)
        return self._tg_value.shape

    def __reduce_ex__(self, protocol):
        raise TypeError("a SymbolicTensor cannot be pickled: it only exists while building a model")

    def __deepcopy__(self, memo):
        return self


class SymbolicShape(tuple):
    """``x.shape`` of a symbolic tensor: ints for static dims, :class:`SymbolicInt` for dynamic ones."""

    def __repr__(self) -> str:
        return "(" + ", ".join("None" if isinstance(d, SymbolicInt) else repr(d) for d in self) + (
            ",)" if len(self) == 1 else ")")

    def numel(self):
        out = 1
        for d in self:
            out = out * d
        return out

    def __getitem__(self, item):
        out = super().__getitem__(item)
        return SymbolicShape(out) if isinstance(item, slice) else out


class SymbolicInt(torch.Tensor):
    """A dynamic size (``x.size(0)``) or arithmetic on one: recorded, never a fixed number.

    Passing it where torch takes a list of sizes (``x.view(x.size(0), -1)``, ``torch.zeros(n, 4)``) or
    to a method of a symbolic tensor (``x.narrow(1, 0, n)``, ``x[:, :n]``) is recorded. A comparison
    (``n <= 512``) is a symbolic condition: ``bool()`` of it (``assert``, ``if``) checks that it has
    the same answer for every probed size, records a runtime check, and returns that answer.
    ``int()`` raises: the value is only known when the model runs. (It is a 0-d tensor subclass so
    that torch's argument parser accepts it in size lists.)
    """

    @staticmethod
    def __new__(cls, value: Value):
        # A float (torch.finfo(x.dtype).min, see type_info.py) is a float64 0-d tensor to torch's parser.
        dtype = torch.float64 if isinstance(value.probes[0], float) else torch.int64
        self = torch.Tensor._make_wrapper_subclass(cls, (), dtype=dtype, device="meta")
        self._tg_value = value
        self._tg_origin = value
        self._tg_shadow = None
        return self

    # Same dispatch as SymbolicTensor's (recording.py tells the two apart).
    __init__ = SymbolicTensor.__init__
    __torch_function__ = SymbolicTensor.__dict__["__torch_function__"]
    __torch_dispatch__ = SymbolicTensor.__torch_dispatch__

    def __repr__(self) -> str:
        from .type_info import dtype_source

        p0 = self._tg_value.probes[0]
        dtype = dtype_source(self._tg_value)
        if dtype is not None:  # torch.finfo(x.dtype).min (type_info.py)
            kind = "SymbolicBool" if isinstance(p0, bool) else "SymbolicFloat" if isinstance(p0, float) else "SymbolicInt"
            return f"{kind}(follows the dtype; {p0!r} in {dtype})"
        return "SymbolicBool(dynamic)" if isinstance(p0, bool) else "SymbolicInt(dynamic)"

    __str__ = __repr__

    def __format__(self, spec) -> str:
        return format(repr(self), spec)

    def _binary(self, op, other, reverse=False):
        from .sizes import record_int_op

        args = (other, self) if reverse else (self, other)
        return record_int_op(op, args)

    def __add__(self, o): return self._binary(operator.add, o)
    def __radd__(self, o): return self._binary(operator.add, o, True)
    def __sub__(self, o): return self._binary(operator.sub, o)
    def __rsub__(self, o): return self._binary(operator.sub, o, True)
    def __mul__(self, o): return self._binary(operator.mul, o)
    def __rmul__(self, o): return self._binary(operator.mul, o, True)
    def __floordiv__(self, o): return self._binary(operator.floordiv, o)
    def __rfloordiv__(self, o): return self._binary(operator.floordiv, o, True)
    def __truediv__(self, o): return self._binary(operator.truediv, o)
    def __rtruediv__(self, o): return self._binary(operator.truediv, o, True)
    def __mod__(self, o): return self._binary(operator.mod, o)
    def __rmod__(self, o): return self._binary(operator.mod, o, True)
    def __pow__(self, o): return self._binary(operator.pow, o)
    def __neg__(self): return self._binary(operator.mul, -1)
    def __eq__(self, o): return self._binary(operator.eq, o)
    def __ne__(self, o): return self._binary(operator.ne, o)
    def __lt__(self, o): return self._binary(operator.lt, o)
    def __le__(self, o): return self._binary(operator.le, o)
    def __gt__(self, o): return self._binary(operator.gt, o)
    def __ge__(self, o): return self._binary(operator.ge, o)
    def __and__(self, o): return self._binary(operator.and_, o)
    def __rand__(self, o): return self._binary(operator.and_, o, True)
    def __or__(self, o): return self._binary(operator.or_, o)
    def __ror__(self, o): return self._binary(operator.or_, o, True)

    def __bool__(self):
        from .sizes import guard

        return guard(self)

    def _refuse(self, what: str):
        from .messages import dtype_number_as_number, dynamic_size_as_number
        from .type_info import dtype_source

        if dtype_source(self._tg_value) is not None:  # torch.finfo(x.dtype).min (type_info.py)
            raise dtype_number_as_number(what)
        raise dynamic_size_as_number(what)

    def __int__(self): self._refuse("in int()")
    def __index__(self): self._refuse("as a Python int (range(), slicing a real tensor, a list index)")
    def __float__(self): self._refuse("in float()")
    def __hash__(self): return id(self)
    def __reduce_ex__(self, protocol):
        raise TypeError("a SymbolicInt cannot be pickled: it only exists while building a model")
    def __deepcopy__(self, memo): return self


class _StandIn:
    """Base of :class:`SymbolicDevice` and :class:`SymbolicDtype`: ``x.device`` / ``x.dtype`` at the top level.

    NOTE: [Device and dtype stand-ins] torch's argument parser accepts only real ``torch.device`` /
    ``torch.dtype`` objects, and both types are final, so a real one cannot say which tensor it came
    from (dtypes are even singletons). At the top level of a build, ``x.device`` and ``x.dtype`` of a
    symbolic tensor therefore return a stand-in: it compares and hashes equal to the build-time value
    (``cpu``, ``torch.float32``) and forwards its attributes (``.type``, ``.is_floating_point``), and
    when it is passed to a torch function the parser hands the call to ``__torch_function__`` (it
    does so for any argument that is not of the expected type), which records ``x.device`` /
    ``x.dtype`` into the model instead of a constant. So ``torch.zeros(n, dtype=x.dtype,
    device=x.device)`` follows the model's inputs after ``model.to(...)``, exactly like the same code
    in an eager module. Calls made by torch's own code (``nn.Linear(..., device=x.device)`` creating
    its parameters) run for real with the build-time value. ``torch.finfo(x.dtype).min`` (and
    ``torch.iinfo``) is recorded too, so a mask built from it follows the model's dtype (NOTE: [finfo
    of a stand-in] in ``type_info.py``). A comparison that model code makes (``if x.dtype ==
    torch.float16:``, ``x.dtype in (...)``, ``x.device.type == "cpu"``, a dict lookup by dtype) answers
    for the build value, and records a check that the model runs with a dtype or device that gives the
    same answer, so after ``model.to(torch.float16)`` a model built in float32 raises rather than silently
    keep float32's branch (NOTE: [Dtype guards] in ``dtype_guards.py``). Known limits, as with torch.fx
    proxies: ``isinstance(x.dtype, torch.dtype)`` is False and ``x.dtype is torch.float16`` is always
    False (use ``x.dtype.value`` for the build-time dtype itself). Inside a module's forward,
    ``x.device``/``x.dtype`` are real.
    """

    __slots__ = ("_tg_tensor", "value", "_tg_value")
    _attr = ""

    def __init__(self, tensor_value: Value, value):
        self._tg_tensor = tensor_value   # the symbolic tensor this was read from
        self.value = value               # the real device/dtype at build time
        self._tg_value = None            # the recorded getattr, made when first passed to torch

    def __eq__(self, other):
        from .dtype_guards import guard_comparison

        return guard_comparison(self, other)  # NOTE: [Dtype guards] in dtype_guards.py

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        from .dtype_guards import guard_hash

        return guard_hash(self)

    def __repr__(self):
        return repr(self.value)

    def __str__(self):
        return str(self.value)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        from .dtype_guards import guard_attribute

        return guard_attribute(self, name)

    def __reduce_ex__(self, protocol):
        return (_real_value, (self.value,))

    def __deepcopy__(self, memo):
        return self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from .recording import dispatch

        return dispatch(func, args, kwargs or {})


def _real_value(value):
    return value


class SymbolicDevice(_StandIn):
    """``x.device`` of a symbolic tensor at the top level (see NOTE: [Device and dtype stand-ins])."""

    __slots__ = ()
    _attr = "device"


class SymbolicDtype(_StandIn):
    """``x.dtype`` of a symbolic tensor at the top level (see NOTE: [Device and dtype stand-ins])."""

    __slots__ = ()
    _attr = "dtype"


def Input(shape, dtype: torch.dtype = torch.float32, name: str | None = None) -> SymbolicTensor:
    """A placeholder for one model input.

    Args:
        shape (tuple): the shape of one sample, without the batch dim (which is always dynamic and
            shared by all inputs). ``None`` marks another dynamic dim (a sequence length, an image
            side); a string names a dynamic dim, and inputs that use the same name share it (the
            model checks that they agree when called); :class:`tg.Dim(name, min=, max=) <Dim>`
            is a named dim with bounds.
        dtype (torch.dtype): the input's dtype (``torch.long`` for token ids).
        name (str): the input's name: the argument name of the model's ``forward`` and the ONNX
            input name. Defaults to ``input_1``, ``input_2``, ... in the model.

    Returns:
        SymbolicTensor: with shape ``(None, *shape)``.

    Example:
        >>> import torch, torchgraph as tg
        >>> tokens = tg.Input(shape=(None,), dtype=torch.long, name="tokens")
        >>> tokens.shape, tokens.dtype
        ((None, None), torch.int64)
    """
    from .scope_replay import remove_idle_modes
    from .type_info import hold_during_build

    remove_idle_modes()  # a safe point (NOTE: [Module scopes])
    supersede_failed_build()  # an interactive session's failed build (NOTE: [End of a build] in builds.py)
    build = hold_during_build()  # torch.finfo(x.dtype) is recorded until the build ends (NOTE: [finfo of a stand-in])
    pin = build.pin()  # a failed first tg.Input leaves no build behind (NOTE: [End of a build] in builds.py)
    try:
        return _placeholder(shape, dtype, name)
    finally:
        build.unpin(pin)


def _placeholder(shape, dtype: torch.dtype, name: str | None) -> SymbolicTensor:
    """tg.Input's symbolic tensor (its arguments checked)."""
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)):
        raise GraphBuildError(
            f"tg.Input: shape must be a tuple of ints (None for dynamic dims), without the batch "
            f"dim. Received shape={shape!r} of type {type(shape).__name__}."
        )
    if isinstance(dtype, SymbolicDtype):
        dtype = dtype.value
    if not isinstance(dtype, torch.dtype):
        raise GraphBuildError(f"tg.Input: dtype must be a torch.dtype; received dtype={dtype!r}.")
    if name is not None:
        from .naming import check_identifier

        check_identifier(name, "tg.Input: name (a forward() argument)")
    site = None
    dims: list = [BATCH]
    for i, d in enumerate(shape):
        if isinstance(d, str) or (isinstance(d, Dim) and d.name is not None):
            dims.append(declared_dim(d))
        elif d is None or isinstance(d, Dim):
            site = site or input_site()
            dims.append(anonymous_dim(site, i, d))
        elif isinstance(d, int) and not isinstance(d, bool) and d >= 0:
            dims.append(d)
        else:
            raise GraphBuildError(
                f"tg.Input: every dim must be a non-negative int, None (dynamic), a name or a tg.Dim; "
                f"received shape={tuple(shape)!r}."
            )
    probes = tuple(
        torch.empty([d if isinstance(d, int) else d.probes[k] for d in dims], dtype=dtype, device="meta")
        for k in (0, 1)
    )
    record = Record("placeholder", name)
    value = Value(record, (), probes, [d for d in dims if isinstance(d, DynamicDim)])
    record.out = value
    return SymbolicTensor(value)
