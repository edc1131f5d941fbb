"""Atomic file writes whose leftovers are cleaned up, even after ``kill -9``.

A file is written under a temporary name in the destination's directory, flushed, ``fsync``'ed and
renamed over the destination: readers see the old file or the new one, never half of one.

NOTE: [Stale temporary files] A writer that is killed (``kill -9``, a power cut, the OOM killer)
cannot remove its temporary file, which has the size of the whole model. So temporary files are
named after their destination (``.<name>.tg-partial-<random>.tmp``) and every writer holds an
exclusive ``flock`` on its own while it writes. The kernel drops that lock when the process dies,
however it dies; the next save to the same path removes every temporary file of that path whose
lock it can take (a writer still alive keeps its lock, so concurrent saves are left alone). A
cleaner could lock a file that a new writer has created but not yet locked; the writer therefore
checks, once it holds its lock, that its name still points at its file, and starts again if not.
Without ``fcntl`` (Windows) nothing is cleaned up.

Example:
    >>> import os, tempfile
    >>> from torchgraph.atomic_files import atomic_write
    >>> path = os.path.join(tempfile.mkdtemp(), "hello.txt")
    >>> def write(tmp):
    ...     with open(tmp, "w") as f:
    ...         _ = f.write("hello")
    >>> atomic_write(path, write)
    >>> open(path).read()
    'hello'
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from typing import Callable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["atomic_write", "remove_stale_temporaries", "temporary_prefix"]

_SUFFIX = ".tmp"


def temporary_prefix(path: str) -> str:
    """The name prefix of ``path``'s temporary files: ``.<basename>.tg-partial-``."""
    return f".{os.path.basename(path)}.tg-partial-"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove the temporary files of ``path`` left by writers that died; return their names."""
    if fcntl is None:
        return []
    directory = os.path.dirname(os.path.abspath(path))
    prefix = temporary_prefix(path)
    removed = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(_SUFFIX)]
    except OSError:
        return []
    for name in names:
        full = os.path.join(directory, name)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and _try_lock(fd):
                with contextlib.suppress(OSError):
                    os.unlink(full)
                    removed.append(name)
        finally:
            os.close(fd)
    return removed


def _locked_temporary(path: str) -> tuple[int, str]:
    directory = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=_SUFFIX, dir=directory)
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a cleaner holds it for an instant
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, tmp
        os.close(fd)  # a cleaner removed it before we locked it: start again
    raise OSError(f"could not create a temporary file next to '{path}'")


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Create or replace ``path`` with what ``write(temporary_path)`` writes, atomically.

    Stale temporary files of ``path`` (from killed writers) are removed first. If ``write`` fails
    or is interrupted, an existing file at ``path`` is left untouched and the temporary file is
    removed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(path)
    fd, tmp = _locked_temporary(path)
    try:
        write(tmp)
        os.fsync(fd)  # the same inode: flushes what ``write`` wrote through its own handle
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
