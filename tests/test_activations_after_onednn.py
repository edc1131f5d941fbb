"""NOTE: [Activations after oneDNN on AVX2] (torchgraph/fused/_common.py): on CPUs without AVX-512, GELU,
GELU-tanh, SiLU and tanh run in place after oneDNN's GEMM or convolution instead of in its epilogue. Both
placements give eager's values, for linears, planned and unplanned convolutions and convolutions as GEMMs."""

import pytest
import torch
import torch.nn.functional as F

from torchgraph import fused
from torchgraph.fused import _common
from torchgraph.fused import conv as fused_conv

pytestmark = pytest.mark.skipif(not _common._HAS_ONEDNN, reason="needs oneDNN")

TRANSCENDENTAL = ("gelu", "gelu_tanh", "silu", "tanh")
ACTS = ("relu", *TRANSCENDENTAL, "hardswish", "sigmoid")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_the_set_follows_the_cpu():
    """The four transcendental activations where torch runs at the AVX2 level; empty elsewhere (AVX-512:
    oneDNN's epilogues)."""
    avx2 = torch.backends.cpu.get_cpu_capability().upper() == "AVX2"
    assert fused.ACTIVATIONS_AFTER_ONEDNN == (frozenset(TRANSCENDENTAL) if avx2 else frozenset())
    for act in ACTS:
        post_op, after = _common.onednn_epilogue(act)
        if act in fused.ACTIVATIONS_AFTER_ONEDNN:
            assert (post_op, after) == (_common.ONEDNN_ACTIVATIONS["none"], act)
        else:
            assert (post_op, after) == (_common.ONEDNN_ACTIVATIONS[act], "none")


def _ops_run(fn) -> list:
    with torch.profiler.profile() as prof:
        fn()
    return [event.name for event in prof.events()]


@pytest.mark.parametrize("placement", ["after", "epilogue"])
@pytest.mark.parametrize("act", ACTS)
def test_linear_values_either_way(monkeypatch, placement, act):
    monkeypatch.setattr(_common, "ACTIVATIONS_AFTER_ONEDNN", frozenset(ACTS if placement == "after" else ()))
    monkeypatch.setattr(fused.linear, "KERNEL_MAX_ROWS", 0)  # AVX2 would take 256 rows to torchgraph's GEMM kernel
    # 256 rows x 128 -> 512: above the small-linear cut and MKL's few-rows path, so oneDNN's GEMM on every CPU
    x, w, b = torch.randn(256, 128), torch.randn(512, 128) * 0.1, torch.randn(512)
    with torch.no_grad():
        y = fused.linear_act(x, w, b, act)
        ops_run = _ops_run(lambda: fused.linear_act(x, w, b, act))
    torch.testing.assert_close(y, _common._ACTIVATION_FNS[act](F.linear(x, w, b)), atol=1e-5, rtol=1e-5)
    assert "mkldnn::_linear_pointwise" in ops_run
    ran_after = any(name.startswith("aten::") and act.split("_")[0] in name for name in ops_run)
    assert ran_after is (placement == "after"), ops_run


@pytest.mark.parametrize("placement", ["after", "epilogue"])
@pytest.mark.parametrize("act", TRANSCENDENTAL)
@pytest.mark.parametrize("size, kernel", [(16, 3), (16, 1), (2, 3)])  # oneDNN's conv, a 1x1 GEMM, a 2x2-map GEMM
def test_convolution_values_either_way(monkeypatch, placement, act, size, kernel):
    monkeypatch.setattr(_common, "ACTIVATIONS_AFTER_ONEDNN", frozenset(ACTS if placement == "after" else ()))
    conv = torch.nn.Conv2d(32, 48, kernel, padding=kernel // 2)
    x = torch.randn(2, 32, size, size).contiguous(memory_format=torch.channels_last)
    args = ([1, 1], [kernel // 2] * 2, [1, 1], 1, act)
    with torch.no_grad():
        expected = _common._ACTIVATION_FNS[act](conv(x))
        first = fused_conv.conv2d_act(x, conv.weight, conv.bias, *args, channels_last=True)
        planned = fused_conv.conv2d_act(x, conv.weight, conv.bias, *args, channels_last=True)
    for y in (first, planned):
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    plan = fused_conv._PLANS.get(id(conv.weight))
    if (size, kernel) == (16, 3):  # 512 output pixels, 16 wide: oneDNN's convolution on every CPU
        assert plan is not None and plan.rows == 0 and plan.depthwise is None
        assert plan.act_after == (act if placement == "after" else "none")
