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
from hypothesis import HealthCheck, given, settings
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
