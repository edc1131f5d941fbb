"""Building a model from untrusted data (a config, a file): what it may cost, enforced.

``from_config`` and ``tg.load`` accept data from anyone. Checking each argument of each layer class
and torch function would never be complete (a ``device=`` argument, an iteration count, a loop in
a constructor), so the cost is bounded where every tensor operation passes: the dispatcher.

Design constraints:

- While an untrusted config is built, a ``TorchDispatchMode`` sees every aten operation: layer
  constructors, weight initialisation and the probes that check shapes. It counts them (a bound on
  time: a crafted ``num_layers=2**48`` or ``niter=2**48`` runs out of operations, not forever), and
  before an operation creates a tensor outside the meta device it works out the tensor's size on
  the meta device and refuses it if the build's memory budget would be exceeded (a bound on memory:
  ``device="cpu"`` on a layer or on ``torch.full`` cannot escape a meta build).
- Probes never fall back to real data (see ``probing.py``): a real probe would compute on tensors of
  whatever size the config says.
- Exceeding a bound raises :class:`BuildLimitError`, a ``ValueError``, like every other problem with
  an untrusted config.

Example:
    >>> import torch, torchgraph as tg
    >>> from torchgraph.untrusted import BuildLimitError, build_guard
    >>> try:
    ...     with build_guard(max_bytes=2**20, max_ops=1000):
    ...         torch.zeros(2**30, device="cpu")
    ... except BuildLimitError as err:
    ...     print("refused")
    refused
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import GraphBuildError
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["BuildLimitError", "build_guard", "guarded", "real_probes_allowed", "OPS_PER_ITEM", "BASE_OPS",
           "SMALL_BYTES", "DEFAULT_MAX_BYTES"]

# The default memory budget of from_config (the weights it creates) and the default file size limit
# of tg.load.
DEFAULT_MAX_BYTES = 16 * 2**30

# NOTE: [Operation budget] Measured with this module's counter (torch 2.13): from_config of a
# ResNet-50 (284 layers and nodes) takes ~2,800 aten operations for real and ~1,300 on the meta
# device (~10 per layer and node); a GPT stack of 4 blocks ~400; a 2-layer HF BERT ~420. The budget
# is BASE_OPS plus OPS_PER_ITEM for every layer, node, constant and stored tensor, about 10x what real
# models use. A meta operation costs ~20-50 us on an idle 2-core machine (up to ~1 ms when it is
# heavily loaded), so a crafted loop stops after about a second. Known count and iteration arguments
# (num_layers, niter) are bounded before anything runs (MAX_REPEATS in config_functions.py).
BASE_OPS = 20_000
OPS_PER_ITEM = 100
# An operation whose output size cannot be worked out on the meta device may still run for real
# when its inputs are this small (e.g. ``.tolist()`` of a small tensor in a layer's constructor).
SMALL_BYTES = 2**20


class BuildLimitError(GraphBuildError):
    """Building an untrusted config would take more operations or memory than its budget.

    A ``GraphBuildError`` (hence a ``ValueError``): recording lets it through unchanged.
    """


class _Local(threading.local):
    def __init__(self):
        self.guards: list["_Guard"] = []


_LOCAL = _Local()


def guarded() -> bool:
    """Whether an untrusted build is in progress in this thread."""
    return bool(_LOCAL.guards)


def real_probes_allowed() -> bool:
    """False while an untrusted config is being built (probes stay on the meta device)."""
    return not _LOCAL.guards


def _is_real(obj) -> bool:
    return isinstance(obj, torch.Tensor) and obj.device.type != "meta"


def _to_meta(obj):
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return obj
        return torch.empty_strided(obj.shape, obj.stride(), dtype=obj.dtype, device="meta")
    if isinstance(obj, torch.device):
        return torch.device("meta")
    return obj


_CREATES: dict = {}


def _creates_tensors(func) -> bool:
    """Whether ``func`` returns new tensors (views and in-place results create none)."""
    creates = _CREATES.get(func)
    if creates is None:
        creates = _CREATES[func] = not func.is_view and not any(
            r.alias_info is not None for r in func._schema.returns)
    return creates


def _any_real(args, kwargs) -> bool:
    """Whether a tensor argument lives outside the meta device (aten arguments nest one list deep)."""
    for group in (args, kwargs.values()):
        for a in group:
            if isinstance(a, torch.Tensor):
                if a.device.type != "meta":
                    return True
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, torch.Tensor) and b.device.type != "meta":
                        return True
    return False


def _nbytes(outputs) -> int:
    flat, _ = tree_flatten(outputs)
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


class _Guard(TorchDispatchMode):
    def __init__(self, max_bytes: int, max_ops: int, what: str):
        super().__init__()
        self.max_bytes = max_bytes
        self.max_ops = max_ops
        self.what = what
        self.ops = 0
        self.allocated = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if self.ops > self.max_ops:
            raise BuildLimitError(
                f"{self.what} takes more than {self.max_ops} tensor operations (its "
                "budget, which grows with the number of layers, nodes and tensors); a size, count or "
                "iteration argument is far too large.")
        if not _creates_tensors(func):
            return func(*args, **kwargs)  # a view or an in-place update: no new memory
        device = kwargs.get("device")
        if (device is None or torch.device(device).type == "meta") and not _any_real(args, kwargs):
            return func(*args, **kwargs)  # everything on the meta device: costs no memory
        flat, _ = tree_flatten((args, kwargs))
        try:
            predicted = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
        except Exception:  # noqa: BLE001 - no meta kernel, or data-dependent: judge by the inputs
            size = sum(a.numel() * a.element_size() for a in flat if _is_real(a))
            if size > SMALL_BYTES:
                raise BuildLimitError(
                    f"{self.what} runs '{func}' on {size} bytes of real data, more than "
                    f"the {SMALL_BYTES} bytes allowed for work that cannot be sized in advance."
                ) from None
            out = func(*args, **kwargs)
            self._account(_nbytes(out), func)
            return out
        self._account(_nbytes(predicted), func)
        return func(*args, **kwargs)

    def _account(self, nbytes: int, func) -> None:
        self.allocated += nbytes
        if self.allocated > self.max_bytes:
            raise BuildLimitError(
                f"{self.what} would allocate more than {self.max_bytes} bytes ('{func}' "
                f"asks for {nbytes}); a layer or constant is far larger than the data it came with.")


@contextlib.contextmanager
def build_guard(max_bytes: int, max_ops: int, what: str = "building this config"):
    """Bound the tensor operations and the memory of the code run inside (this thread only).

    Args:
        max_bytes: memory that tensors created outside the meta device may take in total (freed
            tensors are not given back: the count is conservative).
        max_ops: aten operations allowed in total.
        what: the subject of error messages (``"building this config"``).

    Raises:
        BuildLimitError: inside the block, when an operation would exceed either bound.
    """
    guard = _Guard(max_bytes, max_ops, what)
    _LOCAL.guards.append(guard)
    try:
        with guard:
            yield guard
    finally:
        _LOCAL.guards.remove(guard)
