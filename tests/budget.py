"""Time and memory budgets for loading untrusted files in tests (shared by the fuzz and hostile tests).

Peak memory is the kernel's high-water mark, reset before each call, where Linux offers it
(``/proc/self/clear_refs``); elsewhere tracemalloc (Python allocations only).
"""

import time
import tracemalloc

# A generous hang detector, not a performance goal (the budgets in untrusted.py bound the work).
SECONDS_PER_EXAMPLE = 30
# Files here are a few KB: loading one may take this much memory beyond the process's baseline.
MEMORY_BUDGET = 96 * 2**20

_CLEAR_REFS = "/proc/self/clear_refs"


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _current_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _can_reset_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return _peak_rss() is not None


_RESET = _can_reset_peak()


def within_budget(fn):
    """Run ``fn``; return ``(exception or None, seconds, peak extra bytes)``."""
    if _RESET:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _current_rss()
    else:
        tracemalloc.start()
    start = time.perf_counter()
    error = None
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the caller checks the type
        error = exc
    seconds = time.perf_counter() - start
    if _RESET:
        extra = _peak_rss() - base
    else:
        extra = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, seconds, extra


def assert_documented(error, seconds, extra):
    assert error is None or isinstance(error, ValueError), f"{type(error).__name__}: {error}"
    assert error is None or str(error)
    assert seconds < SECONDS_PER_EXAMPLE, seconds
    assert extra < MEMORY_BUDGET, f"{extra / 2**20:.0f} MB"
