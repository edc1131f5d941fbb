"""Property: "tg.optimize never changes what in-place ops and views compute".

Hypothesis writes small random programs over image-shaped values (N, 4, 4, 4): layers (Conv2d,
Linear and LayerNorm on the last dim, BatchNorm2d, activation modules in place or not, F.relu,
F.gelu), residual adds spelled ``+``, ``+=`` and ``.add_``, views (``view``, ``reshape``,
``flatten``, ``transpose``, slicing, ``narrow``, ``chunk``), in-place ops on those views and on
the values themselves (``relu_``, ``mul_``, ``add_``, ``sigmoid_``, ``masked_fill_``,
``x[...] = v``), views read after their base changed, the model input changed in place, and nested
blocks (so the inlining pass runs). Each program runs in eager PyTorch, as ``tg.Model`` and
``tg.from_module`` records, and through ``tg.optimize`` (inference with and without channels_last,
and ``inference=False``); outputs AND the caller's input after the call must equal eager's.

A failing example prints the program as Python (``note``), and shrinks towards fewer, simpler steps.
``TORCHGRAPH_INPLACE_FUZZ_EXAMPLES`` sets the number of examples (NOTE: [Deterministic property
tests] in conftest.py: ``TORCHGRAPH_HYPOTHESIS=explore`` draws new ones).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import torchgraph as tg

MAX_EXAMPLES = int(os.environ.get("TORCHGRAPH_INPLACE_FUZZ_EXAMPLES", "80"))
SHAPE = (4, 4, 4)  # C, H, W: Linear(4, 4) and LayerNorm(4) on the last dim keep every value this shape

# view name -> (Python spelling on `v`, function); every view keeps the batch dim first
VIEWS = {
    "whole": ("{v}", lambda v: v),
    "view": ("{v}.view({v}.shape[0], -1)", lambda v: v.view(v.shape[0], -1)),
    "reshape": ("{v}.reshape({v}.shape[0], 4, 16)", lambda v: v.reshape(v.shape[0], 4, 16)),
    "flatten": ("{v}.flatten(2)", lambda v: v.flatten(2)),
    "transpose": ("{v}.transpose(1, 2)", lambda v: v.transpose(1, 2)),
    "channels": ("{v}[:, :2]", lambda v: v[:, :2]),
    "columns": ("{v}[..., 1:3]", lambda v: v[..., 1:3]),
    "narrow": ("{v}.narrow(1, 1, 2)", lambda v: v.narrow(1, 1, 2)),
    "chunk": ("{v}.chunk(2, dim=1)[1]", lambda v: v.chunk(2, dim=1)[1]),
}
# in-place op name -> (Python spelling on `t`, function)
IN_PLACE = {
    "relu_": ("{t}.relu_()", lambda t: t.relu_()),
    "mul_": ("{t}.mul_(-2.0)", lambda t: t.mul_(-2.0)),
    "add_": ("{t}.add_(1.5)", lambda t: t.add_(1.5)),
    "sigmoid_": ("{t}.sigmoid_()", lambda t: t.sigmoid_()),
    "masked_fill_": ("{t}.masked_fill_({t} > 0.3, -1.0)", lambda t: t.masked_fill_(t > 0.3, -1.0)),
}
# setitem index name -> (Python spelling, index)
INDEXES = {"all": ("...", Ellipsis), "channels": (":, :2", (slice(None), slice(None, 2))),
           "columns": ("..., 1:3", (Ellipsis, slice(1, 3)))}
LAYERS = ["conv", "conv", "linear", "batchnorm", "layernorm", "layernorm", "relu", "relu_inplace", "relu6_inplace",
          "silu_inplace", "leaky_relu_inplace", "gelu", "sigmoid"]


@dataclass(frozen=True)
class Step:
    """One line of a program: ``kind`` with the pool indices it reads (``srcs``) and its options.
    Steps that make a value append it to the pool; every step reads only earlier values."""
    kind: str
    srcs: tuple[int, ...]
    option: str = ""

    def code(self, names: list[str], out: str) -> str:
        a, b = (names[i] for i in (self.srcs + self.srcs)[:2])
        if self.kind == "layer":
            return f"{out} = self.{self.option}_{out}({a})"
        if self.kind in ("F.relu", "F.gelu"):
            return f"{out} = {self.kind}({a})"
        if self.kind == "F.relu_inplace":
            return f"{out} = F.relu({a}, inplace=True)"
        if self.kind == "plus":
            return f"{out} = {a} + {b}"
        if self.kind == "iadd":
            return f"{a} += {b}; {out} = {a}"
        if self.kind == "add_":
            return f"{out} = {a}.add_({b})"
        if self.kind == "transpose":
            return f"{out} = {a}.transpose(2, 3)"
        if self.kind == "in_place":
            view, op = self.option.split(":")
            return IN_PLACE[op][0].format(t=VIEWS[view][0].format(v=a))
        if self.kind == "in_place_value":
            return f"{out} = " + IN_PLACE[self.option][0].format(t=a)
        if self.kind == "setitem":
            index, value = self.option.split(":")
            rhs = "0.25" if value == "scalar" else f"{b}[{INDEXES[index][0]}] * 0.5"
            return f"{a}[{INDEXES[index][0]}] = {rhs}"
        if self.kind == "keep_view":
            return f"{out} = {VIEWS[self.option][0].format(v=a)}  # read at the end"
        if self.kind == "block":
            return f"{out} = self.block_{out}({', '.join(names[i] for i in self.srcs)})"
        raise AssertionError(self.kind)

    def makes_value(self) -> bool:
        return self.kind not in ("in_place", "setitem", "keep_view")


def _layer(kind: str) -> nn.Module:
    if kind == "conv":
        return nn.Conv2d(4, 4, 3, padding=1)
    if kind == "linear":
        return nn.Linear(4, 4)
    if kind == "batchnorm":
        return nn.BatchNorm2d(4)
    if kind == "layernorm":
        return nn.LayerNorm(4)
    return {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "relu6_inplace": nn.ReLU6(inplace=True),
            "silu_inplace": nn.SiLU(inplace=True), "leaky_relu_inplace": nn.LeakyReLU(0.1, inplace=True),
            "gelu": nn.GELU(), "sigmoid": nn.Sigmoid()}[kind]


class Program(nn.Module):
    """Runs ``steps`` on a pool of values that starts as the forward's inputs; returns the values
    in ``outputs`` (pool indices) and the views kept by ``keep_view`` steps, flattened and joined."""

    def __init__(self, steps: tuple[Step, ...], blocks: dict[int, "Program"], num_inputs: int,
                 outputs: tuple[int, ...]):
        super().__init__()
        self.steps, self.num_inputs, self.outputs = steps, num_inputs, outputs
        self.step_layers = nn.ModuleDict({str(i): _layer(s.option) for i, s in enumerate(steps) if s.kind == "layer"})
        self.step_blocks = nn.ModuleDict({str(i): block for i, block in blocks.items()})

    def forward(self, *inputs):
        pool, kept = list(inputs), []
        for i, step in enumerate(self.steps):
            a, b = (pool[j] for j in (step.srcs + step.srcs)[:2])
            if step.kind == "layer":
                pool.append(self.step_layers[str(i)](a))
            elif step.kind == "F.relu":
                pool.append(F.relu(a))
            elif step.kind == "F.relu_inplace":
                pool.append(F.relu(a, inplace=True))
            elif step.kind == "in_place_value":
                pool.append(IN_PLACE[step.option][1](a))
            elif step.kind == "F.gelu":
                pool.append(F.gelu(a))
            elif step.kind == "plus":
                pool.append(a + b)
            elif step.kind == "iadd":
                a += b
                pool.append(a)
            elif step.kind == "add_":
                pool.append(a.add_(b))
            elif step.kind == "transpose":
                pool.append(a.transpose(2, 3))
            elif step.kind == "in_place":
                view, op = step.option.split(":")
                IN_PLACE[op][1](VIEWS[view][1](a))
            elif step.kind == "setitem":
                index, value = step.option.split(":")
                a[INDEXES[index][1]] = 0.25 if value == "scalar" else b[INDEXES[index][1]] * 0.5
            elif step.kind == "keep_view":
                kept.append(VIEWS[step.option][1](a))
            else:  # block
                pool.append(self.step_blocks[str(i)](*(pool[j] for j in step.srcs)))
        if self.num_inputs and not self.outputs:  # a nested block returns its last value
            return pool[-1]
        return torch.cat([pool[j].flatten(1) for j in self.outputs] + [v.flatten(1) for v in kept], 1)

    def code(self, name: str = "Net", indent: str = "") -> str:
        """The program as the Python a person would write (what a failing example prints)."""
        args = ", ".join(f"v{i}" for i in range(self.num_inputs))
        names = [f"v{i}" for i in range(self.num_inputs)]
        lines, kept = [f"{indent}def {name}.forward(self, {args}):"], []
        for i, step in enumerate(self.steps):
            out = f"v{len(names)}" if step.makes_value() else f"k{len(kept)}"
            if step.kind == "block":
                lines.append(self.step_blocks[str(i)].code(f"block_{out}", indent + "    "))
            lines.append(f"{indent}    " + step.code(names, out))
            if step.makes_value():
                names.append(out)
            elif step.kind == "keep_view":
                kept.append(out)
        if self.outputs or not self.num_inputs:
            parts = [f"{names[j]}.flatten(1)" for j in self.outputs] + [f"{k}.flatten(1)" for k in kept]
            lines.append(f"{indent}    return torch.cat([{', '.join(parts)}], 1)")
        else:
            lines.append(f"{indent}    return {names[-1]}")
        return "\n".join(lines)


@st.composite
def _steps(draw, num_inputs: int, depth: int):
    """A list of steps over a pool that starts with ``num_inputs`` values, and its nested blocks."""
    steps, blocks, size = [], {}, num_inputs
    for _ in range(draw(st.integers(1, 8))):
        # mostly the newest value, so layers chain into the patterns the passes fuse (conv, bn, relu)
        pick = st.one_of(st.just(size - 1), st.just(size - 1), st.just(max(size - 2, 0)), st.integers(0, size - 1))
        kinds = ["layer", "layer", "layer", "F.relu", "F.relu_inplace", "F.gelu", "plus", "iadd", "add_",
                 "transpose", "in_place", "in_place", "in_place", "in_place_value", "setitem", "keep_view",
                 "change_between", "change_between"] \
            + (["block"] if depth < 2 else [])
        kind = draw(st.sampled_from(kinds))
        srcs, option = (draw(pick), draw(pick)), ""
        if kind == "layer":
            option = draw(st.sampled_from(LAYERS))
        elif kind == "in_place_value":
            option = draw(st.sampled_from(list(IN_PLACE)))
        elif kind == "in_place":
            option = f"{draw(st.sampled_from(list(VIEWS)))}:{draw(st.sampled_from(list(IN_PLACE)))}"
        elif kind == "setitem":
            option = f"{draw(st.sampled_from(list(INDEXES)))}:{draw(st.sampled_from(['scalar', 'value']))}"
        elif kind == "keep_view":
            option = draw(st.sampled_from([v for v in VIEWS if v != "whole"]))
        elif kind == "block":
            srcs = tuple(draw(st.lists(pick, min_size=1, max_size=2)))
            inner, inner_blocks = draw(_steps(len(srcs), depth + 1))
            blocks[len(steps)] = Program(inner, inner_blocks, len(srcs), ())
        if kind == "change_between":  # y = f(a); change a or y in place; read y (and a) again
            steps += draw(_change_between(size, draw(pick)))
            size += 2
            continue
        step = Step(kind, srcs if kind in ("plus", "iadd", "add_", "setitem", "block") else srcs[:1], option)
        steps.append(step)
        size += step.makes_value()
    return tuple(steps), blocks


@st.composite
def _change_between(draw, size: int, a: int):
    """Three steps where a fusion would move work across an in-place change: ``y = f(a)``, then ``a``
    or ``y`` (or a view of either) changed in place, then ``y`` read by a layer or added to ``a``."""
    first = draw(st.sampled_from([Step("layer", (a,), draw(st.sampled_from(["conv", "linear", "batchnorm"]))),
                                  Step("plus", (a, draw(st.integers(0, size - 1))))]))
    changed = draw(st.sampled_from([a, size]))
    option = f"{draw(st.sampled_from(list(VIEWS)))}:{draw(st.sampled_from(list(IN_PLACE)))}"
    last = draw(st.sampled_from([Step("plus", (size, a)), Step("F.relu", (size,)),
                                 Step("layer", (size,), draw(st.sampled_from(LAYERS)))]))
    return [first, Step("in_place", (changed,), option), last]


@st.composite
def programs(draw) -> Program:
    """A random top-level program with one input (``v0``, the caller's tensor)."""
    steps, blocks = draw(_steps(1, 0))
    size = 1 + sum(s.makes_value() for s in steps)
    outputs = tuple(sorted(set(draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=3)))))
    return Program(steps, blocks, 1, outputs)


def _run(model: nn.Module, data: torch.Tensor):
    """The output and the caller's input after the call (or the error), on a copy of ``data``."""
    x = data.clone()
    try:
        with torch.no_grad():
            return model(x), x
    except Exception as error:  # noqa: BLE001 -- compared with eager's verdict below
        return error, x


def _recordings(net: nn.Module) -> dict:
    """``net`` recorded by ``tg.Model`` and ``tg.from_module``. A recording may refuse a program
    loudly (GraphBuildError: e.g. strides of the recording's meta tensors that differ from eager's,
    so a ``.view`` eager allows is refused); anything else it raises fails the test."""
    def symbolic():
        x = tg.Input(shape=SHAPE)
        return tg.Model(x, net(x))

    models = {}
    for how, record in (("tg.Model", symbolic), ("tg.from_module", lambda: tg.from_module(net, SHAPE))):
        try:
            models[how] = record().eval()
        except tg.GraphBuildError as error:
            note(f"{how} refuses the program: {error}")
    return models


def _variants(net: nn.Module):
    """Every way torchgraph runs ``net``: recorded twice, each optimized three ways."""
    models = _recordings(net)
    for how, model in list(models.items()):
        models[f"optimize({how})"] = tg.optimize(model)
        models[f"optimize({how}, channels_last=False)"] = tg.optimize(model, channels_last=False)
        models[f"optimize({how}, inference=False)"] = tg.optimize(model, inference=False).eval()
    return models


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(programs())
def test_optimize_changes_nothing_that_in_place_ops_and_views_compute(net):
    note(net.code())
    torch.manual_seed(0)
    net = net.eval()
    for p in net.parameters():  # seeded here (programs are made unseeded); norms away from the identity
        p.data.uniform_(-1.0, 1.0)
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    data = torch.randn(2, *SHAPE)
    want, want_input = _run(net, data)
    if isinstance(want, Exception):  # e.g. .view on a transposed value: eager refuses it too
        note(f"eager raises {type(want).__name__}: {want}")
        return
    for how, model in _variants(net).items():
        got, got_input = _run(model, data)
        assert not isinstance(got, Exception), f"{how} raised {type(got).__name__}: {got}"
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{how}: output differs\n{m}")
        torch.testing.assert_close(got_input, want_input, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{how}: the caller's input differs\n{m}")
