"""One file per model: the architecture (JSON config) and the weights, in the safetensors format.

NOTE: [File format]
A torchgraph file *is* a safetensors file (https://github.com/huggingface/safetensors):

    8 bytes    little-endian u64 N: the size of the JSON header
    N bytes    JSON header: {"__metadata__": {...}, "<state_dict key>": {"dtype": "F32", "shape": [..],
               "data_offsets": [begin, end]}, ...}, padded with spaces to a multiple of 8
    the rest   the raw little-endian tensor bytes, back to back, no gaps

``__metadata__`` holds strings only: ``format`` = ``"torchgraph"``, ``format_version``, ``config`` (the
model's JSON config, see ``config.py``), ``aliases`` (JSON: state_dict keys that share another key's
tensor, such as tied weights, stored once) and ``torchgraph_version``.

Why this format: it cannot carry code (no pickle: tensors are raw bytes described by JSON), every
safetensors tool can open the weights, and the header sits at the front, so a file is validated
(sizes, offsets, dtypes, config) before any tensor data is read. The reader and writer are written
here (about a hundred lines) rather than taken from the ``safetensors`` package, so that saving needs no
optional dependency and loading applies torchgraph's own limits; the tests check that the
``safetensors`` package reads our files and that we read its files.

Safety when loading: no unpickling and no imports or eval (the config is resolved through allowlists);
the file size is capped (``max_bytes``), the header at 100 MB; offsets must tile the data exactly; the
config is first built on the meta device and its ``state_dict`` must match the file's tensors key for
key, shape for shape, before anything is allocated for real, so memory is bounded by the file's size.

Saving is atomic: the file is written to a temporary file in the same directory, flushed and fsync'ed,
then moved over the destination with ``os.replace``; a failure or an interruption leaves an existing
file untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import tempfile
from typing import Any, BinaryIO

import torch
import torch.nn as nn

from .config import from_config, get_config

__all__ = ["save", "load", "read_file_info", "FileInfo", "FORMAT_NAME", "FORMAT_VERSION",
           "DEFAULT_MAX_BYTES", "MAX_HEADER_BYTES"]

FORMAT_NAME = "torchgraph"
FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 16 * 2**30
MAX_HEADER_BYTES = 100 * 2**20

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


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------

def save(model, path: str | os.PathLike) -> None:
    """Write ``model`` (architecture and weights) to one file, atomically.

    The file is a safetensors file whose metadata holds the model's config; see
    ``docs/config_and_saving.md``. The conventional extension is ``.safetensors``.

    Args:
        model (tg.Model): the model; all its layers must be describable by ``get_config`` (built-in
            ``torch.nn`` layers, ``@tg.register_layer`` classes, nested ``tg.Model``s).
        path: the destination; an existing file there is replaced only once the new one is complete.

    Raises:
        ValueError: the model cannot be described (an unregistered layer class), or holds tensors that
            cannot be stored (sparse, meta, or of an unsupported dtype).

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
    if sys.byteorder != "little":
        raise NotImplementedError("tg.save: big-endian machines are not supported.")

    config_text = json.dumps(get_config(model), allow_nan=False, separators=(",", ":"))
    state = model.state_dict()
    entries, aliases = _plan(state)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "config": config_text,
                "aliases": json.dumps(aliases, separators=(",", ":"))}
    from . import __version__
    metadata["torchgraph_version"] = __version__
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, t in entries:
        end = offset + t.numel() * t.element_size()
        header[key] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ValueError(f"tg.save: the header would be {len(header_bytes)} bytes, over the format's limit "
                         f"of {MAX_HEADER_BYTES} (a config with too many nodes or layers).")

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for key, t in entries:
            _write_tensor(f, key, t)

    _atomic_write(path, write)


def _plan(state: dict[str, torch.Tensor]) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Tensors to write (each storage once), ordered so every tensor starts aligned to its item size."""
    unique: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    entries = []
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
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                 t.dtype) if t.numel() else None
        if ident is not None and ident in unique:
            aliases[key] = unique[ident]
            continue
        if ident is not None:
            unique[ident] = key
        entries.append((key, t))
    entries.sort(key=lambda kt: -kt[1].element_size())  # stable: state_dict order within a size
    return entries, aliases


def _write_tensor(f: BinaryIO, key: str, t: torch.Tensor) -> None:
    data = t.detach().to("cpu").contiguous().reshape(-1)
    if data.numel():
        f.write(memoryview(data.view(torch.uint8).numpy()))


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
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


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------

class _Header:
    def __init__(self, entries, metadata, data_start, data_len, num_bytes):
        self.entries = entries          # key -> (dtype, shape, begin, end)
        self.metadata = metadata
        self.data_start = data_start
        self.data_len = data_len
        self.num_bytes = num_bytes


def load(path: str | os.PathLike, *, max_bytes: int | None = DEFAULT_MAX_BYTES):
    """Read a model written by :func:`save`. Never unpickles, imports or evaluates anything.

    Layer classes are resolved only among ``torch.nn`` built-ins, ``tg.Model`` and classes registered
    with ``@tg.register_layer`` (import the module that registers them first).

    Args:
        path: the file.
        max_bytes (int): refuse files larger than this (default 16 GiB); ``None`` for no limit.

    Returns:
        tg.Model: the model, on the CPU, in the training mode it was saved in.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a torchgraph file (a pickle or zip from ``torch.save``, another safetensors
            file), truncated, corrupt, crafted or oversized; an unregistered layer class.

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
    with _open(path, "tg.load") as f:
        header = _read_header(f, path, max_bytes, "tg.load")
        config = _config_of(header, path, "tg.load")
        model, on_meta = _build_checked(config, header, path)
        state = _read_tensors(f, header, path)
    # On meta, assign=True adopts the tensors just read instead of copying them (requires_grad comes
    # from the model either way).
    model.load_state_dict(state, strict=True, assign=on_meta)
    _retie(model, _aliases(header, path, "tg.load"))
    return model


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Tensors the saved model shared (tied weights: nanoGPT's lm_head and wte) are one tensor again,
    not two equal copies that a training step would pull apart."""
    for alias, key in aliases.items():
        owner_path, _, field = alias.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        source_path, _, source_field = key.rpartition(".")
        source = model.get_submodule(source_path) if source_path else model
        if field in owner._parameters and source_field in source._parameters:
            owner._parameters[field] = source._parameters[source_field]
        elif field in owner._buffers and source_field in source._buffers:
            owner._buffers[field] = source._buffers[source_field]


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
    with _open(path, "read_file_info") as f:
        header = _read_header(f, path, max_bytes, "read_file_info")
    config = _config_of(header, path, "read_file_info")
    tensors = {k: (d, s) for k, (d, s, _, _) in header.entries.items()}
    for alias, key in _aliases(header, path, "read_file_info").items():
        tensors[alias] = tensors[key]
    return FileInfo(config, tensors, header.metadata, header.num_bytes)


@contextlib.contextmanager
def _open(path: str, who: str):
    if os.path.isdir(path):
        raise IsADirectoryError(f"{who}: '{path}' is a directory, not a model file.")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{who}: no such file: '{path}'.") from None
    with f:
        yield f


def _corrupt(who: str, path: str, what: str) -> ValueError:
    return ValueError(f"{who}: '{path}' is not a valid torchgraph file: {what}.")


def _strict_json(data: bytes | str, who: str, path: str, what: str):
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
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except RecursionError:
        raise _corrupt(who, path, f"its {what} is nested too deeply") from None
    except ValueError as exc:
        raise _corrupt(who, path, f"its {what} is not valid JSON ({exc})") from None


def _sniff(first: bytes) -> str | None:
    if first.startswith(b"PK\x03\x04"):
        return ("it is a zip archive, like the files torch.save writes; those contain pickles, which "
                "torchgraph never loads. Save models with tg.save")
    if first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a Python pickle, which torchgraph never loads (unpickling can run arbitrary code)"
    return None


def _read_header(f: BinaryIO, path: str, max_bytes: int | None, who: str) -> _Header:
    size = os.fstat(f.fileno()).st_size
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{who}: '{path}' is {size} bytes, more than max_bytes={max_bytes}. If you trust "
                         "the file, pass a larger max_bytes (or None).")
    first = f.read(8)
    sniffed = _sniff(first)
    if sniffed:
        raise _corrupt(who, path, sniffed)
    if len(first) < 8:
        raise _corrupt(who, path, f"it is {size} bytes long, shorter than the 8-byte header length "
                                  "(truncated or empty)")
    (n,) = struct.unpack("<Q", first)
    if n > MAX_HEADER_BYTES:
        raise _corrupt(who, path, f"the header length field says {n} bytes, over the {MAX_HEADER_BYTES}-byte "
                                  "limit")
    if 8 + n > size:
        raise _corrupt(who, path, f"the header needs {n} bytes but the file has {size - 8} after the length "
                                  "field (truncated)")
    raw = f.read(n)
    if len(raw) != n:
        raise _corrupt(who, path, "the header is truncated")
    header = _strict_json(raw, who, path, "header")
    if not isinstance(header, dict):
        raise _corrupt(who, path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(who, path, "the header has no string-valued __metadata__ (not saved by tg.save)")
    if metadata.get("format") != FORMAT_NAME:
        raise _corrupt(who, path, "its metadata does not say format=torchgraph: a safetensors file that "
                                  "tg.save did not write (load its weights with safetensors instead)")
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise _corrupt(who, path, f"format_version {version!r:.20} is not one this torchgraph reads (up to "
                                  f"{FORMAT_VERSION}); upgrade torchgraph")
    data_len = size - 8 - n
    entries = {}
    for key, info in header.items():
        entries[key] = _entry(key, info, who, path)
    spans = sorted((b, e, k) for k, (_, _, b, e) in entries.items())
    cursor = 0
    for b, e, k in spans:
        if b != cursor:
            raise _corrupt(who, path, f"tensor '{k:.80}' starts at byte {b}, expected {cursor} (offsets must "
                                      "cover the data exactly, without gaps or overlaps)")
        cursor = e
    if cursor != data_len:
        state = "truncated" if cursor > data_len else "followed by unexpected bytes"
        raise _corrupt(who, path, f"the tensors need {cursor} bytes of data and the file has {data_len} "
                                  f"({state})")
    return _Header(entries, metadata, 8 + n, data_len, size)


def _entry(key: str, info: Any, who: str, path: str) -> tuple:
    where = f"tensor '{key:.80}'"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _corrupt(who, path, f"{where} must have exactly dtype, shape and data_offsets")
    dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise _corrupt(who, path, f"{where} has unknown dtype {info['dtype']!r:.20}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or len(shape) > 64 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape):
        raise _corrupt(who, path, f"{where} has an invalid shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
        raise _corrupt(who, path, f"{where} has invalid data_offsets")
    numel = 1
    for d in shape:
        numel *= d
    b, e = offsets
    if e - b != numel * dtype.itemsize:
        raise _corrupt(who, path, f"{where}: shape {tuple(shape)} of {dtype} needs {numel * dtype.itemsize} "
                                  f"bytes but its data_offsets span {e - b}")
    return dtype, tuple(shape), b, e


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


def _uses_registered_layers(config: Any) -> bool:
    from .layer_config import MODEL_CLASS

    if isinstance(config, dict):
        cls = config.get("class")
        if isinstance(cls, str) and cls != MODEL_CLASS and not cls.startswith("torch.nn."):
            return True
        return any(_uses_registered_layers(v) for v in config.values())
    if isinstance(config, list):
        return any(_uses_registered_layers(v) for v in config)
    return False


def _build_checked(config: dict, header: _Header, path: str) -> tuple[nn.Module, bool]:
    """The model a file's config describes, checked against the file's tensors before allocating.

    Returns ``(model, on_meta)``: when every layer is a built-in (or a nested model of built-ins) the
    model is the meta-device build itself, and the file's tensors are assigned into it (no random
    initialisation, no copy); otherwise it is a real build whose weights get overwritten.
    """
    who = "tg.load"
    aliases = _aliases(header, path, who)
    expected = {k: (d, s) for k, (d, s, _, _) in header.entries.items()}
    for alias, key in aliases.items():
        expected[alias] = expected[key]
    registered = _uses_registered_layers(config)
    try:
        with torch.device("meta"):
            meta = from_config(config)
    except ValueError:
        # NOTE: built-in layers always build on meta, so a failure here is a bad config; a registered
        # class may not (its __init__ may read data), so those configs are built for real and checked
        # after.
        if not registered:
            raise
        meta = None
    if meta is not None:
        _match(meta.state_dict(), expected, path)
        if not registered and not any(m._non_persistent_buffers_set for m in meta.modules()):
            return meta, True
    model = from_config(config)
    _match(model.state_dict(), expected, path)
    return model, False


def _match(state: dict, expected: dict, path: str) -> None:
    missing = [k for k in state if k not in expected]
    unexpected = [k for k in expected if k not in state]
    if missing or unexpected:
        raise _corrupt("tg.load", path, f"its weights do not match its config (missing {missing[:5]}, "
                                        f"unexpected {unexpected[:5]})")
    for k, t in state.items():
        dtype, shape = expected[k]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise _corrupt("tg.load", path, f"tensor '{k}' is {tuple(shape)} {dtype} in the file but "
                                            f"{tuple(t.shape)} {t.dtype} in the model its config describes")


def _read_tensors(f: BinaryIO, header: _Header, path: str) -> dict[str, torch.Tensor]:
    """Each tensor read straight from the file into its own (allocator-aligned) memory."""
    out = {}
    for key, (dtype, shape, b, e) in sorted(header.entries.items(), key=lambda kv: kv[1][2]):
        t = torch.empty(shape, dtype=dtype)
        if e > b:
            f.seek(header.data_start + b)
            # NOTE: a view as bytes of the fresh tensor: readinto fills it without a copy. (Views into one
            # big buffer would save the allocations but misalign tensors, and oneDNN then takes other
            # code paths whose results differ in the last bits.)
            target = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            if f.readinto(target) != e - b:
                raise _corrupt("tg.load", path, "the tensor data ends early (truncated)")
        out[key] = t
    for alias, key in _aliases(header, path, "tg.load").items():
        out[alias] = out[key]
    return out
