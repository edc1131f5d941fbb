"""Freed tensor memory kept in the process instead of given back to the OS: :func:`retain_freed_memory`."""

from __future__ import annotations

import ctypes
import platform
import sys

__all__ = ["GLIBC_MAX_MMAP_THRESHOLD", "retain_freed_memory"]

# NOTE: [Page faults from freed memory] glibc's malloc gives large freed blocks back to the OS:
# blocks above its mmap threshold are unmapped when freed, and the top of the heap is trimmed when
# more than the trim threshold lies free there. Both thresholds start low (128 KB, 256 KB) and only
# adapt upward as large blocks are freed, so whether a model's 1-4 MB activations come back as fresh
# pages (each one page-faulted on first touch) depends on what the process did before. Measured on
# the AMD EPYC VM (2 threads, 10 forwards after 3 warm-up calls, `resource.getrusage` minor faults):
# the GPT stack (4 blocks, d256, t128, b8) took 32.8-36.2 ms in tg.optimize with 9,200-10,400 minor
# faults per forward (~40 MB of fresh pages) and 19.7-21.8 ms with none; eager 49-54 ms against
# 41-45 ms. That is also why speed-ups measured in different processes disagreed. ONNX Runtime and
# OpenVINO allocate from arenas of their own and never see it; PyTorch's CPU performance guide gets
# the same effect by preloading jemalloc or tcmalloc. Raising both thresholds keeps freed blocks for
# reuse: no faults, at the cost of a resident size that stays at its peak instead of shrinking.
# Order matters: setting the trim threshold alone also freezes the mmap threshold at 128 KB (glibc
# turns off its adaptation when either is set), so every block above 128 KB is mapped and unmapped
# on each call (eager GPT 442 ms); hence the mmap threshold is set first and the trim threshold only
# when that worked.

#: The largest mmap threshold glibc accepts on 64-bit systems (``HEAP_MAX_SIZE / 2``); blocks larger
#: than this are mapped and unmapped whatever the threshold, unless mapping is switched off
#: (``large_blocks=True``, NOTE: [Blocks above glibc's cap]).
GLIBC_MAX_MMAP_THRESHOLD = 32 << 20

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

# NOTE: [Blocks above glibc's cap] A block above 32 MiB is mapped afresh on every allocation however high
# the thresholds: a language model's float32 logits at batch 8, 128 tokens and a vocabulary of 8192 are
# 33.5 MB, and converting them took 11.7 ms a call against 0.99 ms into memory the process kept (2
# threads, the AMD EPYC VM; 16 MB: 0.28 ms). glibc's M_MMAP_MAX = 0 stops malloc from mapping blocks at
# all, so those come from the heap too and are kept like the rest (threads whose arena cannot grow that
# far fall back to the main heap). It is a choice for the whole process: memory then grows only through
# the heap, whose top is trimmed above the trim threshold as before. Off by default: the caller opts in.


def _glibc():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def retain_freed_memory(mmap_threshold: int = GLIBC_MAX_MMAP_THRESHOLD, trim_threshold: int = 256 << 20,
                        large_blocks: bool = False) -> bool:
    """Keeps freed memory in this process for reuse, so repeated forwards stop page-faulting.

    On Linux with glibc, large tensors freed after a forward are given back to the OS and the next
    forward touches fresh pages again: on the machine measured that cost the GPT benchmark 40% of
    its time, in eager PyTorch and in ``tg.optimize``'s models alike, by an amount that depends on
    the process's history (NOTE: [Page faults from freed memory]). This raises glibc's mmap threshold
    (blocks up to ``mmap_threshold`` bytes come from the heap) and trim threshold (up to
    ``trim_threshold`` free bytes stay at the heap's top) for the whole process, as preloading
    jemalloc or tcmalloc would. The process then keeps its peak memory instead of shrinking back.
    The same can be set before Python starts with the environment variables
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456`` (both: one alone is worse).

    Args:
        mmap_threshold: Blocks up to this many bytes come from the heap (at most
            :data:`GLIBC_MAX_MMAP_THRESHOLD`, 32 MiB: glibc refuses more).
        trim_threshold: Free bytes at the heap's top that are kept rather than given back.
        large_blocks: Also keep blocks above glibc's 32 MiB cap (a language model's logits), by turning off
            malloc's use of mmap for the process (NOTE: [Blocks above glibc's cap]).

    Returns:
        True when both thresholds were set; False where there is no glibc (macOS, Windows, musl) or
        glibc refused, in which case nothing was changed.

    Raises:
        ValueError: If a threshold is not a positive int, or ``mmap_threshold`` is above glibc's cap.

    Example:
        >>> import torchgraph
        >>> torchgraph.retain_freed_memory(mmap_threshold=64 << 30)
        Traceback (most recent call last):
        ...
        ValueError: retain_freed_memory: mmap_threshold must be at most 33554432 bytes (glibc's cap on 64-bit systems), got 68719476736
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"retain_freed_memory: {name} must be a positive int (bytes), got {value!r}")
    if mmap_threshold > GLIBC_MAX_MMAP_THRESHOLD:
        raise ValueError(f"retain_freed_memory: mmap_threshold must be at most {GLIBC_MAX_MMAP_THRESHOLD} bytes "
                         f"(glibc's cap on 64-bit systems), got {mmap_threshold}")
    if trim_threshold >= 1 << 31:
        raise ValueError(f"retain_freed_memory: trim_threshold must be below 2 GiB (a C int), got {trim_threshold}")
    mallopt = _glibc()
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
        return False
    if not mallopt(_M_TRIM_THRESHOLD, trim_threshold):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) if large_blocks else True
