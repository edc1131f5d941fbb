"""The inference-only ops' autograd kernel (csrc/no_backward.cpp): nothing on the inference path, a
backward that raises where a gradient is asked for."""

import pytest
import torch

import torchgraph._extension as extension
import torchgraph.ops as ops
from torchgraph.ops.depthwise_conv2d_inference import taps_last

needs_c_ops = pytest.mark.skipif(not extension.HAS_C_OPS, reason="torchgraph._C is not built")

INFERENCE_OPS = ("gemm_act_inference", "depthwise_conv2d_inference", "winograd_conv2d_inference",
                 "expand_depthwise_conv2d_inference",
                 "implicit_gemm_conv2d_inference", "attention_inference", "max_pool2d_inference", "rms_norm_inference")


@needs_c_ops
@pytest.mark.parametrize("name", INFERENCE_OPS)
def test_autograd_kernel_is_the_cpp_one(name):
    """NOTE: [No backward in C++]: a Python autograd kernel cost ~17 us on every call, under no_grad too."""
    dump = torch._C._dispatch_dump(f"torchgraph::{name}")
    autograd = [line for line in dump.splitlines() if line.startswith("Autograd")]
    assert len(autograd) == 1 and "no_backward.cpp" in autograd[0], dump


def _depthwise(x):
    return ops.depthwise_conv2d_inference(x, taps_last(torch.randn(8, 1, 3, 3)), torch.randn(8), act="relu")


@needs_c_ops
def test_no_grad_output_has_no_history():
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    with torch.no_grad():
        y = _depthwise(x)
    assert not y.requires_grad and y.grad_fn is None


@needs_c_ops
def test_output_needing_grad_raises_on_backward_only():
    """The forward runs (same values as without grad); the backward names the op and the fix."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 5, 5)
    expected = _depthwise(x)
    torch.manual_seed(0)
    x = torch.randn(1, 8, 5, 5).requires_grad_()
    y = _depthwise(x)
    assert y.requires_grad and torch.equal(y.detach(), expected)
    assert y.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="depthwise_conv2d_inference has no backward. Where gradients"):
        torch.autograd.grad(y.sum(), x)


@needs_c_ops
def test_only_a_weight_needing_grad_still_raises():
    """A parameter that requires grad (a model not frozen) gets the raising backward too."""
    weight = torch.randn(4, 1, 3, 3, requires_grad=True)
    y = ops.depthwise_conv2d_inference(torch.randn(1, 4, 5, 5), weight, None)
    with pytest.raises(RuntimeError, match="has no backward"):
        y.sum().backward()
    assert weight.grad is None


def _autograd_excluded():
    return "AutogradOther" in str(torch._C._dispatch_tls_local_exclude_set())


def test_call_op_goes_below_autograd_under_no_grad_only():
    """NOTE: [Inference calls below autograd]: the ops with a Python backward skip its kernel under no_grad."""
    from torchgraph.ops._common import call_op

    with torch.no_grad():
        assert call_op(_autograd_excluded)
    assert not call_op(_autograd_excluded)


@needs_c_ops
def test_add_layer_norm_under_no_grad_matches_and_trains_outside():
    """The same values below autograd; with grad mode on, the backward is still there."""
    torch.manual_seed(0)
    x, r = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16)
    w, b = torch.randn(16), torch.randn(16)
    with torch.no_grad():
        out, summed = ops.add_layer_norm(x, r, w, b, 1e-5)
    assert out.grad_fn is None
    out2, summed2 = ops.add_layer_norm(x, r, w, b, 1e-5)
    assert torch.equal(out, out2.detach()) and torch.equal(summed, summed2.detach())
    (grad,) = torch.autograd.grad(out2.sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all()
