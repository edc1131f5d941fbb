"""A hostile file costs nothing: fuzzed files and configs raise only the documented errors, within a
time and memory budget.

Byte mutations (splices, bit flips, cuts, rewritten length fields) and structure mutations (edits of
the config inside a valid safetensors file, including values chosen to hurt: huge sizes, device
arguments, deep nesting, unhashable tags, non-ASCII digits) are loaded with tg.load; configs also go
through tg.Model.from_config. The only exceptions allowed are ValueError (corrupt, crafted or
oversized files; GraphBuildError and BuildLimitError are ValueErrors) and, for configs, nothing
else. Peak memory is measured with the kernel's high-water mark (reset before each example) where
Linux offers it, else tracemalloc.
"""

import copy
import json
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchgraph as tg

from budget import MEMORY_BUDGET, assert_documented, within_budget


# ---------------------------------------------------------------------------------------------
# Valid files to mutate
# ---------------------------------------------------------------------------------------------

def _models():
    """Small models with many kinds of config content: layers with arguments, an RNN, constants, a
    nested model, method calls on a parameter, dict outputs."""
    x = tg.Input(shape=(3, 8, 8), name="image")
    h = F.relu(nn.BatchNorm2d(4)(nn.Conv2d(3, 4, 3)(x))).mean(dim=(2, 3))
    inner_x = tg.Input(shape=(4,))
    inner = tg.Model(inner_x, nn.Linear(4, 4)(inner_x), name="Inner")
    scale = nn.Parameter(torch.ones(1, 4))
    cnn = tg.Model(x, {"logits": nn.Linear(4, 2)(inner(h)) * torch.tensor([1.0, 2.0]),
                       "features": scale.mul(h)}, name="Net")
    seq = tg.Input(shape=(5, 6), name="seq")
    out, _ = nn.GRU(6, 4, batch_first=True)(seq)
    rnn = tg.Model(seq, [nn.Linear(4, 2)(F.gelu(out)[:, -1]), out.transpose(1, 2)], name="Rnn")
    return [cnn.eval(), rnn]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    paths = []
    for i, model in enumerate(_models()):
        path = folder / f"base{i}.safetensors"
        tg.save(model, path)
        paths.append(path)
    tg.load(paths[0])  # warm up: lazy imports and tables must not count against an example
    return folder, [p.read_bytes() for p in paths]


def _split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


# ---------------------------------------------------------------------------------------------
# Byte mutations
# ---------------------------------------------------------------------------------------------

_byte_edit = st.one_of(
    st.tuples(st.just("splice"), st.integers(0, 5000), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("flip"), st.integers(0, 5000), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 5000), st.just(b"")),
    st.tuples(st.just("length"), st.sampled_from([0, 1, 7, 8, 640, 896, 2**32, 2**63, 100_000_001]),
              st.just(b"")),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 1), edits=st.lists(_byte_edit, min_size=1, max_size=3))
def test_byte_mutations_raise_only_documented_errors(files, which, edits):
    """Spliced, flipped, cut files and rewritten length fields: ValueError or a model, within budget."""
    folder, raws = files
    raw = bytearray(raws[which])
    for kind, at, arg in edits:
        at = at % max(len(raw), 1)
        if kind == "splice":
            raw[at:at + len(arg)] = arg
        elif kind == "flip" and raw:
            raw[at] ^= 1 << arg
        elif kind == "cut":
            del raw[at:]
        elif kind == "length":
            raw[:8] = struct.pack("<Q", at)
    path = folder / "bytes.safetensors"
    path.write_bytes(bytes(raw))
    assert_documented(*within_budget(lambda: tg.load(path)))


# ---------------------------------------------------------------------------------------------
# Structure mutations
# ---------------------------------------------------------------------------------------------

_HOSTILE_SCALARS = st.sampled_from([
    2**31, 2**48, 2**62, 2**63 - 1, -1, -(2**40), 0, 1e308, "\u0661", "\u00b2", "", "x" * 200, "os.system",
    "torch.load", "torch.svd_lowrank", "cpu", "cuda", "meta", "self", "__class__", "forward", "training",
])
_HOSTILE_OBJECTS = st.sampled_from([
    {"device": "cpu"}, {"device": "cuda"}, {"device": {}}, {"memory_format": {}}, {"memory_format": []},
    {"dtype": {}}, {"layout": []}, {"float": {}}, {"float": "nan"}, {"function": "torch.empty"},
    {"function": "torch.load"}, {"function": "builtins.eval"}, {"tuple": {}}, {"items": [[[1], 2]]},
    {"items": [[{"dict": {}}, 1]]}, {"object": {"type": "os.system", "config": {}}},
    {"layer": {"class": "torch.nn.LSTM", "kwargs": {"input_size": 4, "hidden_size": 4, "num_layers": 2**48}}},
    {"layer": {"class": "torch.nn.Linear", "kwargs": {"in_features": 10**6, "out_features": 10**6,
                                                       "device": {"device": "cpu"}}}},
    {"layer": {"class": "torchgraph.Model", "config": {"format": "torchgraph.Model"}}},
    {"slice": [1, 2]}, {"node": {}}, {"node": "nowhere"}, {"ellipsis": 1},
])

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12) | _HOSTILE_SCALARS | _HOSTILE_OBJECTS
    | st.sampled_from(["node", "tuple", "torch.cat", "relu", "conv2d", "torch.nn.functional.relu"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["node", "tuple", "dict", "items", "slice", "dtype", "function", "layer", "object",
                         "class", "args", "kwargs", "name", "op", "target", "config", "device", "x"]),
        inner, max_size=3),
    max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if len(prefix) > 40:  # an earlier "deep" edit: do not walk all of it
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _deep(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


def mutate(data, config):
    """Up to three random edits of ``config`` (in place)."""
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(config) if p]
        path = data.draw(st.sampled_from(paths))
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "swap", "deep", "repeat"]))
        if action == "delete":
            parent.pop(path[-1])
        elif action == "swap" and isinstance(parent, list) and len(parent) > 1:
            parent.reverse()
        elif action == "deep":
            parent[path[-1]] = _deep(data.draw(st.sampled_from([50, 200, 900])))
        elif action == "repeat" and isinstance(parent, list):
            parent.extend([copy.deepcopy(parent[path[-1]])] * data.draw(st.sampled_from([2, 100, 3000])))
        else:
            parent[path[-1]] = data.draw(_json)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 1), data=st.data(), edit_header=st.integers(0, 4).map(lambda k: k == 0))
def test_structure_mutations_raise_only_documented_errors(files, which, data, edit_header):
    """Edited configs inside valid files (and edited headers): ValueError or a model, within budget;
    the same configs given to from_config: ValueError or a model."""
    folder, raws = files
    header, tensors = _split(raws[which])
    config = json.loads(header["__metadata__"]["config"])
    mutate(data, config)
    if edit_header:
        meta = header["__metadata__"]
        key = data.draw(st.sampled_from(["format_version", "aliases", "format"]))
        meta[key] = data.draw(st.sampled_from(["\u0661", "\u00b2", "01", "-1", "{}", '{"a": "b"}', "[]",
                                               '{"x.weight": "linear.weight"}', "torchgraph", "9" * 40]))
    header["__metadata__"]["config"] = json.dumps(config)
    path = folder / "structure.safetensors"
    path.write_bytes(_join(header, tensors))
    assert_documented(*within_budget(lambda: tg.load(path)))
    assert_documented(*within_budget(lambda: tg.Model.from_config(copy.deepcopy(config), max_bytes=2**26)))


def test_loaded_models_from_fuzzing_still_run(files, tmp_path):
    """The unmutated files load and run (the fuzz's baseline is a working model, not an error)."""
    _, raws = files
    for i, raw in enumerate(raws):
        path = tmp_path / f"ok{i}.safetensors"
        path.write_bytes(raw)
        error, _, extra = within_budget(lambda: tg.load(path))
        assert error is None and extra < MEMORY_BUDGET
