"""Progress output: a live per-step bar (terminal or Jupyter), or one clean line per epoch.

``verbose="auto"`` picks the bar in a terminal and in a Jupyter kernel (a notebook's stdout is not
a TTY, yet it draws a bar), and one line per epoch when stdout is a file or a pipe (logs, CI).
In Jupyter the bar is tqdm's widget when ipywidgets is installed, else tqdm's text bar, which a
notebook redraws in place (tqdm.auto would print an "IProgress not found" warning instead).
"""

from __future__ import annotations

import sys
import time

from ..distributed import is_chief
from .base import Callback

__all__ = ["ProgbarLogger", "resolve_verbose", "in_notebook", "progress_bar"]


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, classic notebook, VS Code, Colab)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # an IPython too old or half-imported: not a kernel we can draw in
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_verbose(verbose) -> int:
    """``"auto"``, 0, 1, 2 (or a bool) as 0 (silent), 1 (bar) or 2 (one line per epoch)."""
    if verbose == "auto":
        live = in_notebook() or sys.stdout.isatty()
        return 1 if live and _has_tqdm() else 2
    if verbose not in (0, 1, 2, False, True):
        raise ValueError(f"verbose must be 'auto', 0, 1 or 2; received {verbose!r}.")
    verbose = int(verbose)
    if verbose == 1 and not _has_tqdm():
        raise ImportError("verbose=1 shows a tqdm progress bar: pip install 'torchgraph-fx[train]' "
                          "(or use verbose=2 for one line per epoch).")
    return verbose


def progress_bar(total, desc: str, file=None):
    """A tqdm bar: the Jupyter widget in a notebook with ipywidgets, else the text bar."""
    if in_notebook() and file is None:
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm as notebook_tqdm
            return notebook_tqdm(total=total, desc=desc, unit="step", leave=True)
        except ImportError:
            pass
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", file=file or sys.stdout, dynamic_ncols=True, leave=True)


def format_logs(logs) -> str:
    return " - ".join(f"{k}: {float(v):.4f}" for k, v in logs.items())


class ProgbarLogger(Callback):
    """Progress output on rank 0: a tqdm bar per epoch (``verbose=1``) or one line per epoch (2).

    The bar advances every step and shows the rate, ETA and the running loss and metrics,
    refreshed every ``refresh_seconds`` (reading them waits for the device, so not on every step).
    """

    def __init__(self, verbose: int = 1, refresh_seconds: float = 0.5, file=None):
        super().__init__()
        self.verbose, self.refresh_seconds, self.file = verbose, refresh_seconds, file
        self._bar = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._last = self._start
        if self.verbose == 1 and is_chief():
            self._bar = progress_bar(self.params.get("steps"), f"Epoch {epoch + 1}/{self.params.get('epochs')}",
                                     self.file)

    def on_train_batch_end(self, batch, logs=None):
        bar = self._bar
        if bar is None:
            return
        bar.update(1)
        now = time.perf_counter()
        if now - self._last >= self.refresh_seconds:
            self._last = now
            bar.set_postfix_str(format_logs(logs), refresh=False)

    def on_epoch_end(self, epoch, logs=None):
        if self._bar is not None:
            self._bar.set_postfix_str(format_logs(logs), refresh=True)
            self._bar.close()
            self._bar = None
        elif self.verbose == 2 and is_chief():
            took = time.perf_counter() - self._start
            print(f"Epoch {epoch + 1}/{self.params.get('epochs')} - {took:.1f}s - {format_logs(logs)}",
                  file=self.file or sys.stdout, flush=True)

    def on_train_end(self, logs=None):
        if self._bar is not None:  # stopped mid-epoch
            self._bar.close()
            self._bar = None
