"""tg.save / tg.load: round trips, interoperability, crafted files, fuzzing, atomicity."""

import copy
import json
import os
import pickle
import stat
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import torchgraph as tg
from torchgraph import layer_config, saving


@tg.register_layer
class Tied(nn.Module):
    """Two linears sharing one weight (a state_dict alias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.a = nn.Linear(dim, dim, bias=False)
        self.b = nn.Linear(dim, dim, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


@tg.register_layer
class MetaBuffer(nn.Module):
    """A layer whose buffer has no data: its weights cannot be written."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(4, device="meta"))

    def forward(self, x):
        return x * 1.0


def small_model():
    x = tg.Input(shape=(3, 8, 8), name="image")
    h = F.relu(nn.BatchNorm2d(4)(nn.Conv2d(3, 4, 3)(x)))
    y = nn.Linear(4, 2)(h.mean(dim=(2, 3))) + torch.tensor([0.5, -0.5])
    return tg.Model(x, {"logits": y, "features": h}, name="Small")


@pytest.fixture
def saved(tmp_path):
    model = small_model().eval()
    path = tmp_path / "small.safetensors"
    tg.save(model, path)
    return model, str(path)


def write_raw(path, header: dict, data: bytes = b"", pad: bool = True):
    blob = json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def read_raw(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_config(path, out, mutate):
    """Copy a saved file, editing its config."""
    header, data = read_raw(path)
    cfg = json.loads(header["__metadata__"]["config"])
    mutate(cfg)
    header["__metadata__"]["config"] = json.dumps(cfg)
    write_raw(out, header, data)
    return out


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

def test_save_load_round_trip(saved):
    """Same code, name, state_dict order and values, mode; identical outputs."""
    model, path = saved
    loaded = tg.load(path)
    assert type(loaded).__name__ == "Small" and loaded.code == model.code
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert not loaded.training
    x = torch.randn(2, 3, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(loaded(x).values(), model(x).values()))
    assert all(p.device.type == "cpu" and p.requires_grad for p in loaded.parameters())


def test_resnet_round_trip_identical_outputs(tmp_path):
    """A ResNet-18 (random BatchNorm statistics) reloads bit for bit."""
    model = tg.applications.resnet18(num_classes=10, input_shape=(3, 32, 32))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.eval()
    tg.save(model, tmp_path / "r18.safetensors")
    loaded = tg.load(tmp_path / "r18.safetensors")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_registered_layers_tied_weights_and_dtypes(tmp_path):
    """Registered layers load; tied weights are stored once and stay tied; fp64 and int inputs work."""
    ids = tg.Input(shape=(5,), dtype=torch.long, name="ids")
    h = nn.Embedding(20, 6).double()(ids)
    y = Tied(6).double()(h)
    model = tg.Model(ids, y)
    path = tmp_path / "tied.safetensors"
    tg.save(model, path)
    header, _ = read_raw(path)
    assert json.loads(header["__metadata__"]["aliases"]) == {"tied.b.weight": "tied.a.weight"}
    loaded = tg.load(path)
    assert loaded.tied.a.weight is loaded.tied.b.weight
    x = torch.randint(0, 20, (2, 5))
    assert torch.equal(loaded(x), model(x)) and loaded(x).dtype == torch.float64


def test_safetensors_package_reads_our_files_and_we_read_its_files(saved, tmp_path):
    """The file is a plain safetensors file, both ways."""
    st_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    model, path = saved
    tensors = st_torch.load_file(path)
    assert tensors.keys() == model.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())
    header, _ = read_raw(path)
    other = tmp_path / "from_safetensors.safetensors"
    st_torch.save_file(dict(model.state_dict()), str(other), metadata=header["__metadata__"])
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(tg.load(other)(x)["logits"], model(x)["logits"])


def _header_length(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _named(layer, width: int, name: str):
    x = tg.Input(shape=(width,))
    return tg.Model(x, torch.relu(layer(x)), name=name)


@pytest.mark.parametrize("width", [1, 784])
def test_every_header_length_round_trips(tmp_path, width):
    """A sweep over header lengths, including 640, 896, 1152 and 1408: their first bytes look like a
    pickle's (0x80 0x02..0x05), and a hand-written sniffer once refused those files (a model
    `Input(784) -> relu(Linear(784, 100))` named "Classifier" was one of them)."""
    layer = nn.Linear(784, 100) if width == 784 else (lambda x: x * 2)  # weights, or none at all
    x = torch.randn(2, width)
    expected = torch.relu(layer(x))
    path = tmp_path / "sweep.safetensors"
    seen = set()
    for extra in range(0, 560, 8):
        tg.save(_named(layer, width, "Classifier" + "x" * extra), path)
        seen.add(_header_length(path))
        assert torch.equal(tg.load(path)(x), expected)
    assert len(seen) == 70
    assert {640, 896} <= seen if width == 1 else {1152, 1408} <= seen


@settings(max_examples=25, deadline=None)
@given(name_length=st.integers(1, 70_000), width=st.integers(1, 40))
def test_header_lengths_round_trip_property(tmp_path_factory, name_length, width):
    """Any header length (up to and past 65536, where the length's second byte wraps) loads back."""
    path = tmp_path_factory.mktemp("headers") / "m.safetensors"
    layer = nn.Linear(width, 3)
    model = _named(layer, width, "N" + "a" * (name_length - 1))
    tg.save(model, path)
    assert _header_length(path) > name_length
    loaded = tg.load(path)
    x0 = torch.randn(2, width)
    assert type(loaded).__name__ == type(model).__name__ and torch.equal(loaded(x0), model(x0))


def test_read_file_info_reads_only_the_header(saved):
    """read_file_info gives the config and tensor shapes without loading weights."""
    model, path = saved
    info = saving.read_file_info(path)
    assert info.config == model.get_config()
    assert info.tensors["linear.weight"] == (torch.float32, (2, 4))
    assert info.metadata["format"] == "torchgraph"


# ---------------------------------------------------------------------------------------------
# Files that must be refused
# ---------------------------------------------------------------------------------------------

class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_payload_is_refused_and_never_run(tmp_path, monkeypatch):
    """A pickle (even one named .safetensors) is refused without unpickling it."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Payload(), protocol=4))
    with pytest.raises(ValueError, match="pickle"):
        tg.load(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_torch_save_file_is_refused(tmp_path):
    """A torch.save file (zip of pickles) gets an explanation."""
    path = tmp_path / "model.pt"
    torch.save(small_model().state_dict(), path)
    with pytest.raises(ValueError, match="torch.save"):
        tg.load(path)


@pytest.mark.parametrize("where", ["layer", "function", "method", "nested"])
def test_import_path_payloads_are_refused(saved, tmp_path, where):
    """Class or function names from the file are never imported."""
    _, path = saved

    def mutate(cfg):
        if where == "layer":
            cfg["layers"][0]["class"] = "os.system"
        elif where == "function":
            node = next(n for n in cfg["nodes"] if n["op"] == "call_function")
            node["target"] = "os.system"
        elif where == "method":
            node = next(n for n in cfg["nodes"] if n["op"] == "call_method")
            node["target"] = "__reduce__"
        else:
            cfg["layers"][0]["kwargs"]["kernel_size"] = {"layer": {"class": "subprocess.Popen",
                                                                    "args": [["touch", "x"]]}}

    bad = with_config(path, tmp_path / "bad.safetensors", mutate)
    with pytest.raises(ValueError, match="unknown layer class|disallowed function|not an allowed"):
        tg.load(bad)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("keep", [0, 5, 8, 20, "half_header", "header", "half_data", "all_but_one"])
def test_truncated_files(saved, tmp_path, keep):
    """A file cut anywhere is refused with a clear message."""
    _, path = saved
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    cut = {"half_header": 8 + n // 2, "header": 8 + n, "half_data": 8 + n + (len(raw) - 8 - n) // 2,
           "all_but_one": len(raw) - 1}.get(keep, keep)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(raw[:cut])
    with pytest.raises(ValueError, match="truncated|shorter|not a valid torchgraph file"):
        tg.load(bad)


def test_corrupt_headers(saved, tmp_path):
    """Garbage, bad JSON, bad offsets, bad dtypes, missing metadata, trailing bytes are refused."""
    _, path = saved
    header, data = read_raw(path)
    bad = tmp_path / "bad.safetensors"

    def expect(message, h=None, d=data, raw=None):
        if raw is not None:
            bad.write_bytes(raw)
        else:
            write_raw(bad, h, d)
        with pytest.raises(ValueError, match=message):
            tg.load(bad)

    expect("invalid UTF-8", raw=struct.pack("<Q", 8) + b"\xff\xfe{{{{{{" + data)
    expect("invalid JSON", raw=struct.pack("<Q", 8) + b"{\"a\":NaN")
    expect("invalid JSON", raw=struct.pack("<Q", 8) + b"[1,2,3] ")
    h = copy.deepcopy(header)
    h["linear.weight"]["data_offsets"][1] += 4
    expect("invalid shape, data type, or offset", h)
    h = copy.deepcopy(header)
    h["linear.weight"]["dtype"] = "F128"
    expect("unknown variant `F128`", h)
    h = copy.deepcopy(header)
    first = min(h[k]["data_offsets"][0] for k in h if k != "__metadata__")
    key = next(k for k in h if k != "__metadata__" and h[k]["data_offsets"][0] == first)
    h[key]["data_offsets"] = [x + 4 for x in h[key]["data_offsets"]]
    expect("invalid offset for tensor", h)
    h = copy.deepcopy(header)
    del h["__metadata__"]
    expect("does not say format=torchgraph", h)
    h = copy.deepcopy(header)
    h["__metadata__"]["format"] = "other"
    expect("format=torchgraph", h)
    h = copy.deepcopy(header)
    h["__metadata__"]["format_version"] = "2"
    expect("upgrade torchgraph", h)
    h = copy.deepcopy(header)
    h["__metadata__"]["format_version"] = "\u0661"  # an Arabic-Indic digit: str.isdigit() says yes
    expect("format_version '\u0661'", h)
    h = copy.deepcopy(header)
    h["__metadata__"]["config"] = "{oops"
    expect("config is not valid JSON", h)
    expect("not fully covered", header, data + b"\0" * 8)
    expect("invalid JSON", raw=struct.pack("<Q", 16) + b'{"a":1, "a":2}  ')
    h = copy.deepcopy(header)
    h["__metadata__"]["config"] = '{"a": 1, "a": 2}'
    expect("duplicate key", h)


def test_weights_that_do_not_match_the_config(saved, tmp_path):
    """A config that disagrees with the tensors (shape, missing key) is refused."""
    _, path = saved
    bad = with_config(path, tmp_path / "a.safetensors",
                      lambda c: c["layers"][0]["kwargs"].update(kernel_size={"tuple": [2, 2]}))
    with pytest.raises(ValueError, match="conv2d.weight.*in the file"):
        tg.load(bad)
    bad = with_config(path, tmp_path / "b.safetensors",
                      lambda c: c["layers"][0]["kwargs"].update(bias=False))
    with pytest.raises(ValueError, match="do not match its config"):
        tg.load(bad)


def test_config_asking_for_huge_layers_is_refused_before_allocating(saved, tmp_path):
    """Linear(10**6, 10**6) (4 TB) in a tiny file is refused on the meta device, instantly."""
    _, path = saved
    bad = with_config(path, tmp_path / "huge.safetensors",
                      lambda c: c["layers"][2]["kwargs"].update(in_features=10**6, out_features=10**6))
    with pytest.raises(ValueError):
        tg.load(bad)


def test_oversized_files(saved, tmp_path):
    """max_bytes caps the file size; a huge header length field is refused without reading."""
    _, path = saved
    size = os.path.getsize(path)
    with pytest.raises(ValueError, match="max_bytes"):
        tg.load(path, max_bytes=size - 1)
    assert tg.load(path, max_bytes=None) is not None
    bad = tmp_path / "big_header.safetensors"
    bad.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ValueError, match="header too large"):
        tg.load(bad)
    big_shape = tmp_path / "big_shape.safetensors"
    header, data = read_raw(path)
    header["linear.weight"]["shape"] = [2**40, 2**40]
    write_raw(big_shape, header, data)
    with pytest.raises(ValueError, match="overflow computing buffer size"):
        tg.load(big_shape)


def test_missing_paths(tmp_path):
    """Missing files and directories give clear errors."""
    with pytest.raises(FileNotFoundError, match="no such file"):
        tg.load(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError):
        tg.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tg.save(small_model(), tmp_path / "missing_dir" / "m.safetensors")
    with pytest.raises(IsADirectoryError):
        tg.save(small_model(), tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_fifo_is_refused_without_blocking(tmp_path):
    """A FIFO named like a model file is refused at once (opening it for reading would wait forever)."""
    import signal

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)

    def hung(signum, frame):
        raise AssertionError("tg.load blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        for read in (tg.load, saving.read_file_info):
            with pytest.raises(ValueError, match="not a regular file"):
                read(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_unregistered_class_at_load_time(tmp_path):
    """A file with a custom layer whose class is not registered says to register it."""
    x = tg.Input(shape=(4,))
    model = tg.Model(x, Tied(4)(x))
    path = tmp_path / "t.safetensors"
    tg.save(model, path)
    name = f"{__name__}.Tied"
    cls = layer_config._REGISTRY.pop(name)
    try:
        with pytest.raises(ValueError, match="unknown layer class.*register_layer"):
            tg.load(path)
    finally:
        layer_config._REGISTRY[name] = cls


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------

def _no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_save_leaves_the_old_file_intact(saved, tmp_path, monkeypatch, failure):
    """A save that fails (or is interrupted) after writing its data keeps the previous file as it was."""
    import safetensors.torch

    _, path = saved
    before = open(path, "rb").read()
    real_save_file = safetensors.torch.save_file
    written = []

    def failing_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        written.append(os.path.getsize(filename))
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    other = tg.applications.mlp(depth=2, width=8, num_classes=3)
    with pytest.raises(type(failure)):
        tg.save(other, path)
    assert written and written[0] > 0
    assert open(path, "rb").read() == before
    assert _no_temp_files(tmp_path)
    assert tg.load(path).code == saved[0].code


_KILLED_SAVER = """
import sys, time
import safetensors.torch
import torchgraph as tg

real_save_file = safetensors.torch.save_file

def save_then_hang(tensors, filename, metadata=None):
    real_save_file(tensors, filename, metadata=metadata)
    print("written", flush=True)
    time.sleep(600)

safetensors.torch.save_file = save_then_hang
tg.save(tg.applications.mlp(depth=2, width=64, num_classes=3), sys.argv[1])
"""


def test_temporary_file_of_a_killed_save_is_removed_by_the_next_save(saved, tmp_path):
    """kill -9 during a save leaves the old file intact; the next save to that path removes the orphan."""
    import signal
    import subprocess
    import sys

    model, path = saved
    before = open(path, "rb").read()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, path], stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    orphans = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(orphans) == 1 and orphans[0].name.startswith(".small.safetensors.tg-partial-")
    assert orphans[0].stat().st_size > 10_000  # the whole file was written, then the writer died
    assert open(path, "rb").read() == before  # the destination was never touched

    # A save to another path leaves the orphan alone; the next save to the same path removes it.
    tg.save(model, tmp_path / "other.safetensors")
    assert orphans[0].exists()
    tg.save(model, path)
    assert _no_temp_files(tmp_path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(tg.load(path)(x)["logits"], model(x)["logits"])


def test_a_save_in_progress_keeps_its_temporary_file(tmp_path):
    """The cleanup only takes files whose writer is gone: a live writer's lock protects its file."""
    fcntl = pytest.importorskip("fcntl")
    from torchgraph import atomic_files

    target = str(tmp_path / "m.safetensors")
    live = tmp_path / (atomic_files.temporary_prefix(target) + "live.tmp")
    stale = tmp_path / (atomic_files.temporary_prefix(target) + "stale.tmp")
    live.write_bytes(b"x" * 100)
    stale.write_bytes(b"y" * 100)
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # what a writer in another process holds
        removed = atomic_files.remove_stale_temporaries(target)
    assert removed == [stale.name] and live.exists() and not stale.exists()


def test_unwritable_weights_leave_the_old_file_intact(saved, tmp_path):
    """Weights that cannot be serialised (a meta buffer) fail the save; the old file survives."""
    _, path = saved
    before = open(path, "rb").read()
    x = tg.Input(shape=(4,))
    model = tg.Model(x, MetaBuffer()(nn.Linear(4, 4)(x)))
    with pytest.raises(ValueError, match="meta device"):
        tg.save(model, path)
    assert open(path, "rb").read() == before and _no_temp_files(tmp_path)


def test_save_replaces_and_keeps_normal_permissions(saved, tmp_path):
    """A second save replaces the file; new files get the usual mode (umask applied)."""
    _, path = saved
    other = tg.applications.mlp(depth=1, width=4)
    tg.save(other, path)
    assert type(tg.load(path)).__name__ == "MLP"
    umask = os.umask(0)
    os.umask(umask)
    new = tmp_path / "fresh.safetensors"
    tg.save(other, new)
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o666 & ~umask


def test_save_refuses_non_models():
    """Only tg.Model instances can be saved."""
    with pytest.raises(TypeError, match="tg.Model"):
        tg.save(nn.Linear(2, 2), "x.safetensors")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_cast_after_building_saves_and_loads(tmp_path, dtype):
    """Built in float32, then model.to(bf16/f16): the file loads (its inputs are stored in the cast dtype,
    NOTE: [Inputs of a cast model]) and the loaded model gives the same outputs."""
    x = tg.Input(shape=(3, 8, 8))
    h = nn.Conv2d(3, 4, 3)(x)
    model = tg.Model(x, nn.Linear(4, 2)(nn.LayerNorm(4)(h.mean(dim=(2, 3))))).to(dtype)
    tg.save(model, tmp_path / "m.safetensors")
    loaded = tg.load(tmp_path / "m.safetensors")
    data = torch.randn(2, 3, 8, 8, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded(data), model(data))
    assert next(n for n in loaded.graph.nodes if n.op == "placeholder").meta["tg_spec"].dtype == dtype
