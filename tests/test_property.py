"""Property: "a model that builds will run".

Hypothesis generates random layer graphs (Linear, Conv2d, norms, activations, cat, add, reshape,
several inputs), often with wrong sizes on purpose. Every graph must either raise GraphBuildError at
build time (and nothing else), or build, run at batch sizes 1, 2 and 7, and return exactly the shapes
predicted at build time.
"""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import torchgraph as tg
from torchgraph.symbolic import BATCH

MAX_EXAMPLES = int(os.environ.get("TORCHGRAPH_PROPERTY_EXAMPLES", "500"))
OUTCOMES = {"built": 0, "rejected": 0}


def _size(draw, actual: int) -> int:
    """Mostly the right size, sometimes a wrong one."""
    return draw(st.sampled_from([actual, actual, actual, max(1, actual - 1), actual + 3]))


def _apply_random_op(draw, pool: list):
    x = draw(st.sampled_from(pool))
    shape = x.static_shape
    rank = len(shape)
    kind = draw(st.sampled_from(["linear", "conv", "norm", "act", "add", "cat", "reshape", "pool"]))
    if kind == "linear":
        return nn.Linear(_size(draw, shape[-1]), draw(st.integers(1, 12)))(x)
    if kind == "conv":
        channels = shape[1] if rank == 4 else 3
        k = draw(st.integers(1, 3))
        return nn.Conv2d(_size(draw, channels), draw(st.integers(1, 6)), k, padding=draw(st.integers(0, 1)))(x)
    if kind == "norm":
        if rank == 4:
            return nn.BatchNorm2d(_size(draw, shape[1]))(x)
        if draw(st.booleans()) and rank == 2:
            return nn.BatchNorm1d(_size(draw, shape[1]))(x)
        return nn.LayerNorm(_size(draw, shape[-1]))(x)
    if kind == "act":
        fn = draw(st.sampled_from([F.relu, torch.tanh, F.gelu, nn.SiLU(), nn.Sigmoid(), nn.Dropout(0.1)]))
        return fn(x)
    if kind == "add":
        return x + draw(st.sampled_from(pool))
    if kind == "cat":
        return torch.cat([x, draw(st.sampled_from(pool))], dim=draw(st.sampled_from([1, -1])))
    if kind == "reshape":
        how = draw(st.sampled_from(["flatten", "view", "view_k"]))
        if how == "flatten":
            return x.flatten(1)
        if how == "view":
            return x.view(x.size(0), -1)
        return x.reshape(-1, draw(st.sampled_from([1, 2, 3, 4, 8])))
    # pool
    if rank == 4:
        return nn.MaxPool2d(2)(x) if draw(st.booleans()) else x.mean(dim=(2, 3))
    return x.mean(dim=-1, keepdim=True)


def _make_inputs(draw):
    inputs = []
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            inputs.append(tg.Input(shape=(draw(st.integers(1, 8)),)))
        else:
            inputs.append(tg.Input(shape=(draw(st.integers(1, 4)), draw(st.integers(3, 9)), draw(st.integers(3, 9)))))
    return inputs


def _check_runs_as_predicted(model, inputs, outputs):
    model.eval()
    for b in (1, 2, 7):
        real = [torch.randn(b, *t.static_shape[1:]) for t in inputs]
        with torch.no_grad():
            results = model(*real)
        results = results if isinstance(results, list) else [results]
        for sym, res in zip(outputs, results):
            dims = sym._tg_value.dims
            assert res.dim() == len(dims), (sym.static_shape, tuple(res.shape))
            for d, r in zip(dims, res.shape):
                if isinstance(d, int):
                    assert d == r, (sym.static_shape, tuple(res.shape), b)
                elif d is BATCH:
                    assert r == b, (sym.static_shape, tuple(res.shape), b)


@pytest.mark.filterwarnings("ignore:tg.Model. input")
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_graphs_build_and_run_as_predicted_or_fail_at_build(data):
    """Random graphs: GraphBuildError at build, or a model that runs with the predicted shapes."""
    draw = data.draw
    inputs = _make_inputs(draw)
    pool = list(inputs)
    try:
        for _ in range(draw(st.integers(1, 6))):
            pool.append(_apply_random_op(draw, pool))
        outputs = pool[len(inputs):][-draw(st.integers(1, 2)):] or [pool[-1]]
        model = tg.Model(inputs, list(outputs))
    except tg.GraphBuildError:
        OUTCOMES["rejected"] += 1
        return  # an invalid graph, rejected at build time as it should be
    _check_runs_as_predicted(model, inputs, outputs)
    OUTCOMES["built"] += 1


def test_the_generator_exercises_both_outcomes():
    """The random graphs above include both valid and invalid ones (else the property is vacuous)."""
    if not OUTCOMES["built"] + OUTCOMES["rejected"]:
        test_random_graphs_build_and_run_as_predicted_or_fail_at_build()
    assert OUTCOMES["built"] >= 20 and OUTCOMES["rejected"] >= 20, OUTCOMES


# ------------------------------------------------------------------ random programs vs eager (issue 11)
#
# Each example is a small program, run twice with the same module objects: once on tg.Input symbolic
# tensors (and built into a model), once eagerly. The program mixes module-internal shape reads,
# in-place ops on inputs and intermediates, dynamic-size arithmetic at the top level (arange, narrow,
# slices, factories with device=/dtype=, guards), real tensors sliced by dynamic sizes (inside modules:
# recorded; at the top level: a GraphBuildError), several inputs sharing named dims, and containers.
# Property: the build raises GraphBuildError, or the model equals eager -- outputs and mutated inputs --
# at several sizes of every dynamic dim.

PROGRAM_EXAMPLES = int(os.environ.get("TORCHGRAPH_PROGRAM_EXAMPLES", "300"))
PROGRAM_OUTCOMES = {"built": 0, "rejected": 0}
BUILT_OPS: set = set()  # which kinds of steps occurred in programs that built (and matched eager)
FEATURES = (4, 6)


class ScaleBySize(nn.Module):
    """Reads a size before any tensor op and makes a tensor from it (the issue's silent bug)."""

    def forward(self, x):
        return x * torch.full((1,), 1.0 / x.size(1))


class AddPositions(nn.Module):
    """torch.arange over the sequence inside forward, added on the features."""

    def forward(self, x):
        pos = torch.arange(x.size(1), device=x.device, dtype=x.dtype)
        return x + pos[None, :, None] * 0.1


class TableSlice(nn.Module):
    """A learned table of 128 positions sliced by the sequence length (GPT-2/BERT style)."""

    def __init__(self, features):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 128, features))

    def forward(self, x):
        return x + self.table[:, : x.size(1)]


class MutateInput(nn.Module):
    """Mutates its input in place, then computes from it."""

    def forward(self, x):
        x.mul_(0.5)
        return x + 1


class Residual(nn.Module):
    """A subclassed block with an inner Sequential and a shape read."""

    def __init__(self, features):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True), nn.Linear(features, features))

    def forward(self, x):
        b, t, c = x.shape
        return x + self.body(x).view(b, t, c)


def _draw_input(draw, i: int):
    kind = draw(st.sampled_from(["T", "T", "S", "bounded", "none", "static"]))
    seq = {"T": "T", "S": "S", "bounded": tg.Dim("B", max=40), "none": None, "static": 5}[kind]
    features = draw(st.sampled_from(FEATURES))
    return {"shape": (seq, features), "label": kind if kind != "none" else f"none{i}", "features": features}


def _draw_step(draw, pool: list, modules: list) -> tuple:
    """One step: (op, arguments...). ``pool`` holds (label, features) of the values so far."""
    i = draw(st.integers(0, len(pool) - 1))
    label, features = pool[i]
    op = draw(st.sampled_from([
        "unary", "linear", "add", "add", "inplace", "inplace", "module", "module", "arange", "narrow",
        "slice", "factory", "guard", "real_slice_top", "container"]))
    if op == "linear":
        out = draw(st.sampled_from(FEATURES))
        modules.append(nn.Linear(features if draw(st.integers(0, 9)) else features + 1, out))
        return ("linear", i, len(modules) - 1), (label, out)
    if op == "add":
        j = draw(st.integers(0, len(pool) - 1))
        return ("add", i, j), (label, features)
    if op == "inplace":
        kind = draw(st.sampled_from(["add_", "iadd", "relu_", "mul_", "setitem"]))
        j = draw(st.integers(0, len(pool) - 1))
        return ("inplace", i, kind, j), (label, features)
    if op == "module":
        kind = draw(st.sampled_from(["scale", "positions", "table", "mutate", "relu_inplace"]))
        modules.append({"scale": ScaleBySize, "positions": AddPositions, "mutate": MutateInput,
                        "relu_inplace": lambda: nn.ReLU(inplace=True),
                        "table": lambda: TableSlice(features)}[kind]())
        return ("module", i, len(modules) - 1), (label, features)
    if op == "container":
        if draw(st.booleans()):
            modules.append(Residual(features))
        else:
            modules.append(nn.Sequential(nn.Linear(features, features), nn.GELU(), AddPositions()))
        return ("module", i, len(modules) - 1), (label, features)
    if op == "narrow":
        return ("narrow", i), (f"{label}-1", features)
    if op == "slice":
        return ("slice", i), (f"{label}//2", features)
    return (op, i), (label, features)


def _run_program(steps, inputs, modules, table):
    """Run ``steps`` on ``inputs`` (symbolic or real): the same code for both."""
    pool = list(inputs)
    for step in steps:
        op, i = step[0], step[1]
        x = pool[i]
        if op == "unary":
            y = torch.tanh(x) * 2
        elif op == "linear":
            y = modules[step[2]](x)
        elif op == "add":
            y = x + pool[step[2]]
        elif op == "inplace":
            kind, other = step[2], pool[step[3]]
            if kind == "add_":
                x.add_(other)
            elif kind == "iadd":
                x += other
            elif kind == "relu_":
                x.relu_()
            elif kind == "mul_":
                x.mul_(-1.5)
            else:
                x[:, :, 0] = 1.0
            y = x
        elif op == "module":
            y = modules[step[2]](x)
        elif op == "arange":
            t = x.size(1)
            y = x + torch.arange(0, t, device=x.device).to(x.dtype)[None, :, None]
        elif op == "narrow":
            y = x.narrow(1, 0, x.size(1) - 1)
        elif op == "slice":
            y = x[:, : x.size(1) // 2]
        elif op == "factory":
            b, t, c = x.shape
            y = torch.cat([torch.zeros(b, 1, c, dtype=x.dtype, device=x.device), x], dim=1)[:, 1:]
        elif op == "guard":
            y = x * 2 if x.size(1) < 1000 else x * 3
        elif op == "real_slice_top":
            y = x + table[:, : x.size(1), : x.size(2)]
        else:
            raise AssertionError(op)
        pool.append(y)
    return pool


def _sinks(steps, n_inputs: int, n_last: int) -> list[int]:
    """The values no later step reads, and the last ``n_last``: every step is live (a model drops dead
    code, so a dead step that fails eagerly would not fail in the model)."""
    read = {i for step in steps for i in (step[1], *[a for a in step[3:4] if isinstance(a, int)])}
    read.update(step[2] for step in steps if step[0] == "add")
    total = n_inputs + len(steps)
    last = list(range(max(n_inputs, total - n_last), total))
    return sorted(set(last) | {i for i in range(n_inputs, total) if i not in read})


def _sizes_for(labels: set, draw) -> list[dict]:
    """Three assignments of sizes to the dynamic dims (and the batch)."""
    out = []
    for _ in range(3):
        sizes = {"batch": draw(st.sampled_from([1, 2, 3]))}
        for label in labels:
            sizes[label] = draw(st.sampled_from([1, 2, 5, 9] if label != "bounded" else [1, 7, 40]))
        out.append(sizes)
    return out


@pytest.mark.filterwarnings("ignore:tg.Model. input")
@settings(max_examples=PROGRAM_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_programs_match_eager_or_fail_at_build(data):
    """Random programs: a GraphBuildError at build, or a model equal to eager at several sizes."""
    draw = data.draw
    torch.manual_seed(0)
    specs = [_draw_input(draw, i) for i in range(draw(st.integers(1, 3)))]
    modules: list = []
    pool = [(s["label"], s["features"]) for s in specs]
    steps = []
    for _ in range(draw(st.integers(1, 7))):
        step, shape = _draw_step(draw, pool, modules)
        steps.append(step)
        pool.append(shape)
    n_out = draw(st.integers(1, 2))
    sinks = _sinks(steps, len(specs), n_out)
    note(f"inputs {[s['shape'] for s in specs]}, steps {steps}, outputs {sinks}")
    table = torch.randn(1, 128, 6)
    symbolic_inputs = [tg.Input(shape=s["shape"], name=f"in{i}") for i, s in enumerate(specs)]
    try:
        values = _run_program(steps, symbolic_inputs, modules, table)
        outputs = [v.mean(dim=1) if k == 0 else v for k, v in enumerate(values[i] for i in sinks)]
        model = tg.Model(symbolic_inputs, outputs)
    except tg.GraphBuildError:
        PROGRAM_OUTCOMES["rejected"] += 1
        return
    PROGRAM_OUTCOMES["built"] += 1
    BUILT_OPS.update(step[0] if step[0] not in ("inplace", "module") else f"{step[0]}:{_kind(step, modules)}"
                     for step in steps)
    labels = {s["label"] for s in specs if s["label"] != "static"}
    for sizes in _sizes_for(labels, draw):
        note(f"sizes {sizes}")
        real = [torch.randn(sizes["batch"], sizes.get(s["label"], 5), s["features"]) for s in specs]
        eager_inputs = [t.clone() for t in real]
        model_inputs = [t.clone() for t in real]
        try:
            eager_values = _run_program(steps, eager_inputs, modules, table)
            expected = [v.mean(dim=1) if k == 0 else v for k, v in enumerate(eager_values[i] for i in sinks)]
        except Exception as exc:  # noqa: BLE001 - the program fails eagerly at these sizes: so must the model
            with pytest.raises(type(exc)):
                model(*model_inputs)
            continue
        got = model(*model_inputs)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, equal_nan=True)
        for m, e in zip(model_inputs, eager_inputs):  # in-place ops on inputs: the same mutation
            torch.testing.assert_close(m, e, equal_nan=True)


def _kind(step, modules) -> str:
    if step[0] == "inplace":
        return step[2]
    return type(modules[step[2]]).__name__


def test_the_program_generator_exercises_both_outcomes():
    """The random programs include valid and invalid ones, and every kind of step builds somewhere."""
    if not PROGRAM_OUTCOMES["built"] + PROGRAM_OUTCOMES["rejected"]:
        test_random_programs_match_eager_or_fail_at_build()
    total = PROGRAM_OUTCOMES["built"] + PROGRAM_OUTCOMES["rejected"]
    assert PROGRAM_OUTCOMES["built"] >= 0.3 * total and PROGRAM_OUTCOMES["rejected"] >= 0.1 * total, PROGRAM_OUTCOMES
    if total >= 200:
        expected = {"unary", "linear", "add", "arange", "narrow", "slice", "factory", "guard", "inplace:add_",
                    "inplace:iadd", "inplace:relu_", "inplace:mul_", "inplace:setitem", "module:ScaleBySize",
                    "module:AddPositions", "module:TableSlice", "module:MutateInput", "module:ReLU",
                    "module:Residual", "module:Sequential"}
        assert expected <= BUILT_OPS, expected - BUILT_OPS
