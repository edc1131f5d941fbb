"""Which functions and tensor methods a config may name, and what they may cost when untrusted.

A config names the function of each ``call_function`` node by a string such as
``"torch.nn.functional.gelu"``. Names are resolved only inside a fixed set of namespaces, never
imported, and only for functions that torchgraph records: those torch lets ``__torch_function__``
override (torch's own list, plus the few that record but that list omits, see
NOTE: [Recorded functions]), a few factories, Python operators, and torchgraph's custom ops.
``torch.load``, ``torch.from_file`` and friends are unreachable.

For untrusted configs (``from_config``, ``tg.load``) two more rules apply:

- Functions that return uninitialised memory are replaced by their zero-filling twins
  (``torch.empty`` -> ``torch.zeros``, ``x.new_empty`` -> ``x.new_zeros``) or refused when they have
  none (``torch.empty_strided``, ``x.resize_``): a loaded model must not hand out what freed memory
  held.
- Functions whose cost grows faster than their argument list (``torch.linalg.multi_dot`` orders the
  product in cubic time) take at most :data:`MAX_OPERANDS` operands.

Example:
    >>> import torch.nn.functional as F
    >>> from torchgraph.config_functions import function_name, resolve_function
    >>> function_name(F.hardswish, "example")
    'torch.nn.functional.hardswish'
    >>> resolve_function("torch.empty_like", "example", untrusted=True).__name__
    'zeros_like'
"""

from __future__ import annotations

import builtins
import inspect
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["function_name", "resolve_function", "check_method_name", "check_attribute_name",
           "untrusted_method", "check_operands", "check_repeats", "MAX_OPERANDS", "MAX_REPEATS",
           "METHOD_DENYLIST"]

MAX_OPERANDS = 64
# Count and iteration arguments (num_layers of an LSTM, niter of torch.svd_lowrank) in a config.
MAX_REPEATS = 1_000
# Python-level loops over these arguments run before any shape is checked (nn.LSTM's constructor
# is even quadratic in num_layers): they are bounded up front. (argument name, positional index)
_REPEAT_ARGUMENTS: dict[str, tuple[tuple[str, int | None], ...]] = {
    "torch.svd_lowrank": (("niter", 2),), "torch.pca_lowrank": (("niter", 3),),
    "torch.lobpcg": (("niter", 6),),
}

_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_",
              "xor", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge", "neg", "pos", "abs",
              "invert", "not_", "getitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod",
              "ipow", "imatmul", "iand", "ior", "ixor", "ilshift", "irshift", "truth", "contains")

# Factories torch does not route through __torch_function__ unless a SymbolicInt is an argument.
_FACTORIES = ("arange", "zeros", "ones", "empty", "full", "eye", "linspace", "logspace", "rand",
              "randn", "randint", "randperm", "tensor", "scalar_tensor", "as_tensor", "zeros_like",
              "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
              "tril_indices", "triu_indices", "empty_strided", "empty_permuted")

# NOTE: [Recorded functions] torch.overrides.get_overridable_functions() misses functions that do
# dispatch to __torch_function__ (torch lists F.hardswish among its "ignored" functions, yet it
# calls handle_torch_function; in-place variants such as torch.relu_ are missing altogether). So
# the table adds every in-place variant `f_` of an allowed `f`, and these, found by
# tests/test_config_functions.py, which calls every public function of these namespaces on a probe
# tensor and checks that what records is storable.
_RECORDED_BUT_UNLISTED = {
    "torch.nn.functional": ("hardswish", "hardsigmoid"),
    "torch": ("fill", "fill_", "zero_", "detach_", "normal", "vander", "result_type", "cudnn_is_acceptable",
              "cudnn_grid_sampler", "mkldnn_adaptive_avg_pool2d", "mkldnn_max_pool2d", "mkldnn_max_pool3d",
              "quantized_gru", "quantized_lstm", "sparse_coo_tensor", "empty_quantized", "resize_as_",
              "resize_as_sparse_"),
}

# (namespace name in a config, the namespace object) -- searched in this order when encoding.
_NAMESPACES: tuple[tuple[str, Any], ...] = (
    ("torch.nn.functional", F),
    ("torch.special", torch.special),
    ("torch.linalg", torch.linalg),
    ("torch.fft", torch.fft),
    ("torch", torch),
)

# Untrusted configs: functions that return uninitialised memory -> a zero-filling equivalent, or
# None (refused: no equivalent with the same arguments).
_UNINITIALISED_FUNCTIONS: dict[str, str | None] = {
    "torch.empty": "torch.zeros", "torch.empty_like": "torch.zeros_like", "torch.empty_strided": None,
    "torch.empty_permuted": None, "torch.empty_quantized": None, "torch.resize_as_": None,
    "torch.resize_as_sparse_": None,
}
_UNINITIALISED_METHODS: dict[str, str | None] = {
    "new_empty": "new_zeros", "new_empty_strided": None, "new": None, "resize_": None, "resize_as_": None,
    "resize_as_sparse_": None, "sparse_resize_": None, "sparse_resize_and_clear_": None,
}
# Functions whose cost grows faster than their number of tensor operands.
_OPERAND_BOUNDED = frozenset({"torch.linalg.multi_dot", "torch.chain_matmul", "torch.einsum",
                              "torch.cartesian_prod", "torch.block_diag"})

_TABLE: dict[str, Callable] | None = None      # config name -> function
_NAMES: dict[int, str] | None = None           # id(function) -> config name


def _build_table() -> None:
    global _TABLE, _NAMES
    allowed: set[int] = set()
    for fns in torch.overrides.get_overridable_functions().values():
        allowed.update(id(f) for f in fns)
    allowed.update(id(getattr(torch, n)) for n in _FACTORIES if hasattr(torch, n))
    for ns_name, names in _RECORDED_BUT_UNLISTED.items():
        ns = dict(_NAMESPACES)[ns_name]
        allowed.update(id(getattr(ns, n)) for n in names if callable(getattr(ns, n, None)))
    table: dict[str, Callable] = {f"operator.{n}": getattr(operator, n) for n in _OPERATORS}
    table["builtins.getattr"] = builtins.getattr
    table["torch._assert"] = torch._assert  # guards recorded by `assert n <= 512` (sizes.py)
    from .targets import setitem
    table["torchgraph.setitem"] = setitem
    from .type_info import finfo_value, iinfo_value
    table["torchgraph.finfo_value"] = finfo_value  # torch.finfo(x.dtype).min (type_info.py): checks its arguments
    table["torchgraph.iinfo_value"] = iinfo_value
    from .dtype_guards import check_branch
    table["torchgraph.check_branch"] = check_branch  # `if x.dtype == torch.float16:` (dtype_guards.py): checks its arguments
    for ns_name, ns in _NAMESPACES:
        public = {a: getattr(ns, a, None) for a in dir(ns) if not a.startswith("_")}
        for attr, obj in public.items():
            if obj is None or not callable(obj) or inspect.isclass(obj):
                continue
            inplace_of_allowed = attr.endswith("_") and id(public.get(attr[:-1])) in allowed
            if id(obj) in allowed or inplace_of_allowed:
                table[f"{ns_name}.{attr}"] = obj
    names: dict[int, str] = {}
    for name, fn in table.items():
        names.setdefault(id(fn), name)
    _TABLE, _NAMES = table, names


# Namespaces of torch.ops whose operators may appear in a config (custom ops of this library).
_OP_NAMESPACES = frozenset({"torchgraph"})


def function_name(fn: Callable, where: str) -> str:
    """The config name of an allowed function, e.g. ``"torch.nn.functional.relu"``."""
    if _NAMES is None:
        _build_table()
    name = _NAMES.get(id(fn))
    if name is not None:
        return name
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        ns, _, op = fn._qualified_op_name.partition("::") if hasattr(fn, "_qualified_op_name") else (
            "", "", "")
        if ns in _OP_NAMESPACES:
            overload = getattr(fn, "_overloadname", None) if isinstance(fn, torch._ops.OpOverload) else None
            return f"torch.ops.{ns}.{op}" + (f".{overload}" if overload else "")
    label = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    module = getattr(fn, "__module__", None)
    if module in ("torchgraph.fused", "torchgraph.ops") or str(module).startswith(("torchgraph.ops.",
                                                                                     "torchgraph.fused.")):
        raise ValueError(
            f"{where}: {module}.{label} comes from tg.optimize, whose graphs cannot be stored in a config "
            "(they read layer weights directly). Save the original model and call tg.optimize after "
            "tg.load (it takes ~0.1 s for ResNet-50); torch.save/pickle of the optimized model works too."
        )
    raise ValueError(
        f"{where}: the function {module + '.' if module else ''}{label} is not a torch function that "
        "torchgraph can store. Expected a function of torch, torch.nn.functional, torch.linalg, "
        "torch.fft or torch.special that dispatches on tensors, a Python operator, a tensor method, or "
        "a torchgraph custom op. Call custom Python code inside an nn.Module registered with "
        "@tg.register_layer instead."
    )


def resolve_function(name: Any, where: str, untrusted: bool = False) -> Callable:
    """The function a config names; only allowlisted names resolve (nothing is imported)."""
    if _TABLE is None:
        _build_table()
    if not isinstance(name, str):
        raise ValueError(f"{where}: a function must be named by a string; received {name!r:.80}.")
    if untrusted and name in _UNINITIALISED_FUNCTIONS:
        replacement = _UNINITIALISED_FUNCTIONS[name]
        if replacement is None:
            raise ValueError(f"{where}: {name} returns uninitialised memory, which a model built from a "
                             "config or file must not. Use a zero-filled tensor (torch.zeros...) instead.")
        name = replacement
    fn = _TABLE.get(name)
    if fn is not None:
        return fn
    parts = name.split(".")
    if len(parts) in (4, 5) and parts[:2] == ["torch", "ops"] and parts[2] in _OP_NAMESPACES and all(
            p.isidentifier() and not p.startswith("_") for p in parts[2:]):
        try:
            obj = getattr(getattr(torch.ops, parts[2]), parts[3])
            if len(parts) == 5:
                obj = getattr(obj, parts[4])
            return obj
        except (AttributeError, RuntimeError):
            pass
    raise ValueError(
        f"{where}: unknown or disallowed function {name!r:.80}. Only torch functions that torchgraph can "
        "record (for example 'torch.nn.functional.relu', 'torch.cat', 'operator.add') can appear in a "
        "config; functions are never imported by path."
    )


def check_operands(name: str, args: tuple, kwargs: dict, where: str) -> None:
    """Refuse more than MAX_OPERANDS operands for functions that are superlinear in their number, and
    iteration arguments above MAX_REPEATS."""
    check_function_repeats(name, args, kwargs, where)
    if name not in _OPERAND_BOUNDED:
        return
    count = len(args) + len(kwargs)
    for a in args:
        if isinstance(a, (list, tuple)):
            count += len(a)
    if count > MAX_OPERANDS:
        raise ValueError(f"{where}: {name} is called with {count} operands; a config may give it at most "
                         f"{MAX_OPERANDS} (its cost grows faster than the number of operands).")


def check_repeats(values: dict[str, Any], where: str) -> None:
    """Refuse count/iteration arguments (by name -> value) above MAX_REPEATS."""
    for name, value in values.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_REPEATS:
            raise ValueError(f"{where}: {name}={value} is more than a config may ask for ({MAX_REPEATS}); "
                             "it would make loading loop that many times.")


def check_function_repeats(name: str, args: tuple, kwargs: dict, where: str) -> None:
    """check_repeats for the iteration arguments of a function node (by keyword or position)."""
    for arg, index in _REPEAT_ARGUMENTS.get(name, ()):
        value = kwargs.get(arg, args[index] if index is not None and index < len(args) else None)
        check_repeats({arg: value}, where)


# Tensor methods a config may not name: they need data, hand out memory, or register Python code.
METHOD_DENYLIST = frozenset({
    "backward", "register_hook", "register_post_accumulate_grad_hook", "numpy", "tolist", "item",
    "storage", "untyped_storage", "data_ptr", "share_memory_", "pin_memory", "apply_", "map_", "map2_",
    "set_", "cuda",
})


def check_method_name(name: Any, where: str) -> str:
    """A tensor method name for a ``call_method`` node: public, callable, on ``torch.Tensor``."""
    if (not isinstance(name, str) or not name.isidentifier() or name.startswith("_")
            or name in METHOD_DENYLIST or not callable(getattr(torch.Tensor, name, None))):
        raise ValueError(f"{where}: {name!r:.80} is not an allowed tensor method. Expected the public name "
                         "of a torch.Tensor method (for example 'view', 'transpose', 'size').")
    return name


def untrusted_method(name: str, where: str) -> str:
    """The method an untrusted config may call instead of ``name`` (uninitialised memory: see above)."""
    if name in _UNINITIALISED_METHODS:
        replacement = _UNINITIALISED_METHODS[name]
        if replacement is None:
            raise ValueError(f"{where}: the tensor method '{name}' returns uninitialised memory, which a "
                             "model built from a config or file must not. Use a zero-filled tensor "
                             "(new_zeros, torch.zeros...) instead.")
        return replacement
    return name


def check_attribute_name(name: Any, where: str) -> str:
    """A tensor attribute for ``getattr`` nodes (``x.T``, ``x.mT``, ``x.real``): a public property."""
    ok = isinstance(name, str) and name.isidentifier() and not name.startswith("_")
    if ok:
        try:
            attr = inspect.getattr_static(torch.Tensor, name)
        except AttributeError:
            ok = False
        else:
            ok = not callable(attr) or isinstance(attr, property) or type(attr).__name__ in (
                "getset_descriptor", "member_descriptor")
    if not ok:
        raise ValueError(f"{where}: {name!r:.80} is not an allowed tensor attribute. Expected a public "
                         "torch.Tensor property such as 'T' or 'mT'.")
    return name
