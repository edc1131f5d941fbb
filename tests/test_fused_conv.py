"""The convolution targets of tg.optimize: few-pixel convolutions as one MKL GEMM, and the residual
add (+ ReLU) inside the convolution (``fused.conv2d_add_act``), on every path each can take."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import fused, ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from handwritten import Bottleneck, InvertedResidual, randomize_batchnorm  # noqa: E402

needs_gemm = pytest.mark.skipif(not fused._common._HAS_ONEDNN, reason="needs oneDNN")


@pytest.fixture(params=["mkl", "onednn", "kernel"])
def gemm_library(request) -> str:
    """Runs the test with float32 GEMMs on MKL's packed GEMM (Intel CPUs), on oneDNN's matmul (other
    CPUs: NOTE: [MKL on other vendors' CPUs]) and on torchgraph's kernel (other CPUs with AVX2 only:
    NOTE: [GEMM kernel])."""
    request.getfixturevalue({"mkl": "mkl_routes", "onednn": "onednn_routes", "kernel": "kernel_routes"}[request.param])
    if request.param == "kernel":  # these tests' convolutions sum over fewer channels than the kernel's minimum
        request.getfixturevalue("monkeypatch").setattr(fused.conv, "GEMM_KERNEL_MIN_DEPTH", 0)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _reference(x, w, b, stride, padding, act, residual=None):
    y = F.conv2d(x, w, b, stride, padding)
    return fused._common._activation(y if residual is None else y + residual, act)


def _gemm_calls(monkeypatch, library: str) -> list:
    """Records the row counts of every GEMM call of ``library`` ("mkl", "onednn" or "kernel")."""
    calls = []
    if library == "kernel":  # called as torch.ops.torchgraph.gemm_act_inference.default
        real = torch.ops.torchgraph.gemm_act_inference.default

        def counting_kernel(a, *args):
            calls.append(a.shape[0])
            return real(a, *args)

        monkeypatch.setattr(torch.ops.torchgraph, "gemm_act_inference", types.SimpleNamespace(default=counting_kernel))
        return calls
    ops_, name = (torch.ops.mkl, "_mkl_linear") if library == "mkl" else (torch.ops.mkldnn, "_linear_pointwise")
    real = getattr(ops_, name)

    def counting(a, *args):
        calls.append(a.shape[0])
        return real(a, *args)

    monkeypatch.setattr(ops_, name, counting)
    return calls


# 1x1 and 3x3, stride 1 and 2, with and without padding, on the small maps where the GEMM is chosen
CASES = [  # (batch, in, out, size, kernel, stride, padding)
    (8, 32, 48, 2, 1, 1, 0),
    (8, 32, 48, 4, 1, 2, 0),
    (2, 16, 24, 4, 3, 1, 1),
    (8, 16, 24, 4, 3, 2, 1),
    (2, 16, 24, 4, 3, 1, 0),
    (1, 16, 8, 5, 3, 2, 1),
]


@needs_gemm
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}_{c[4]}x{c[4]}_s{c[5]}_p{c[6]}_{c[3]}px" for c in CASES])
@pytest.mark.parametrize("act", ["none", "relu", "hardswish"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_few_pixel_convolutions_run_as_one_gemm(monkeypatch, gemm_library, case, act, channels_last):
    """A convolution with few output pixels runs as one GEMM (MKL or oneDNN) on NHWC rows: same
    values as F.conv2d, answering in channels_last inside a stack and contiguous outside one. (On
    oneDNN float32 im2col GEMMs are limited to maps 2 wide; widened here so the 3- and 4-wide cases
    check the path.)"""
    monkeypatch.setattr(fused.conv, "ONEDNN_F32_IM2COL_MAX_WIDTH", 4)
    n, cin, cout, size, k, stride, pad = case
    x = torch.randn(n, cin, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(cout, cin, k, k), torch.randn(cout)
    calls = _gemm_calls(monkeypatch, gemm_library)
    with torch.no_grad():
        y = fused.conv2d_act(x, w, b, [stride] * 2, [pad] * 2, [1, 1], 1, act, channels_last=channels_last)
    expected = _reference(x, w, b, stride, pad, act)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    assert calls == [expected.shape[0] * expected.shape[2] * expected.shape[3]]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=layout)


@pytest.mark.skipif(torch.bfloat16 not in fused._common._ONEDNN_DTYPES, reason="needs a CPU with bfloat16 instructions")
@pytest.mark.parametrize("case", CASES[:4], ids=[f"b{c[0]}_{c[4]}x{c[4]}_s{c[5]}_p{c[6]}_{c[3]}px" for c in CASES[:4]])
def test_few_pixel_bfloat16_convolutions_run_as_one_onednn_matmul(monkeypatch, case):
    """In bfloat16 the GEMM runs on oneDNN's matmul (AMX) from the cached filter matrix; values
    within bfloat16 rounding of the float32 convolution, channels_last out; the filters are reordered for oneDNN once."""
    monkeypatch.setattr(fused.weights, "_ONEDNN_LINEAR", {})
    n, cin, cout, size, k, stride, pad = case
    x = torch.randn(n, cin, size, size).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(cout, cin, k, k), torch.randn(cout)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    with torch.no_grad():
        y = fused.conv2d_act(xb, wb, bb, [stride] * 2, [pad] * 2, [1, 1], 1, "relu", channels_last=True)
    expected = _reference(xb.float(), wb.float(), bb.float(), stride, pad, "relu")
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert (y.float() - expected).abs().max() <= 1e-2 * expected.abs().max()
    assert list(fused.weights._ONEDNN_LINEAR) == [id(wb)]


@needs_gemm
def test_gemm_weights_are_cached_and_follow_changes(monkeypatch, gemm_library):
    """The GEMM's packed filters are cached (MKL's per (weight, rows), oneDNN's per weight) and
    rebuilt when the weight changes (load_state_dict, an optimizer step)."""
    monkeypatch.setattr(fused.weights, "_MKL_PACKED", {})
    monkeypatch.setattr(fused.weights, "_ONEDNN_LINEAR", {})
    monkeypatch.setattr(fused.weights, "_GEMM_PANELS", {})
    x = torch.randn(2, 16, 2, 2).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 16, 3, 3), torch.randn(8)
    args = ([1, 1], [1, 1], [1, 1], 1, "relu")
    with torch.no_grad():
        fused.conv2d_act(x, w, b, *args, channels_last=True)
        if gemm_library == "mkl":
            assert list(fused.weights._MKL_PACKED) == [id(w)] and list(fused.weights._MKL_PACKED[id(w)][2]) == [8]
        elif gemm_library == "kernel":
            assert list(fused.weights._GEMM_PANELS) == [id(w)] and not fused.weights._ONEDNN_LINEAR
        else:
            assert list(fused.weights._ONEDNN_LINEAR) == [id(w)] and not fused.weights._MKL_PACKED
        w.mul_(-1)
        y = fused.conv2d_act(x, w, b, *args, channels_last=True)
    torch.testing.assert_close(y, _reference(x, w, b, 1, 1, "relu"), atol=1e-4, rtol=1e-4)


def _gemm_rows(n, c, size, k, stride=1, pad=0, dilation=1, groups=1, dtype=torch.float32, out=8):
    x = torch.empty(n, c, size, size, device="meta", dtype=dtype)
    w = torch.empty(out, c // groups, k, k, device="meta")
    return fused.conv._conv_gemm_rows(x, w, [stride] * 2, [pad] * 2, [dilation] * 2, groups)


@pytest.mark.usefixtures("mkl_routes")
def test_gemm_decision_follows_the_measured_limits():
    """With float32 GEMMs on MKL (Intel CPUs): 1x1 convolutions up to CONV_GEMM_MAX_ROWS output
    pixels, larger kernels on maps at most CONV_IM2COL_MAX_WIDTH wide with at most CONV_IM2COL_MAX_ROWS
    pixels; never grouped or dilated convolutions, nor dtypes other than float32 and (where oneDNN runs
    it) bfloat16 (NOTE: [Convolutions on few pixels])."""
    rows = _gemm_rows

    assert rows(8, 8, 4, 1) == 128 == fused.CONV_GEMM_MAX_ROWS
    assert rows(9, 8, 4, 1) == 0
    assert rows(8, 8, 4, 3, pad=1) == 128  # ResNet-50's layer3 at batch 8, 64x64
    assert rows(1, 8, 7, 3, pad=1) == 0  # layer4 at batch 1, 224x224: 7 wide, oneDNN is faster
    assert rows(1, 8, 7, 1) == 49
    assert rows(1, 8, 14, 1) == 0  # layer3 at batch 1, 224x224: 196 rows
    assert rows(9, 8, 4, 3, pad=1) == 0  # 144 rows
    assert rows(1, 8, 2, 3, pad=1, groups=8, out=8) == 0
    assert rows(1, 8, 4, 3, pad=2, dilation=2) == 0
    assert rows(1, 8, 2, 1, dtype=torch.bfloat16) == (4 if torch.bfloat16 in fused._common._ONEDNN_DTYPES else 0)
    assert rows(1, 8, 2, 1, dtype=torch.float16) == 0
    assert rows(1, 8, 2, 1, stride=2) == 1


@pytest.mark.usefixtures("onednn_routes")
def test_float32_gemm_limits_where_mkl_is_slow():
    """With float32 GEMMs on oneDNN's matmul (NOTE: [Float32 convolution GEMMs on oneDNN]): every 1x1
    convolution, and larger kernels only on maps at most ONEDNN_F32_IM2COL_MAX_WIDTH (2) wide;
    bfloat16 keeps the limits measured for it."""
    rows = _gemm_rows
    assert rows(8, 8, 32, 1) == 8192 and rows(1, 16, 112, 1) == 12544  # MobileNetV2's expansions
    assert rows(1, 8, 56, 1, stride=2) == 784  # ResNet-50's downsample at b1 224x224
    assert rows(8, 8, 4, 3, pad=1) == 0  # 4 wide: the fused convolution was 1.28-1.40x faster
    assert rows(8, 8, 2, 3, pad=1) == 32 and rows(40, 8, 2, 3, pad=1) == 0  # 2 wide, CONV_IM2COL_MAX_ROWS
    if torch.bfloat16 in fused._common._ONEDNN_DTYPES:
        assert rows(8, 8, 4, 1, dtype=torch.bfloat16) == 128 and rows(9, 8, 4, 1, dtype=torch.bfloat16) == 0
        assert rows(8, 8, 4, 3, pad=1, dtype=torch.bfloat16) == 128


@pytest.mark.parametrize("size", [2, 16], ids=["gemm", "onednn"])
@pytest.mark.parametrize("act", ["none", "relu"])
@pytest.mark.parametrize("residual_layout", ["channels_last", "contiguous"])
def test_conv2d_add_act_matches_conv_then_add(size, act, residual_layout):
    """``act(conv(x) + r)`` in one call equals the three ops, on the oneDNN path (the add in the
    convolution's epilogue) and the GEMM path, whatever the residual's layout."""
    x = torch.randn(4, 16, size, size).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, 16, 1, 1), torch.randn(32)
    r = torch.randn(4, 32, size, size)
    if residual_layout == "channels_last":
        r = r.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = fused.conv2d_add_act(x, r, w, b, [1, 1], [0, 0], [1, 1], 1, act, channels_last=True)
    torch.testing.assert_close(y, _reference(x, w, b, 1, 0, act, r), atol=1e-4, rtol=1e-4)
    assert y.data_ptr() != r.data_ptr()  # the residual is read, never written


@pytest.mark.parametrize("size", [2, 16], ids=["gemm", "onednn"])
@pytest.mark.parametrize("residual_shape", [(1, 32, 1, 1), (3, 32, 1, 1)], ids=["smaller", "larger"])
def test_conv2d_add_act_broadcasts_as_eager(size, residual_shape):
    """A residual that broadcasts (smaller, or larger than the output: a direct call; tg.optimize
    only writes same-shaped ones) gives eager's values and shape, not the fused paths' output."""
    x = torch.randn(1, 16, size, size).contiguous(memory_format=torch.channels_last)
    w, b, r = torch.randn(32, 16, 1, 1), torch.randn(32), torch.randn(*residual_shape)
    with torch.no_grad():
        y = fused.conv2d_add_act(x, r, w, b, [1, 1], [0, 0], [1, 1], 1, "relu", channels_last=True)
    torch.testing.assert_close(y, _reference(x, w, b, 1, 0, "relu", r), atol=1e-4, rtol=1e-4)


def test_conv2d_add_act_differentiates_and_runs_other_dtypes():
    """With gradients, or in float64, it runs standard ops: gradients equal the original's."""
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    r = torch.randn(2, 8, 5, 5, requires_grad=True)
    w, b = torch.randn(8, 8, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True)
    y = fused.conv2d_add_act(x, r, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", channels_last=True)
    grads = torch.autograd.grad(y.square().sum(), (x, r, w, b))
    expected = torch.autograd.grad(_reference(x, w, b, 1, 1, "relu", r).square().sum(), (x, r, w, b))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    x64, r64, w64 = x.detach().double(), r.detach().double(), w.detach().double()
    torch.testing.assert_close(fused.conv2d_add_act(x64, r64, w64, None, [1, 1], [1, 1], [1, 1], 1, "relu"),
                               _reference(x64, w64, None, 1, 1, "relu", r64))


def test_conv2d_add_act_rejects_other_activations():
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1)
    with pytest.raises(ValueError, match=r"conv2d_add_act: act must be one of \('none', 'relu'\); received 'gelu'"):
        fused.conv2d_add_act(x, x, w, None, [1, 1], [0, 0], [1, 1], 1, "gelu")


def _bottlenecks() -> nn.Module:
    down = nn.Sequential(nn.Conv2d(16, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
    return randomize_batchnorm(nn.Sequential(Bottleneck(16, 16, 2, down), Bottleneck(64, 16)))


@pytest.mark.parametrize("batch,size", [(2, 16), (8, 4)], ids=["onednn", "gemm"])
def test_bottleneck_residual_runs_inside_its_last_conv(batch, size):
    """torchvision's Bottleneck (``out += identity; relu(out)``, a downsample Sequential): the last
    conv of each block takes the residual and the ReLU; outputs match eager on both conv paths."""
    net = _bottlenecks().eval()
    x = tg.Input(shape=(16, size, size))
    fast = tg.optimize(tg.Model(x, net(x)))
    fused_adds = [n for n in fast.graph.nodes if n.target is fused.conv2d_add_act]
    assert len(fused_adds) == 2 and all(n.args[8] == "relu" for n in fused_adds)
    assert not any(n.target in (ops.add_relu, "add") for n in fast.graph.nodes)
    data = torch.randn(batch, 16, size, size)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-4, rtol=1e-4)


def test_residual_stays_apart_where_it_must():
    """Not fused: training mode (no oneDNN epilogue has a backward), channels_last=False, a conv
    output read twice, a broadcasting add."""
    net = _bottlenecks()
    x = tg.Input(shape=(16, 8, 8))
    model = tg.Model(x, net(x))
    for options in ({"inference": False}, {"channels_last": False}):
        fast = tg.optimize(model.eval() if options.get("inference", True) else model.train(), **options)
        assert fused.conv2d_add_act not in {n.target for n in fast.graph.nodes}
        assert ops.add_relu in {n.target for n in fast.graph.nodes}

    x = tg.Input(shape=(8, 4, 4))
    conv = nn.Conv2d(8, 8, 1)(x)
    twice = tg.Model(x, [F.relu(conv + x), conv])
    broadcast = tg.Model(x, nn.Conv2d(8, 8, 1)(x) + torch.ones(1, 8, 1, 1))
    for model in (twice, broadcast):
        fast = tg.optimize(model.eval())
        assert fused.conv2d_add_act not in {n.target for n in fast.graph.nodes}
        data = torch.randn(2, 8, 4, 4)
        with torch.no_grad():
            torch.testing.assert_close(fast(data), model(data), atol=1e-5, rtol=1e-5)


def test_inverted_residual_without_activation():
    """MobileNetV2's ``x + conv(x)``: the plain add runs in the projection conv's epilogue."""
    net = randomize_batchnorm(InvertedResidual(16, 16, 1, 6)).eval()
    x = tg.Input(shape=(16, 8, 8))
    fast = tg.optimize(tg.Model(x, net(x)))
    fused_adds = [n for n in fast.graph.nodes if n.target is fused.conv2d_add_act]
    assert [n.args[8] for n in fused_adds] == ["none"]
    data = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), net(data), atol=1e-4, rtol=1e-4)


def test_fused_residual_exports_to_onnx(tmp_path):
    """tg.export_onnx of an optimized bottleneck: standard Conv + Add + Relu, verified by onnxruntime."""
    pytest.importorskip("onnxruntime")
    net = _bottlenecks().eval()
    x = tg.Input(shape=(16, 8, 8))
    fast = tg.optimize(tg.Model(x, net(x)))
    path = tmp_path / "fast.onnx"
    tg.export_onnx(fast, str(path))
    import onnx

    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Conv", "Add", "Relu"} <= kinds


@pytest.mark.parametrize("original_in_inference_mode", [False, True])
def test_optimized_inside_inference_mode_keeps_cached_weights(monkeypatch, original_in_inference_mode):
    """tg.optimize called under torch.inference_mode (even on a model built there) returns normal
    parameters, so the packed-weight caches work (NOTE: [Inference-mode builds]) and values match."""
    monkeypatch.setattr(fused.weights, "_PACKED", {})
    monkeypatch.setattr(fused.weights, "_MKL_PACKED", {})
    monkeypatch.setattr(fused.weights, "_ONEDNN_LINEAR", {})

    def build():
        x = tg.Input(shape=(16, 8, 8))
        return tg.Model(x, _bottlenecks()(x)).eval()

    if original_in_inference_mode:
        with torch.inference_mode():
            model = build()
    else:
        model = build()
    data = torch.randn(2, 16, 8, 8)
    with torch.inference_mode():
        fast = tg.optimize(model)
        out, expected = fast(data), model(data)
    assert not any(p.is_inference() for p in fast.parameters())
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    if fused._common._HAS_ONEDNN:
        # packed once and cached, not per call
        assert fused.weights._PACKED or fused.weights._MKL_PACKED or fused.weights._ONEDNN_LINEAR


@pytest.mark.usefixtures("mkl_routes")
def test_packed_copies_are_bounded_per_weight(monkeypatch):
    """A weight is packed for at most MKL_PACKED_ROW_COUNTS row counts (a decoding loop changes its
    row count every step); other row counts run the other paths with the same values, and
    inference-mode weights are never packed (no version counter to invalidate the copy)."""
    monkeypatch.setattr(fused.weights, "_MKL_PACKED", {})
    monkeypatch.setattr(fused.weights, "MKL_PACKED_ROW_COUNTS", 2)
    monkeypatch.setattr(fused.linear, "MKL_PACKED_MIN_WEIGHT", 0)
    w, b = torch.randn(10, 16), torch.randn(10)
    with torch.no_grad():
        for rows in (3, 5, 7, 9):
            x = torch.randn(rows, 16)
            torch.testing.assert_close(fused.linear_act(x, w, b, "relu"), F.relu(F.linear(x, w, b)))
    assert sorted(fused.weights._MKL_PACKED[id(w)][2]) == [3, 5]
    with torch.inference_mode():
        frozen = torch.randn(10, 16)
        x = torch.randn(4, 16)
        torch.testing.assert_close(fused.linear_act(x, frozen, None), F.linear(x, frozen))
    assert id(frozen) not in fused.weights._MKL_PACKED


@pytest.mark.parametrize("act", sorted(fused.ONEDNN_ACTIVATIONS))
def test_in_place_activations_equal_the_functions(act):
    """The in-place activations applied to fresh GEMM/linear outputs give exactly the functions' values."""
    y = torch.randn(64) * 4
    expected = fused._common._activation(y.clone(), act)
    out = fused._common._activation_(y, act)
    assert torch.equal(out, expected) and (act == "none" or out.data_ptr() == y.data_ptr())


needs_onednn = pytest.mark.skipif(not fused._common._HAS_ONEDNN, reason="needs oneDNN")


def _counting_planner(monkeypatch, residual: bool = False) -> list:
    """Records every plan conv2d_act (or with ``residual``, conv2d_add_act) makes (NOTE: [Per-layer plans])."""
    made = []
    real = fused.conv._new_plan

    def counting(plans, *args, **kwargs):
        plan = real(plans, *args, **kwargs)
        if (plans is fused.conv._ADD_PLANS) == residual:
            made.append(plan is not None)
        return plan

    monkeypatch.setattr(fused.conv, "_new_plan", counting)
    return made


@needs_onednn
@pytest.mark.parametrize("kind", ["onednn", "gemm"])
def test_a_layer_is_planned_once_and_again_when_its_premises_change(monkeypatch, kind):
    """The first call decides the path and the weights it reads; later calls reuse the plan, and a
    changed weight (in place, as load_state_dict or an optimizer step does), input shape, dtype,
    gradient need or limit is seen by the next call: values always equal F.conv2d's."""
    made = _counting_planner(monkeypatch)
    n, groups, w = (2, 1, torch.randn(8, 16, 1, 1)) if kind == "gemm" else (2, 16, torch.randn(16, 1, 3, 3))
    pad = 0 if kind == "gemm" else 1
    w, b = nn.Parameter(w), nn.Parameter(torch.randn(w.shape[0]))
    x = torch.randn(n, 16, 4, 4).contiguous(memory_format=torch.channels_last)

    def conv(x):
        return fused.conv2d_act(x, w, b, [1, 1], [pad, pad], [1, 1], groups, "relu", channels_last=True)

    def expected(x):
        return F.relu(F.conv2d(x, w, b, 1, pad, 1, groups))

    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(conv(x), expected(x), atol=1e-4, rtol=1e-4)
        assert made == [True]
        w.mul_(-1)
        torch.testing.assert_close(conv(x), expected(x), atol=1e-4, rtol=1e-4)
        bigger = torch.randn(3, 16, 4, 4).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(conv(bigger), expected(bigger), atol=1e-4, rtol=1e-4)
        assert made == [True] * 3
        monkeypatch.setattr(fused.conv, "CONV_GEMM_MAX_ROWS", 0)
        torch.testing.assert_close(conv(bigger), expected(bigger), atol=1e-4, rtol=1e-4)
        assert len(made) == 4
    y = conv(x)  # gradients needed: the standard path, no plan
    assert y.requires_grad and len(made) == 4
    y.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        w64, b64 = w.detach().double(), b.detach().double()
        y = fused.conv2d_act(x.double(), w64, b64, [1, 1], [pad, pad], [1, 1], groups, "relu", channels_last=True)
        torch.testing.assert_close(y, F.relu(F.conv2d(x.double(), w64, b64, 1, pad, 1, groups)))


@needs_onednn
def test_a_plan_does_not_outlive_its_weight_or_a_dtype_change():
    """`.double()` changes a parameter in place (same object, same version): the next float32 call
    fails as eager does instead of reading the stale float32 copy; a collected weight drops its plan."""
    layer = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)

    def call(layer, x):
        return fused.conv2d_act(x, layer.weight, layer.bias, [1, 1], [1, 1], [1, 1], 16, "none", channels_last=True)

    with torch.no_grad():
        call(layer, x)
        assert id(layer.weight) in fused.conv._PLANS
        layer.double()
        with pytest.raises(RuntimeError):
            layer(x)  # eager
        with pytest.raises(RuntimeError):
            call(layer, x)
        torch.testing.assert_close(call(layer, x.double()), layer(x.double()))
    key = id(layer.weight)
    del layer
    assert key not in fused.conv._PLANS


@needs_onednn
@pytest.mark.parametrize("act", ["none", "relu"])
def test_residual_plans_check_the_residual_on_every_call(monkeypatch, act):
    """conv2d_add_act reuses its plan only for a residual of the planned shape, dtype and device that
    needs no gradient; a broadcasting residual takes the standard path, as eager broadcasts."""
    made = _counting_planner(monkeypatch, residual=True)
    w, b = torch.randn(16, 16, 1, 1), torch.randn(16)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)

    def call(r):
        return fused.conv2d_add_act(x, r, w, b, [1, 1], [0, 0], [1, 1], 1, act, channels_last=True)

    with torch.no_grad():
        for residual in (r, r, r.contiguous(), torch.randn(1, 16, 1, 1), r):
            torch.testing.assert_close(call(residual), _reference(x, w, b, 1, 0, act, residual), atol=1e-4, rtol=1e-4)
        assert made == [True]
    residual = r.clone().requires_grad_()
    y = call(residual)
    assert y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(residual.grad, torch.ones_like(r) if act == "none" else (y > 0).float())
