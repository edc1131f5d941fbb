"""Loads ``torchgraph._C``, the compiled kernels, and records whether that worked.

``HAS_C_OPS`` is True once ``_C`` is imported: importing it runs the C++ static
initialisers that register the ``torch.ops.torchgraph.*`` schemas and kernels.
When it is False (not built, built for another torch, or disabled with
``TORCHGRAPH_DISABLE_C_OPS=1``), :mod:`torchgraph.ops` runs its pure-PyTorch
references instead, with the same results and the same error messages.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch  # noqa: F401  (_C links against libtorch: load torch first)

__all__ = ["DISABLE_ENV_VAR", "HAS_C_OPS", "LOAD_ERROR"]

DISABLE_ENV_VAR = "TORCHGRAPH_DISABLE_C_OPS"


def _load_c_ops() -> tuple[bool, str | None]:
    if os.environ.get(DISABLE_ENV_VAR, "0") == "1":
        return False, f"disabled by {DISABLE_ENV_VAR}=1"
    try:
        importlib.import_module("torchgraph._C")
    except (ImportError, OSError) as error:  # not built, or built against another torch
        reason = f"{type(error).__name__}: {error}"
        # NOTE: this module body runs once per process, so the warning is issued once.
        warnings.warn(
            f"torchgraph could not load its compiled kernels (torchgraph._C): {reason}. "
            "torchgraph.ops falls back to pure-PyTorch reference implementations "
            "(same results, slower). To build the kernels, run "
            "`python setup.py build_ext --inplace` in the torchgraph source tree "
            f"(or set {DISABLE_ENV_VAR}=1 to silence this warning).",
            RuntimeWarning,
            stacklevel=2,
        )
        return False, reason
    return True, None


#: True when the compiled kernels are registered under ``torch.ops.torchgraph``.
HAS_C_OPS: bool
#: Why loading failed (None when HAS_C_OPS is True).
LOAD_ERROR: str | None
HAS_C_OPS, LOAD_ERROR = _load_c_ops()
