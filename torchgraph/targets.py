"""How torch functions are named and classified when they are recorded.

``__torch_function__`` receives functions (``torch.cat``), tensor methods (``Tensor.view``), property
getters (``Tensor.shape.__get__``) and Python operators (``Tensor.__radd__``); these helpers name
them, tell which only read metadata, which need data, and how to emit them in readable code.
"""

from __future__ import annotations

import operator
import sys
from typing import Callable

import torch

__all__ = ["VIEW_OPS", "func_name", "is_inplace", "setitem"]



# Answered from the probes, never recorded.
_METADATA = frozenset({
    "dim", "ndimension", "ndim", "dtype", "device", "shape", "size", "is_floating_point",
    "is_complex", "is_signed", "layout", "requires_grad", "is_nested", "is_sparse", "is_quantized",
    "is_meta", "is_cuda", "is_cpu", "is_mps", "is_xpu", "element_size", "is_contiguous", "stride",
    "storage_offset", "is_leaf", "grad_fn", "grad", "names", "get_device", "itemsize", "nbytes",
    "numel", "nelement", "is_inference", "__len__", "__repr__", "__str__", "__format__", "__hash__",
    "has_names", "retains_grad", "is_sparse_csr", "is_mkldnn", "output_nr", "_version", "_base",
    "_is_view", "dim_order", "__dlpack_device__", "is_xla", "is_lazy",
})

# Reading data at build time: impossible at the top level (there is no data yet).
_NEEDS_DATA = frozenset({
    "__bool__", "item", "tolist", "numpy", "__int__", "__float__", "__index__", "__complex__",
    "data_ptr", "backward", "__array__", "untyped_storage",
})

_DUNDER_OPS: dict[str, tuple[Callable, bool]] = {
    "__add__": (operator.add, False), "__radd__": (operator.add, True),
    "__sub__": (operator.sub, False), "__rsub__": (operator.sub, True),
    "__mul__": (operator.mul, False), "__rmul__": (operator.mul, True),
    "__truediv__": (operator.truediv, False), "__rtruediv__": (operator.truediv, True),
    "__floordiv__": (operator.floordiv, False), "__rfloordiv__": (operator.floordiv, True),
    "__mod__": (operator.mod, False), "__rmod__": (operator.mod, True),
    "__pow__": (operator.pow, False), "__rpow__": (operator.pow, True),
    "__matmul__": (operator.matmul, False), "__rmatmul__": (operator.matmul, True),
    "__and__": (operator.and_, False), "__rand__": (operator.and_, True),
    "__or__": (operator.or_, False), "__ror__": (operator.or_, True),
    "__xor__": (operator.xor, False), "__rxor__": (operator.xor, True),
    "__lshift__": (operator.lshift, False), "__rshift__": (operator.rshift, False),
    "__eq__": (operator.eq, False), "__ne__": (operator.ne, False),
    "__lt__": (operator.lt, False), "__le__": (operator.le, False),
    "__gt__": (operator.gt, False), "__ge__": (operator.ge, False),
    "__neg__": (operator.neg, False), "__pos__": (operator.pos, False),
    "__abs__": (operator.abs, False), "__invert__": (operator.invert, False),
    "__getitem__": (operator.getitem, False),
    "__iadd__": (operator.iadd, False), "__isub__": (operator.isub, False),
    "__imul__": (operator.imul, False), "__itruediv__": (operator.itruediv, False),
}
_INPLACE_DUNDERS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__"})

# Operations whose result may share storage with their first argument: an in-place op on the result
# also changes the argument (see NOTE: [Effects] in collecting.py). Ops that only sometimes return a view
# (reshape, contiguous) are listed too: treating a copy as a view only keeps an extra op in a model.
VIEW_OPS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "ravel", "squeeze", "unsqueeze",
    "transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t", "T", "mT", "H", "mH",
    "adjoint", "expand", "expand_as", "narrow", "select", "__getitem__", "getitem", "chunk", "split",
    "split_with_sizes", "tensor_split", "hsplit", "vsplit", "dsplit", "unbind", "diagonal", "as_strided",
    "unfold", "detach", "alias", "real", "imag", "view_as_real", "view_as_complex", "contiguous",
    "__iter__", "indices", "values", "crow_indices", "col_indices",
})


def func_name(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # a property getter: Tensor.shape.__get__
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


def _is_property(func) -> bool:
    return getattr(func, "__name__", None) == "__get__"


def _is_tensor_method(func, name: str) -> bool:
    return getattr(torch.Tensor, name, None) is func


def _resolvable(func) -> bool:
    """Whether ``func`` can be named in generated code by its module and qualified name."""
    module = sys.modules.get(getattr(func, "__module__", None) or "")
    obj = module
    for part in (getattr(func, "__qualname__", None) or "").split("."):
        obj = getattr(obj, part, None)
    return obj is func


def is_inplace(name: str, kwargs: dict) -> bool:
    if name in _INPLACE_DUNDERS:
        return True
    if name.endswith("_") and not name.startswith("_"):
        return True
    return bool(kwargs.get("inplace")) or "out" in kwargs


def setitem(tensor: torch.Tensor, index, value) -> torch.Tensor:
    """``tensor[index] = value``, returning ``tensor`` (the recorded form of item assignment)."""
    tensor[index] = value
    return tensor
