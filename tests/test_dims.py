"""Dynamic dims: tg.Dim bounds, and probe sizes that depend only on the code being built."""

import subprocess
import sys
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg


class _LearnedPositions(nn.Module):
    """A learned table of 128 positions, sliced by the sequence length (as GPT-2/BERT do)."""

    def __init__(self, dim: int = 8, positions: int = 128):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, positions, dim))

    def forward(self, x):
        return x + self.table[:, : x.size(1)]


def _build():
    tokens = tg.Input(shape=(None,), dtype=torch.long, name="tokens")
    extra = tg.Input(shape=("T", 8), name="extra")
    h = nn.Embedding(50, 8)(tokens)
    h = _LearnedPositions()(h)
    return tg.Model([tokens, extra], [h.mean(dim=1), extra.sum(dim=1)])


def _fingerprint(model):
    """Everything that must be identical between two builds of the same code."""
    nodes = [(n.op, n.name, str(n.target), n.meta.get("tg_spec").probes if n.meta.get("tg_spec") else None)
             for n in model.graph.nodes]
    return model.code, nodes, [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_dim_declares_bounds_and_validates_them():
    """tg.Dim keeps name/min/max; bad bounds are GraphBuildErrors that echo them."""
    d = tg.Dim("T", max=512)
    assert (d.name, d.min, d.max) == ("T", 0, 512) and repr(d) == "Dim('T', max=512)"
    for bad in (dict(min=-1), dict(max=2.5), dict(min=5, max=4)):
        with pytest.raises(tg.GraphBuildError, match="tg.Dim"):
            tg.Dim("T", **bad)
    with pytest.raises(tg.GraphBuildError, match="name"):
        tg.Dim("")


def test_dims_carry_name_and_bounds_and_probes_respect_them():
    """The DynamicDim objects of a value carry .name/.min/.max; probe sizes stay within the bounds."""
    x = tg.Input(shape=(tg.Dim("T", min=3, max=16), tg.Dim(None, max=40), None, "U"))
    batch, t, anon, free, u = x._tg_value.dims
    assert (t.name, t.min, t.max) == ("T", 3, 16) and (anon.name, anon.max) == (None, 40)
    assert (free.min, free.max, u.name, u.max) == (0, None, "U", None)
    probes = [d.probes for d in (batch, t, anon, free, u)]
    assert len(set(probes)) == 5 and all(p0 != p1 for p0, p1 in probes)
    assert all(3 <= p <= 16 for p in t.probes) and all(2 <= p <= 40 for p in anon.probes)
    assert all(p <= 127 for d in (free, u) for p in d.probes)  # tables of 128 positions are not overrun
    assert x.static_shape == (None, "T", None, None, "U")
    tg.Model(x, x * 2)


def test_a_dim_with_min_equal_to_max_is_static():
    """tg.Dim(min=n, max=n) has one possible size: it is a static dim."""
    x = tg.Input(shape=(tg.Dim("C", min=4, max=4),))
    assert x.static_shape == (None, 4)


def test_named_dim_bounds_must_agree_within_a_build():
    """The same name with other bounds in one build is an error; a plain name reuses the dim."""
    a = tg.Input(shape=(tg.Dim("T", max=64),))
    b = tg.Input(shape=("T",))
    assert a._tg_value.dims[1] is b._tg_value.dims[1]
    with pytest.raises(tg.GraphBuildError, match="declared twice with different bounds"):
        tg.Input(shape=(tg.Dim("T", max=32),))
    tg.Model([a, b], a + b)


def test_different_dynamic_dims_cannot_be_mixed():
    """Two named dims (or a named and a None dim) are distinct: adding them fails at build time."""
    a, b, c = tg.Input(shape=("T", 4)), tg.Input(shape=("S", 4)), tg.Input(shape=(None, 4))
    with pytest.raises(tg.GraphBuildError, match="add"):
        a + b
    with pytest.raises(tg.GraphBuildError, match="add"):
        a + c
    tg.Model([a, b, c], [a, b, c])


def test_same_code_builds_the_same_model_after_other_builds():
    """Earlier builds (including a rejected one) change nothing: the same code gives the same model."""
    first = _fingerprint(_build())
    for _ in range(20):  # many unrelated dims, then a build that fails half-way
        x = tg.Input(shape=(None, None, "Z"))
        tg.Model(x, x + 1)
    with pytest.raises(tg.GraphBuildError):
        nn.Linear(3, 3)(tg.Input(shape=(None, 4)))
    assert _fingerprint(_build()) == first
    assert _fingerprint(_build()) == first  # the learned table of 128 positions builds every time


def test_two_threads_building_at_once_get_identical_models():
    """Builds in two threads at the same time do not share or alias dims; both equal a lone build."""
    reference = _fingerprint(_build())
    barrier = threading.Barrier(2)
    results, errors = [None, None], []

    def work(i):
        try:
            barrier.wait()
            results[i] = _fingerprint(_build())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0] == reference and results[1] == reference


def test_probe_sizes_are_the_same_in_a_fresh_process():
    """The probe sizes of a build do not depend on the process's history."""
    code = ("import torchgraph as tg\n"
            "def make():\n"
            "    return tg.Input(shape=(None, 'T', tg.Dim('S', max=100)))\n"
            "x = make()\n"
            "print([d.probes for d in x._tg_value.dims])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for _ in range(3):
        x = tg.Input(shape=(None, None))
        tg.Model(x, x * 2)

    def make():
        return tg.Input(shape=(None, 'T', tg.Dim('S', max=100)))
    x = make()
    # Only the source line of the anonymous dim differs between the two programs: compare the rest.
    fresh = eval(out)  # noqa: S307 - our own output
    here = [d.probes for d in x._tg_value.dims]
    assert fresh[0] == here[0] and fresh[2:] == here[2:]


def test_stride_32_network_keeps_spatial_dims_dynamic():
    """Five stride-2 stages on (None, None) images: the last feature map is still (None, C, None, None)."""
    x = tg.Input(shape=(3, None, None))
    h = x
    for c_in, c_out in ((3, 8), (8, 8), (8, 16), (16, 16), (16, 32)):
        h = F.relu(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)(h))
    assert h.static_shape == (None, 32, None, None)
    model = tg.Model(x, h.flatten(2).mean(dim=2))
    for side in (32, 64, 100):
        assert model(torch.randn(1, 3, side, side)).shape == (1, 32)
