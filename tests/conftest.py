"""Shared pytest fixtures, and the hypothesis profile of the suite."""

import os

import pytest
import torch
from hypothesis import settings

# NOTE: [Deterministic property tests] The suite must give the same verdict on every run (a fuzz
# test that explores new examples each run fails CI at random when it finds something). By default
# hypothesis draws the same examples every run (derandomize); TORCHGRAPH_HYPOTHESIS=explore draws new
# ones, with the example database, to hunt for bugs by hand: a failure found that way becomes a test.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile("explore" if os.environ.get("TORCHGRAPH_HYPOTHESIS") == "explore" else "deterministic")


@pytest.fixture
def one_thread():
    """Small models train faster on one thread, and far faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def same_at_any_thread_count():
    """``check(fn, threads)``: ``fn()`` run at ``threads`` threads equals, bitwise, ``fn()`` run at one (the kernels'
    splits between threads do not change their sums); the thread count is restored after."""
    def check(fn, threads: int) -> None:
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = fn()
            torch.set_num_threads(threads)
            torch.testing.assert_close(fn(), single, atol=0, rtol=0)
        finally:
            torch.set_num_threads(previous)

    return check


@pytest.fixture
def mkl_routes(monkeypatch):
    """tg.optimize's float32 routes through MKL as on an Intel CPU, whatever CPU runs the test: few-row
    linears and few-pixel convolutions on MKL's packed GEMM, oneDNN from 8M multiply-adds (NOTE: [MKL on
    other vendors' CPUs] in torchgraph/fused/cpu_profile.py)."""
    from torchgraph import fused

    if not (fused._common._HAS_ONEDNN and fused.weights._HAS_MKL_PACKED):
        pytest.skip("needs oneDNN and MKL's packed GEMM")
    monkeypatch.setattr(fused.linear, "MKL_PACKED_MAX_ROWS", 256)
    monkeypatch.setattr(fused.linear, "ONEDNN_LINEAR_MIN_MACS", 1 << 23)
    monkeypatch.setattr(fused.linear, "KERNEL_MAX_ROWS", 0)
    monkeypatch.setattr(fused.conv, "_MKL_CONV_GEMMS", True)
    monkeypatch.setattr(fused.attention, "_ONEDNN_ATTENTION", False)
    monkeypatch.setattr(fused.attention, "_TILED_ATTENTION", False)


@pytest.fixture
def any_size_attention(monkeypatch):
    """The oneDNN attention kernel on problems of any size, the test-sized ones included (NOTE: [Small
    attention on SDPA] sends those to SDPA): for tests of where the kernel runs, not of how large."""
    from torchgraph import fused

    monkeypatch.setattr(fused.attention, "ATTENTION_KERNEL_MIN_WORK", 0)


@pytest.fixture
def tiled_routes(monkeypatch):
    """Attention routed as on a CPU with AVX2 only, whatever CPU runs the test: float32 qkv_attention and SDPA
    calls on the kernels where their SIMD tiles pay (NOTE: [Tiled attention on AVX2] in
    torchgraph/fused/attention.py; elsewhere the kernels compute the same values with BLAS or oneDNN)."""
    from torchgraph import fused

    monkeypatch.setattr(fused.attention, "_ONEDNN_ATTENTION", False)
    monkeypatch.setattr(fused.attention, "_TILED_ATTENTION", True)


@pytest.fixture
def onednn_routes(monkeypatch):
    """tg.optimize's float32 routes as on a CPU of another vendor (AMD): every GEMM it places on oneDNN,
    from 2M multiply-adds, attention's products included (NOTE: [MKL on other vendors' CPUs])."""
    from torchgraph import fused

    if not fused._common._HAS_ONEDNN:
        pytest.skip("needs oneDNN")
    monkeypatch.setattr(fused.linear, "MKL_PACKED_MAX_ROWS", 0)
    monkeypatch.setattr(fused.linear, "ONEDNN_LINEAR_MIN_MACS", 1 << 21)
    monkeypatch.setattr(fused.conv, "_MKL_CONV_GEMMS", False)
    monkeypatch.setattr(fused.conv, "GEMM_KERNEL", False)  # as on AVX-512; AVX2: kernel_routes
    monkeypatch.setattr(fused.linear, "KERNEL_MAX_ROWS", 0)
    monkeypatch.setattr(fused.attention, "_ONEDNN_ATTENTION", True)
    monkeypatch.setattr(fused.attention, "_TILED_ATTENTION", False)


@pytest.fixture
def kernel_routes(onednn_routes, monkeypatch):
    """``onednn_routes`` as on a CPU of another vendor with AVX2 only: the convolutions' float32 GEMMs
    summing over 24+ inputs and linears summing over 24+ inputs into at most 4M outputs on
    torchgraph's kernel, ops.gemm_act_inference (NOTE: [GEMM kernel] in torchgraph/fused/conv.py,
    NOTE: [Linears on the GEMM kernel] in linear.py)."""
    from torchgraph import _extension, fused

    if not _extension.HAS_C_OPS:
        pytest.skip("torchgraph._C is not built")
    monkeypatch.setattr(fused.conv, "GEMM_KERNEL", True)
    monkeypatch.setattr(fused.linear, "KERNEL_MAX_ROWS", 1 << 62)
    monkeypatch.setattr(fused.linear, "KERNEL_MIN_FEATURES", 24)
    monkeypatch.setattr(fused.linear, "KERNEL_MAX_OUTPUT", 1 << 22)
    monkeypatch.setattr(fused.conv, "GEMM_KERNEL_MIN_DEPTH", 24)
