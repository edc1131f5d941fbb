"""One file per model: the architecture (JSON config) and the weights, in the safetensors format.

NOTE: [File format] A torchgraph file *is* a safetensors file, written and read by the
``safetensors`` package (https://github.com/huggingface/safetensors):

    8 bytes    little-endian u64 N: the size of the JSON header
    N bytes    JSON header: {"__metadata__": {...}, "<state_dict key>": {"dtype": "F32", "shape": [..],
               "data_offsets": [begin, end]}, ...}, padded with spaces to a multiple of 8
    the rest   the raw little-endian tensor bytes, back to back, no gaps

``__metadata__`` holds strings only: ``format`` = ``"torchgraph"``, ``format_version``, ``config`` (the
model's JSON config, see ``config.py``), ``aliases`` (JSON: state_dict keys that share another key's
tensor, such as tied weights, stored once) and ``torchgraph_version``.

Why this format: it cannot carry code (no pickle: tensors are raw bytes described by JSON), every
safetensors tool reads the weights, and the header sits at the front, so a file is validated (by
safetensors: sizes, offsets covering the data exactly, header at most 100 MB; by torchgraph: the
config) before any tensor data is read. The reading and writing is the ``safetensors`` package's:
an earlier hand-written reader mistook 1 header length in 2048 for a pickle and refused files it had
written itself.

Safety when loading, on top of safetensors' checks (see docs/config_and_saving.md): the path must be
a regular file (a FIFO would block); nothing is unpickled, imported or evaluated (the config is
resolved through allowlists); the config is built on the meta device under a budget of tensor
operations and of real memory (``untrusted.py``), and its ``state_dict`` must match the file's
tensors key for key, shape for shape and dtype for dtype before tensor data is read, so memory is
bounded by the file's size. Every failure is a ``ValueError`` naming the file (or
``FileNotFoundError``/``IsADirectoryError``/``PermissionError`` for the path).

Saving is atomic (``atomic_files.py``): a temporary file next to the destination, fsync'ed, renamed
over it; temporary files left by a killed save are removed by the next save to the same path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from typing import Any

import torch
import torch.nn as nn

from .atomic_files import atomic_write
from .config import from_config
from .hierarchy import retie
from .untrusted import BASE_OPS, DEFAULT_MAX_BYTES, OPS_PER_ITEM, BuildLimitError, build_guard

__all__ = ["save", "load", "read_file_info", "require_safetensors", "FileInfo", "FORMAT_NAME",
           "FORMAT_VERSION", "DEFAULT_MAX_BYTES", "MAX_HEADER_BYTES"]

FORMAT_NAME = "torchgraph"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # the safetensors package's own limit
# Real memory a meta build may use besides the weights (small tensors made by layer constructors).
_BUILD_SLACK_BYTES = 64 * 2**20
_PIP_HINT = "pip install 'torchgraph-fx[io]' (or pip install safetensors)"

_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
        ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"))
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_CODES = {d: c for c, d in _DTYPES.items()}


class FileInfo:
    """What a file's header says, read without touching the tensor data.

    Attributes:
        config (dict): the model config.
        tensors (dict): state_dict key -> ``(dtype, shape)`` (aliases included).
        metadata (dict): the raw ``__metadata__`` strings.
        num_bytes (int): the file size.
    """

    def __init__(self, config: dict, tensors: dict, metadata: dict, num_bytes: int):
        self.config = config
        self.tensors = tensors
        self.metadata = metadata
        self.num_bytes = num_bytes


def require_safetensors(who: str):
    """The safetensors package (with ``safetensors.torch``), or an ImportError naming ``who`` and the fix
    (tg.save/tg.load here; save_weights and checkpoints in torchgraph.training use it too)."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise ImportError(f"{who} reads and writes safetensors files with the safetensors package, "
                          f"which is not installed: {_PIP_HINT}") from None
    return safetensors


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------

def save(model, path: str | os.PathLike) -> None:
    """Write ``model`` (architecture and weights) to one file, atomically.

    The file is a safetensors file whose metadata holds the model's config; see
    ``docs/config_and_saving.md``. The conventional extension is ``.safetensors``. Temporary files
    left next to ``path`` by an earlier save that was killed are removed.

    Args:
        model (tg.Model): the model; all its layers must be describable by ``get_config`` (built-in
            ``torch.nn`` layers, ``@tg.register_layer`` classes, nested ``tg.Model``s).
        path: the destination; an existing file there is replaced only once the new one is complete.

    Raises:
        ValueError: the model cannot be described (an unregistered layer class), or holds tensors that
            cannot be stored (sparse, meta, or of an unsupported dtype).
        ImportError: the ``safetensors`` package is missing.

    Example:
        >>> import os, tempfile, torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(4,))
        >>> model = tg.Model(x, nn.Linear(4, 2)(x))
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> tg.save(model, path)
        >>> loaded = tg.load(path)
        >>> x0 = torch.randn(3, 4)
        >>> torch.equal(loaded(x0), model(x0))
        True
    """
    from .model import Model

    if not isinstance(model, Model):
        raise TypeError(f"tg.save: expected a tg.Model; received {type(model).__name__}.")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"tg.save: '{path}' is a directory. Expected a file path such as "
                                f"'{os.path.join(path, 'model.safetensors')}'.")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tg.save: the directory '{directory}' does not exist. Create it first.")
    st = require_safetensors("tg.save")

    config_text = json.dumps(model.get_config(), allow_nan=False, separators=(",", ":"))
    tensors, aliases = _plan(model.state_dict())
    from . import __version__
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "config": config_text,
                "aliases": json.dumps(aliases, separators=(",", ":")), "torchgraph_version": __version__}
    header_estimate = len(config_text) + sum(len(k) + 100 for k in tensors) + 1000
    if header_estimate > MAX_HEADER_BYTES:
        raise ValueError(f"tg.save: the file's header would be about {header_estimate} bytes, over the "
                         f"safetensors limit of {MAX_HEADER_BYTES} (a config with too many nodes or layers).")

    def write(tmp: str) -> None:
        st.torch.save_file(tensors, tmp, metadata=metadata)

    atomic_write(path, write)


def _plan(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write (contiguous, on the CPU, each storage once) and the aliases."""
    exact: dict[tuple, str] = {}
    storages: set[tuple] = set()
    aliases: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        where = f"tg.save: tensor '{key}'"
        if t.layout != torch.strided:
            raise ValueError(f"{where} has layout {t.layout}; only dense tensors can be saved.")
        if t.device.type == "meta":
            raise ValueError(f"{where} is on the meta device (it has no data). Materialize the model "
                             "first (model.to_empty(device='cpu') and initialize or load weights).")
        if t.dtype not in _CODES:
            raise ValueError(f"{where} has dtype {t.dtype}, which the file format does not store. Expected "
                             f"one of {sorted(str(d).replace('torch.', '') for d in _CODES)}.")
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        ident = storage + (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) if storage else None
        if ident is not None and ident in exact:
            aliases[key] = exact[ident]
            continue
        if ident is not None:
            exact[ident] = key
        data = t.to("cpu").contiguous()
        if storage is not None and storage in storages and data.data_ptr() == t.data_ptr():
            data = data.clone()  # another view of a stored tensor: safetensors stores each storage once
        if storage is not None:
            storages.add(storage)
        tensors[key] = data
    return tensors, aliases


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------

class _Header:
    def __init__(self, entries: dict, metadata: dict, num_bytes: int):
        self.entries = entries          # key -> (dtype, shape)
        self.metadata = metadata
        self.num_bytes = num_bytes

    @property
    def data_bytes(self) -> int:
        total = 0
        for dtype, shape in self.entries.values():
            n = dtype.itemsize
            for d in shape:
                n *= d
            total += n
        return total


def load(path: str | os.PathLike, *, max_bytes: int | None = DEFAULT_MAX_BYTES):
    """Read a model written by :func:`save`. Never unpickles, imports or evaluates anything.

    Layer classes are resolved only among ``torch.nn`` built-ins, ``tg.Model`` and classes registered
    with ``@tg.register_layer`` (import the module that registers them first). A file costs at most
    about twice its size in memory and a bounded number of tensor operations to load, whatever it
    contains (see docs/config_and_saving.md, "Guarantees and limits").

    Args:
        path: the file.
        max_bytes (int): refuse files larger than this (default 16 GiB); ``None`` for no limit.

    Returns:
        tg.Model: the model, on the CPU, in the training mode it was saved in.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a torchgraph file (a pickle or zip from ``torch.save``, another safetensors
            file, a FIFO or device), truncated, corrupt, crafted or oversized; an unregistered layer
            class. The message names the file.
        ImportError: the ``safetensors`` package is missing.

    Example:
        >>> import os, tempfile, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(3, 8, 8))
        >>> model = tg.Model(x, nn.Conv2d(3, 4, 3)(x), name="Net")
        >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
        >>> tg.save(model, path)
        >>> type(tg.load(path)).__name__
        'Net'
    """
    path = os.fspath(path)
    who = "tg.load"
    with _opened(path, who, max_bytes) as (handle, num_bytes):
        with _as_file_error(who, path):
            header = _read_header(handle, path, who, num_bytes)
            config = _config_of(header, path, who)
            model, _ = _build_checked(config, header, path, who)
            state = _read_tensors(handle, header, path, who)
            # assign=True adopts the tensors just read (fresh memory, see _read_tensors) instead of
            # copying them into the model's (requires_grad comes from the model either way). Each key
            # gets its own tensor, so the tensors the saved model shared are shared again afterwards.
            model.load_state_dict(state, strict=True, assign=True)
            retie(model, _aliases(header, path, who))  # NOTE: [Tied weights] in hierarchy.py
    return model


def read_file_info(path: str | os.PathLike, *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> FileInfo:
    """The config and tensor list of a saved model, validated, without reading the weights.

    Example:
        >>> import os, tempfile, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(4,))
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> tg.save(tg.Model(x, nn.Linear(4, 2)(x)), path)
        >>> info = tg.saving.read_file_info(path)
        >>> sorted(info.tensors)
        ['linear.bias', 'linear.weight']
    """
    path = os.fspath(path)
    who = "read_file_info"
    with _opened(path, who, max_bytes) as (handle, num_bytes):
        with _as_file_error(who, path):
            header = _read_header(handle, path, who, num_bytes)
            config = _config_of(header, path, who)
            tensors = dict(header.entries)
            for alias, key in _aliases(header, path, who).items():
                tensors[alias] = tensors[key]
    return FileInfo(config, tensors, header.metadata, header.num_bytes)


def _corrupt(who: str, path: str, what: str) -> ValueError:
    return ValueError(f"{who}: '{path}' is not a valid torchgraph file: {what}.")


@contextlib.contextmanager
def _as_file_error(who: str, path: str):
    """Every failure caused by a file's content becomes a ValueError that names the file."""
    try:
        yield
    except (ImportError, OSError):
        raise
    except ValueError as exc:
        text = str(exc)
        if f"'{path}'" in text:
            raise
        raise type(exc)(f"{who}: '{path}': {text}") if isinstance(exc, BuildLimitError) else \
            ValueError(f"{who}: '{path}': {text}") from None
    except RecursionError:
        raise _corrupt(who, path, "its config is nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - a crafted file must not reach the caller as anything else
        raise _corrupt(who, path, f"{type(exc).__name__}: {exc}") from exc


def _fd_path(fd: int, path: str) -> str:
    """A path that opens exactly the file behind ``fd`` (so it cannot be swapped after the checks)."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else path


@contextlib.contextmanager
def _opened(path: str, who: str, max_bytes: int | None):
    """The file opened with safetensors, after checking that it is a regular file of allowed size."""
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0):
        raise TypeError(f"{who}: max_bytes must be a non-negative int or None; received {max_bytes!r}.")
    try:
        # NOTE: O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{who}: no such file: '{path}'.") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(f"{who}: '{path}' is a directory, not a model file.")
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{who}: '{path}' is not a regular file (a FIFO, socket or device). Expected "
                             "a model file written by tg.save.")
        size = info.st_size
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"{who}: '{path}' is {size} bytes, more than max_bytes={max_bytes}. If you "
                             "trust the file, pass a larger max_bytes (or None).")
        st = require_safetensors(who)
        try:
            handle = st.safe_open(_fd_path(fd, path), framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError and OS errors alike
            raise _corrupt(who, path, _sniff(os.pread(fd, 16, 0), size) or _safetensors_reason(exc)) from None
        with handle:
            yield handle, size
    finally:
        os.close(fd)


def _safetensors_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"not a readable safetensors file ({text[:300]})"


def _sniff(first: bytes, size: int) -> str | None:
    """Why a file that safetensors could not open is not a model file, when it is recognisable."""
    if size == 0:
        return "it is empty"
    if first.startswith(b"PK\x03\x04"):
        return ("it is a zip archive, like the files torch.save writes; those contain pickles, which "
                "torchgraph never loads. Save models with tg.save")
    if first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a Python pickle, which torchgraph never loads (unpickling can run arbitrary code)"
    return None


_VERSION = re.compile(r"[0-9]{1,6}")


def _read_header(handle, path: str, who: str, num_bytes: int) -> _Header:
    metadata = handle.metadata()
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise _corrupt(who, path, "its metadata does not say format=torchgraph: a safetensors file that "
                                  "tg.save did not write (load its weights with safetensors instead)")
    version = metadata.get("format_version", "")
    if not _VERSION.fullmatch(version) or int(version) > FORMAT_VERSION:
        raise _corrupt(who, path, f"format_version {version!r:.20} is not one this torchgraph reads (up to "
                                  f"{FORMAT_VERSION}); upgrade torchgraph")
    entries = {}
    for key in handle.keys():
        view = handle.get_slice(key)
        code = view.get_dtype()
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise _corrupt(who, path, f"tensor '{key:.80}' has dtype {code!r:.20}, which torchgraph does not "
                                      "load")
        entries[key] = (dtype, tuple(view.get_shape()))
    return _Header(entries, metadata, num_bytes)


def _strict_json(text: str, who: str, path: str, what: str):
    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r:.60}")
            out[k] = v
        return out

    def constant(name):
        raise ValueError(f"non-standard constant {name}")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except RecursionError:
        raise _corrupt(who, path, f"its {what} is nested too deeply") from None
    except ValueError as exc:
        raise _corrupt(who, path, f"its {what} is not valid JSON ({exc})") from None


def _config_of(header: _Header, path: str, who: str) -> dict:
    if "config" not in header.metadata:
        raise _corrupt(who, path, "its metadata has no model config")
    return _strict_json(header.metadata["config"], who, path, "config")


def _aliases(header: _Header, path: str, who: str) -> dict[str, str]:
    aliases = _strict_json(header.metadata.get("aliases", "{}"), who, path, "aliases")
    if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v in header.entries and k not in header.entries
            for k, v in aliases.items()):
        raise _corrupt(who, path, "its aliases must map new keys to stored tensors")
    return aliases


def _num_items(config: Any) -> int:
    if not isinstance(config, dict):
        return 0
    return sum(len(config[k]) for k in ("layers", "nodes", "constants") if isinstance(config.get(k), list))


def _build_checked(config: dict, header: _Header, path: str, who: str) -> tuple[nn.Module, bool]:
    """The model a file's config describes, checked against the file's tensors before reading them.

    Returns ``(model, on_meta)``: normally the meta-device build itself, into which the file's
    tensors are assigned (no initialisation, no copy). A model with tensors that are not stored
    (non-persistent buffers) is built again for real once the meta build has shown what it costs.
    """
    aliases = _aliases(header, path, who)
    expected = dict(header.entries)
    for alias, key in aliases.items():
        expected[alias] = expected[key]
    what = "building the config of this file"
    max_ops = BASE_OPS + OPS_PER_ITEM * (_num_items(config) + len(expected))
    with build_guard(_BUILD_SLACK_BYTES, max_ops, what), torch.device("meta"):
        meta = from_config(config)
    state = meta.state_dict()
    _match(state, expected, path, who)
    unstored = [(n, t) for n, t in list(meta.named_parameters()) + list(meta.named_buffers()) if n not in state]
    if not unstored:
        return meta, True
    extra = sum(t.numel() * t.element_size() for _, t in unstored)
    with build_guard(header.data_bytes + extra + _BUILD_SLACK_BYTES, max_ops, what):
        model = from_config(config)
    _match(model.state_dict(), expected, path, who)
    return model, False


def _match(state: dict, expected: dict, path: str, who: str) -> None:
    missing = [k for k in state if k not in expected]
    unexpected = [k for k in expected if k not in state]
    if missing or unexpected:
        raise _corrupt(who, path, f"its weights do not match its config (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]})")
    for k, t in state.items():
        dtype, shape = expected[k]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise _corrupt(who, path, f"tensor '{k}' is {shape} {dtype} in the file but {tuple(t.shape)} "
                                      f"{t.dtype} in the model its config describes")


def _read_tensors(handle, header: _Header, path: str, who: str) -> dict[str, torch.Tensor]:
    """Each tensor copied from the file into its own (allocator-aligned) memory."""
    out = {}
    for key, (dtype, shape) in header.entries.items():
        mapped = handle.get_tensor(key)
        # NOTE: safetensors returns views into the memory-mapped file, at the file's offsets. A copy
        # into fresh (aligned) memory: misaligned tensors make oneDNN take other code paths whose
        # results differ in the last bits, and reloaded models must compute bit-identical outputs.
        t = torch.empty(shape, dtype=dtype)
        t.copy_(mapped)
        out[key] = t
    for alias, key in _aliases(header, path, who).items():
        out[alias] = out[key]
    return out
