"""A hostile file costs nothing: each attack found against tg.load / from_config, as a regression test.

Each crafted file is a few KB; loading it must raise the documented error (a ValueError naming the
file) within the time and memory budget of tests/budget.py, never allocate gigabytes, never block.
"""

import copy
import json
import re
import struct

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from budget import MEMORY_BUDGET, assert_documented, within_budget
from torchgraph import untrusted
from torchgraph.config_functions import MAX_OPERANDS, MAX_REPEATS


def _base():
    x = tg.Input(shape=(4,), name="x")
    return tg.Model(x, nn.Linear(4, 2)(x), name="Base")


@pytest.fixture
def craft(tmp_path):
    """craft(edit) -> the path of a copy of a small saved model whose config ``edit`` changed."""
    path = tmp_path / "base.safetensors"
    tg.save(_base(), path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]

    def make(edit, metadata=None):
        h = copy.deepcopy(header)
        config = json.loads(h["__metadata__"]["config"])
        edit(config)
        h["__metadata__"]["config"] = json.dumps(config)
        h["__metadata__"].update(metadata or {})
        blob = json.dumps(h).encode()
        blob += b" " * (-len(blob) % 8)
        out = tmp_path / "crafted.safetensors"
        out.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
        return out

    return make


def load_fails(path, match):
    error, seconds, extra = within_budget(lambda: tg.load(path))
    assert_documented(error, seconds, extra)
    assert error is not None and str(path) in str(error), error
    assert re.search(match, str(error)), str(error)
    return error


def _layer(config, entry):
    config["layers"].append(entry)


def test_device_argument_on_an_unused_layer_cannot_allocate(craft):
    """`device="cpu"` on a layer used to escape the meta build (a 40 GB Linear from a 2 KB file)."""
    path = craft(lambda c: _layer(c, {"name": "big", "class": "torch.nn.Linear", "kwargs": {
        "in_features": 100_000, "out_features": 100_000, "device": {"device": "cpu"}}}))
    error = load_fails(path, "would allocate more than")
    assert isinstance(error, untrusted.BuildLimitError)


def test_device_argument_of_a_factory_node_cannot_allocate(craft, tmp_path):
    """`torch.full(..., device="cpu")` used to allocate its probe for real (2 GB here)."""
    x = tg.Input(shape=(4,), name="x")
    model = tg.Model(x, x.sum() + torch.full((x.shape[0], 16), 1.0, device="cpu"))
    tg.save(model, tmp_path / "full.safetensors")
    config = model.get_config()
    node = next(n for n in config["nodes"] if n["target"] == "torch.full")
    node["args"][0]["tuple"][1] = 2**28
    load_fails(craft(lambda c: (c.clear(), c.update(config))), "would allocate more than")
    with pytest.raises(untrusted.BuildLimitError):
        tg.Model.from_config(config, max_bytes=2**26)


def test_no_real_data_probes_while_loading(craft):
    """An op without a meta kernel used to be probed with real data inside tg.load; now it is refused."""
    def edit(c):
        c["nodes"].insert(0, {"op": "call_function", "name": "nz", "target": "torch.nonzero",
                              "args": [{"node": "x"}], "kwargs": {}})
    load_fails(craft(edit), "real-data fallback is off")


@pytest.mark.parametrize("layer", [
    {"class": "torch.nn.LSTM", "kwargs": {"input_size": 4, "hidden_size": 4, "num_layers": 2**48}},
    {"class": "torch.nn.LSTM", "args": [4, 4, 2**48]},
    {"class": "torch.nn.TransformerEncoder", "kwargs": {"num_layers": 2**48, "encoder_layer": {"layer": {
        "class": "torch.nn.TransformerEncoderLayer", "kwargs": {"d_model": 4, "nhead": 1}}}}},
])
def test_count_arguments_are_bounded_before_anything_runs(craft, layer):
    """num_layers=2**48 on an unused layer used to run (forever) before any check."""
    load_fails(craft(lambda c: _layer(c, {"name": "deep", **layer})),
               rf"more than a config may ask for \({MAX_REPEATS}\)")


def test_iteration_arguments_are_bounded(craft):
    """torch.svd_lowrank(niter=2**48) never finished."""
    def edit(c):
        c["nodes"].insert(0, {"op": "call_function", "name": "svd", "target": "torch.svd_lowrank",
                              "args": [{"node": "x"}], "kwargs": {"q": 2, "niter": 2**48}})
    load_fails(craft(edit), "niter=281474976710656")


def test_operand_counts_of_superlinear_functions_are_bounded(craft):
    """torch.linalg.multi_dot over thousands of values was cubic."""
    def edit(c):
        c["nodes"].insert(0, {"op": "call_function", "name": "md", "target": "torch.linalg.multi_dot",
                              "args": [[{"node": "x"}] * 5000], "kwargs": {}})
    load_fails(craft(edit), f"at most {MAX_OPERANDS}")


def test_registered_class_configs_build_on_meta_too(craft):
    """Any "class" key used to force a real build; now every config is built on the meta device."""
    @tg.register_layer
    class Wide(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(width, width))

        def forward(self, x):
            return x * 2

    key = f"{Wide.__module__}.{Wide.__qualname__}"

    def edit(c):
        _layer(c, {"name": "wide", "class": key, "kwargs": {"width": 100_000}})
        c["nodes"].append({"op": "call_module", "name": "wide", "target": "wide", "args": [{"node": "x"}],
                           "kwargs": {}})
        c["outputs"] = [c["outputs"], {"node": "wide"}]

    load_fails(craft(edit), "do not match its config")  # shapes checked on meta: 40 GB never allocated


@pytest.mark.parametrize("case, match", [
    ("models nested 400 deep", "nested too deeply|nested more than 16 deep"),
    ("value nested 2000 deep", "nested too deeply|nested more than 48 levels"),
    ("unhashable memory_format", "memory_format"),
    ("storage size overflow", r"more than 2\*\*48 elements"),
    ("constant overflow", "larger than this version builds"),
    ("too many nodes", "more than 10000 nodes"),
])
def test_raw_exceptions_become_the_documented_error(craft, case, match):
    """RecursionError, TypeError (unhashable), storage-size RuntimeErrors used to escape raw."""
    def edit(c):
        if case == "models nested 400 deep":
            inner = copy.deepcopy(c)
            for _ in range(400):
                inner = {**copy.deepcopy(c), "layers": [{"name": "m", "class": "torchgraph.Model", "config": inner}],
                         "nodes": [{"op": "call_module", "name": "m", "target": "m", "args": [{"node": "x"}],
                                    "kwargs": {}}], "outputs": {"node": "m"}}
            c.update(inner)
        elif case == "value nested 2000 deep":
            value = 4
            for _ in range(2000):
                value = [value]
            c["layers"][0]["kwargs"]["in_features"] = value
        elif case == "unhashable memory_format":
            c["nodes"][0]["kwargs"]["memory_format"] = {"memory_format": {}}
        elif case == "storage size overflow":
            c["inputs"][0]["shape"] = [2**31 - 1] * 3
        elif case == "constant overflow":
            c["constants"].append({"name": "k", "shape": [2**31 - 1] * 3, "dtype": "float32"})
        else:
            c["nodes"] = [{"op": "call_method", "name": f"n{i}", "target": "relu",
                           "args": [{"node": "x" if i == 0 else f"n{i - 1}"}], "kwargs": {}} for i in range(10_001)]

    import sys
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # json.dumps of the crafted configs themselves
    try:
        path = craft(edit)
    finally:
        sys.setrecursionlimit(limit)
    load_fails(path, match)


def test_non_ascii_digits_in_format_version(craft):
    """int() of a non-ASCII digit used to raise without the file's name."""
    load_fails(craft(lambda c: None, {"format_version": "\u0661"}), "format_version")


def test_uninitialised_memory_functions_load_as_zero_filled(craft):
    """A crafted torch.empty_like node loads as torch.zeros_like: no freed memory in a loaded model."""
    def edit(c):
        c["nodes"].insert(0, {"op": "call_function", "name": "e", "target": "torch.empty_like",
                              "args": [{"node": "x"}], "kwargs": {}})
        c["nodes"].append({"op": "call_function", "name": "out", "target": "operator.add",
                           "args": [{"node": "x"}, {"node": "e"}], "kwargs": {}})
        c["outputs"] = [c["outputs"], {"node": "out"}]
    c = _base().get_config()
    edit(c)
    model = tg.Model.from_config(c)
    x = torch.randn(3, 4)
    assert "zeros_like" in model.code and "empty" not in model.code and torch.equal(model(x)[1], x)


def test_loading_cost_grows_linearly_with_the_number_of_nodes():
    """Counted in tensor operations (deterministic): 4x the nodes cost 4x the operations, not 16x."""
    x = tg.Input(shape=(4,), name="x")
    base = tg.Model(x, x.relu()).get_config()

    def ops(n):
        config = dict(base, nodes=[{"op": "call_method", "name": f"n{i}", "target": "relu",
                                    "args": [{"node": "x" if i == 0 else f"n{i - 1}"}], "kwargs": {}}
                                   for i in range(n)], outputs={"node": f"n{n - 1}"})
        with untrusted.build_guard(2**30, 10**9) as guard:
            tg.Model.from_config(config)
        return guard.ops

    small, large = ops(100), ops(400)
    assert 3.5 < large / small < 4.5, (small, large)


def test_a_real_model_file_loads_within_the_budget(tmp_path):
    """The budgets leave room for real models: a ResNet-18 file loads, costing about its own size."""
    model = tg.applications.resnet18(num_classes=10, input_shape=(3, 32, 32)).eval()
    path = tmp_path / "r18.safetensors"
    tg.save(model, path)
    error, _, extra = within_budget(lambda: tg.load(path))
    size = path.stat().st_size
    assert error is None and extra < 2 * size + MEMORY_BUDGET, (extra, size)


def test_configs_sharing_one_list_many_times_are_refused_before_anything_runs():
    """A dict built in memory can share one 3,000-argument list among 3,000 nodes (or contain itself):
    a few KB standing for 9M values. Found by the fuzzer (it took 21 s and 414 MB); now refused at once."""
    config = _base().get_config()
    node = dict(config["nodes"][0], args=[{"node": "x"}] * 3000)
    shared = dict(config, nodes=[node] * 3000)
    error, seconds, extra = within_budget(lambda: tg.Model.from_config(shared))
    assert_documented(error, seconds, extra)
    assert error is not None and "more than 1000000 values" in str(error), error
    looped = _base().get_config()
    looped["nodes"][0]["kwargs"] = {"x": looped["nodes"]}  # contains itself
    error, seconds, extra = within_budget(lambda: tg.Model.from_config(looped))
    assert_documented(error, seconds, extra)
    assert error is not None and "more than 1000000 values" in str(error), error


def test_the_value_limit_leaves_room_for_big_real_configs():
    """A model of MAX_NODES nodes written like a ResNet-50 (~27 values a node) fits the value limit."""
    from torchgraph.config import MAX_NODES
    from torchgraph.config_entries import MAX_CONFIG_VALUES, check_config_size

    config = tg.applications.resnet50(num_classes=10, input_shape=(3, 64, 64)).get_config()
    check_config_size(config)
    text = json.dumps(config)
    values = text.count(",") + text.count(":")  # at least one separator per value
    assert values / len(config["nodes"]) * MAX_NODES < MAX_CONFIG_VALUES / 2, values
