"""Tests for torchgraph.ops: fused kernels vs their pure-PyTorch references."""

import doctest
import importlib
import os
import pkgutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchgraph._extension as extension
import torchgraph.ops as ops

needs_c_ops = pytest.mark.skipif(not extension.HAS_C_OPS, reason="torchgraph._C is not built")

# bfloat16 kernels compute in float and round once; the references round each
# intermediate (e.g. x + bias) to bfloat16, hence a couple of bf16 ulps.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
}
SHAPES = [(7, 13), (1, 1), (3, 1027)]


def cpu_and_cuda():
    """Device parameters: cpu always, cuda only where a GPU is visible."""
    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="requires CUDA")
    return ("cpu", pytest.param("cuda", marks=needs_cuda))


def kernel_devices():
    """Devices with compiled kernels (for the tests that call torch.ops directly)."""
    needs_cuda_kernels = pytest.mark.skipif(
        not torch.cuda.is_available() or "cuda" not in ops._KERNEL_DEVICES,
        reason="requires CUDA and CUDA kernels",  # kernels can be built where no GPU is visible
    )
    return ("cpu", pytest.param("cuda", marks=needs_cuda_kernels))


@pytest.fixture(autouse=True)
def _seed():
    """Same random inputs on every run, so tolerance checks cannot flake."""
    torch.manual_seed(0)


@pytest.fixture(params=["kernel", "reference"])
def path(request, monkeypatch):
    """Runs a test through the compiled kernels and again through the reference fallback."""
    if request.param == "kernel":
        if not extension.HAS_C_OPS:
            pytest.skip("torchgraph._C is not built")
    else:
        monkeypatch.setattr(extension, "HAS_C_OPS", False)
    return request.param


def randn(*shape, device="cpu", dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)


def grads(outputs, inputs):
    """Gradients of sum(output * fixed random weights) w.r.t. inputs."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(0)
    loss = sum(
        (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outputs
    )
    return torch.autograd.grad(loss, inputs)


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def leaf_copies(*tensors):
    """Fresh leaf copies of tensors, so op and reference get independent graphs."""
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


# ---------------------------------------------------------------------------- bias_act

BIAS_ACT_CASES = [  # (x shape, dim)
    *[(shape, -1) for shape in SHAPES],
    ((2, 5, 9, 11), 1),  # NCHW conv epilogue
    ((2, 3, 1, 1), 1),
    ((4, 3, 5), 0),
]


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape, dim", BIAS_ACT_CASES)
def test_bias_act_matches_reference(device, dtype, act, shape, dim):
    """bias_act and its gradients match reference_bias_act."""
    x = randn(*shape, device=device, dtype=dtype, requires_grad=True)
    bias = randn(shape[dim], device=device, dtype=dtype, requires_grad=True)
    out = ops.bias_act(x, bias, act, dim)
    x_ref, bias_ref = leaf_copies(x, bias)
    expected = ops.reference_bias_act(x_ref, bias_ref, act, dim)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected, dtype)
    # bf16: grad_bias sums hundreds of terms that the reference rounds one by one
    grad_tol = TOLERANCES[dtype] if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    for got, want in zip(grads(out, (x, bias)), grads(expected, (x_ref, bias_ref))):
        torch.testing.assert_close(got, want, **grad_tol)


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_bias_act_float32_accuracy_over_range(device, act):
    """float32 values and gradients stay within a few ulps of float64 over [-10, 10]."""
    z = torch.linspace(-10, 10, 20011, device=device).reshape(1, -1)
    zero = torch.zeros(z.shape[-1], device=device)
    z64 = z.double().requires_grad_()
    exact = ops.reference_bias_act(z64, zero.double(), act)
    (exact_grad,) = torch.autograd.grad(exact.sum(), z64)
    z32 = z.clone().requires_grad_()
    out = ops.bias_act(z32, zero, act)
    (grad,) = torch.autograd.grad(out.sum(), z32)
    torch.testing.assert_close(out.double(), exact.detach(), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(grad.double(), exact_grad, atol=2e-6, rtol=1e-6)


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bias_act_non_contiguous_inputs(device):
    """Transposed x and a strided bias give the reference's values."""
    x = randn(13, 7, device=device).t()
    bias = randn(26, device=device)[::2]
    out = ops.bias_act(x, bias, "gelu")
    assert_close(out, ops.reference_bias_act(x, bias, "gelu"), torch.float32)
    assert out.is_contiguous()


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bias_act_channels_last_keeps_layout(device):
    """A channels_last conv output keeps its layout and gets the per-channel bias."""
    x = randn(2, 6, 5, 7, device=device).to(memory_format=torch.channels_last)
    bias = randn(6, device=device)
    out = ops.bias_act(x, bias, "silu", dim=1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, F.silu(x + bias[:, None, None]), torch.float32)


@needs_c_ops
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize(
    "shape, dim, act, channels_last",
    [
        ((7, 13), -1, "gelu", False),
        ((2, 5, 3, 4), 1, "relu", False),
        ((2, 5, 3, 4), 1, "silu", True),
    ],
)
def test_bias_act_opcheck(device, shape, dim, act, channels_last):
    """torch.library.opcheck passes (schema, fake kernel, autograd registration, AOT)."""
    x = randn(*shape, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    bias = randn(shape[dim], device=device, requires_grad=True)
    args = (x.requires_grad_(), bias, act, dim)
    torch.library.opcheck(torch.ops.torchgraph.bias_act.default, args)


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("act", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape, dim", [((3, 5), -1), ((2, 3, 2, 3), 1)])
def test_bias_act_gradcheck(device, act, shape, dim):
    """Gradients of bias_act pass gradcheck in double precision."""
    x = randn(*shape, device=device, dtype=torch.float64, requires_grad=True)
    bias = randn(shape[dim], device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: ops.bias_act(x, b, act, dim), (x, bias))


@pytest.mark.parametrize(
    "x_shape, bias_shape, kwargs, match",
    [
        ((4, 8), (8,), {"act": "tanh"}, r"bias_act: act must be one of .*got 'tanh'"),
        (
            (4, 8),
            (4,),
            {"act": "relu"},
            r"bias_act: bias must have shape \[8\] \(x.size\(-1\)\), got \[4\]",
        ),
        (
            (4, 8),
            (8,),
            {"act": "relu", "dim": 2},
            r"bias_act: dim must be in \[-2, 1\] for x of shape \[4, 8\], got 2",
        ),
        ((4, 8), (1, 8), {"act": "relu"}, r"bias_act: bias must have shape \[8\]"),
    ],
)
def test_bias_act_bad_inputs_raise(path, x_shape, bias_shape, kwargs, match):
    """Bad arguments raise the same message through the kernel and the reference."""
    with pytest.raises(RuntimeError, match=match):
        ops.bias_act(torch.randn(x_shape), torch.randn(bias_shape), **kwargs)


def test_bias_act_bias_dtype_mismatch_raises(path):
    """A bias with another dtype than x is rejected (no silent promotion)."""
    with pytest.raises(RuntimeError, match=r"bias_act: bias dtype must equal x dtype"):
        ops.bias_act(torch.randn(4, 8), torch.randn(8, dtype=torch.float64), "relu")


# ---------------------------------------------------------------------------- add_relu


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [*SHAPES, (2, 5, 9, 11)])
def test_add_relu_matches_reference(device, dtype, shape):
    """add_relu and its gradients match reference_add_relu."""
    a = randn(*shape, device=device, dtype=dtype, requires_grad=True)
    b = randn(*shape, device=device, dtype=dtype, requires_grad=True)
    out = ops.add_relu(a, b)
    a_ref, b_ref = leaf_copies(a, b)
    expected = ops.reference_add_relu(a_ref, b_ref)
    assert_close(out, expected, dtype)
    for got, want in zip(grads(out, (a, b)), grads(expected, (a_ref, b_ref))):
        assert_close(got, want, dtype)


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_add_relu_non_contiguous_and_channels_last(device):
    """Sliced inputs are handled; a channels_last input keeps its layout."""
    a = randn(8, 26, device=device)[:, ::2]
    b = randn(13, 8, device=device).t()
    assert_close(ops.add_relu(a, b), torch.relu(a + b), torch.float32)
    a4 = randn(2, 4, 3, 5, device=device).to(memory_format=torch.channels_last)
    b4 = randn(2, 4, 3, 5, device=device)  # other layout: copied to a's
    out = ops.add_relu(a4, b4)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, torch.relu(a4 + b4), torch.float32)


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_add_relu_propagates_nan(device):
    """NaN in the sum stays NaN, as with torch.relu."""
    a = torch.tensor([float("nan"), -1.0, 2.0], device=device)
    out = ops.add_relu(a, torch.zeros(3, device=device))
    assert torch.isnan(out[0]) and out[1:].tolist() == [0.0, 2.0]


@needs_c_ops
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("channels_last", [False, True])
def test_add_relu_opcheck(device, channels_last):
    """torch.library.opcheck passes for add_relu."""
    a, b = randn(2, 3, 4, 5, device=device), randn(2, 3, 4, 5, device=device)
    if channels_last:
        a = a.to(memory_format=torch.channels_last)
    torch.library.opcheck(
        torch.ops.torchgraph.add_relu.default, (a.requires_grad_(), b.requires_grad_())
    )


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_add_relu_gradcheck(device):
    """Gradients of add_relu pass gradcheck in double precision."""
    a = randn(4, 7, device=device, dtype=torch.float64, requires_grad=True)
    b = randn(4, 7, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.add_relu, (a, b))


@pytest.mark.parametrize(
    "b, match",
    [
        (
            torch.randn(1, 8),
            r"add_relu: b must have a's shape \[4, 8\], got \[1, 8\] "
            r"\(add_relu does not broadcast\)",
        ),
        (torch.randn(4, 8, dtype=torch.float64), r"add_relu: b dtype must equal a dtype"),
    ],
)
def test_add_relu_bad_inputs_raise(path, b, match):
    """Mismatched shapes or dtypes raise the same message on both paths."""
    with pytest.raises(RuntimeError, match=match):
        ops.add_relu(torch.randn(4, 8), b)


# ---------------------------------------------------------------------------- add_layer_norm


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [*SHAPES, (2, 3, 64)])
@pytest.mark.parametrize("affine", [True, False])
def test_add_layer_norm_matches_reference(device, dtype, shape, affine):
    """add_layer_norm's two outputs and all gradients match the reference."""
    x = randn(*shape, device=device, dtype=dtype, requires_grad=True)
    residual = randn(*shape, device=device, dtype=dtype, requires_grad=True)
    params = []
    if affine:
        params = [
            randn(shape[-1], device=device, dtype=dtype, requires_grad=True) for _ in range(2)
        ]
    out = ops.add_layer_norm(x, residual, *params, eps=1e-5)
    inputs_ref = leaf_copies(x, residual, *params)
    expected = ops.reference_add_layer_norm(*inputs_ref, eps=1e-5)
    for got, want in zip(out, expected):
        assert_close(got, want, dtype)
    if dtype == torch.bfloat16:
        return  # see test_add_layer_norm_bfloat16_gradients_near_float
    # gradients scale with rstd (316 for a constant row), so rounding noise grows too
    for got, want in zip(grads(out, (x, residual, *params)), grads(expected, inputs_ref)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_add_layer_norm_bfloat16_gradients_near_float(device):
    """bfloat16 gradients stay close to the float32 gradients of the same inputs."""
    x, residual, weight = (
        randn(*shape, device=device, requires_grad=True) for shape in [(8, 64), (8, 64), (64,)]
    )
    ref_grads = grads(ops.add_layer_norm(x, residual, weight), (x, weight))
    low = [t.detach().bfloat16().requires_grad_() for t in (x, residual, weight)]
    got = grads(ops.add_layer_norm(*low), (low[0], low[2]))
    for g, r in zip(got, ref_grads):
        torch.testing.assert_close(g.float(), r, atol=5e-2, rtol=5e-2)


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_add_layer_norm_non_contiguous_inputs(device):
    """Transposed and sliced inputs give the reference's values."""
    x = randn(33, 5, device=device).t()
    residual = randn(5, 66, device=device)[:, ::2]
    weight = randn(66, device=device)[::2]
    out, residual_out = ops.add_layer_norm(x, residual, weight, None)
    expected_out, expected_residual = ops.reference_add_layer_norm(x, residual, weight, None)
    assert_close(out, expected_out, torch.float32)
    assert_close(residual_out, expected_residual, torch.float32)


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_add_layer_norm_grad_through_one_output(device):
    """Using only one of the two outputs still gives the right gradients."""
    x, residual, weight, bias = (
        randn(*shape, device=device, requires_grad=True)
        for shape in [(4, 16), (4, 16), (16,), (16,)]
    )
    for pick in (0, 1):
        out = ops.add_layer_norm(x, residual, weight, bias)[pick]
        expected = ops.reference_add_layer_norm(x, residual, weight, bias)[pick]
        got = grads(out, (x, residual))
        want = grads(expected, (x, residual))
        for g, w in zip(got, want):
            assert_close(g, w, torch.float32)


@needs_c_ops
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("affine", [True, False])
def test_add_layer_norm_opcheck(device, affine):
    """torch.library.opcheck passes for add_layer_norm."""
    x, residual = randn(3, 2, 10, device=device), randn(3, 2, 10, device=device)
    params = [None, None]
    if affine:
        params = [randn(10, device=device, requires_grad=True) for _ in range(2)]
    torch.library.opcheck(
        torch.ops.torchgraph.add_layer_norm.default,
        (x.requires_grad_(), residual.requires_grad_(), *params, 1e-5),
    )


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_add_layer_norm_gradcheck(device):
    """Gradients of add_layer_norm (both outputs) pass gradcheck in double precision."""
    inputs = [
        randn(*shape, device=device, dtype=torch.float64, requires_grad=True)
        for shape in [(3, 7), (3, 7), (7,), (7,)]
    ]
    assert torch.autograd.gradcheck(lambda *t: ops.add_layer_norm(*t, eps=1e-5), inputs)


@pytest.mark.parametrize(
    "residual_shape, weight_shape, eps, match",
    [
        ((4, 9), (8,), 1e-5, r"residual must have x's shape \[4, 8\], got \[4, 9\]"),
        ((4, 8), (4,), 1e-5, r"weight must have shape \[8\] \(x.size\(-1\)\), got \[4\]"),
        ((4, 8), (8,), -1.0, r"eps must be non-negative, got -1"),
    ],
)
def test_add_layer_norm_bad_inputs_raise(path, residual_shape, weight_shape, eps, match):
    """Mismatched shapes or a negative eps raise the same message on both paths."""
    x, residual, weight = torch.randn(4, 8), torch.randn(residual_shape), torch.randn(weight_shape)
    with pytest.raises(RuntimeError, match="add_layer_norm: " + match):
        ops.add_layer_norm(x, residual, weight, None, eps)


# ---------------------------------------------------------------------------- max_pool2d_inference

POOL_CASES = [  # (input shape, kwargs)
    ((2, 3, 32, 32), {"kernel_size": 3, "stride": 2, "padding": 1}),  # ResNet stem
    ((1, 2, 7, 13), {"kernel_size": 2}),
    ((3, 7, 13), {"kernel_size": 3, "stride": 1, "padding": 1}),  # 3-D input
    (
        (2, 2, 9, 10),
        {
            "kernel_size": (3, 2),
            "stride": (2, 1),
            "padding": (1, 0),
            "dilation": (2, 1),
            "ceil_mode": True,
        },
    ),
    ((1, 1, 1, 1), {"kernel_size": 1}),
    ((1, 40, 57, 75), {"kernel_size": 3, "stride": 2, "padding": 1}),  # whole vector steps + tails
]


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape, kwargs", POOL_CASES)
def test_max_pool2d_inference_matches_reference(device, dtype, channels_last, shape, kwargs):
    """Values (exact) and output layout match F.max_pool2d."""
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs a 4-D input")
    x = randn(*shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = ops.max_pool2d_inference(x, **kwargs)
    expected = ops.reference_max_pool2d_inference(x, **kwargs)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    if channels_last and x.shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


@needs_c_ops
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_max_pool2d_inference_non_contiguous_and_nan(device):
    """A sliced input is handled and NaN propagates like F.max_pool2d."""
    x = randn(2, 3, 12, 20, device=device)[:, :, :, ::2]
    x[0, 0, 0, 0] = float("nan")
    out = ops.max_pool2d_inference(x, 3, 2, 1)
    torch.testing.assert_close(out, F.max_pool2d(x, 3, 2, 1), equal_nan=True)
    assert torch.isnan(out[0, 0, 0, 0])


@needs_c_ops
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool2d_inference_opcheck(device, channels_last):
    """torch.library.opcheck passes for max_pool2d_inference (no-grad inputs)."""
    x = randn(2, 3, 9, 8, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    torch.library.opcheck(
        torch.ops.torchgraph.max_pool2d_inference.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], True)
    )


@needs_c_ops
def test_max_pool2d_inference_backward_raises():
    """The forward works on inputs that require grad; asking for a gradient raises."""
    x = randn(1, 2, 6, 6, requires_grad=True)
    out = ops.max_pool2d_inference(x, 2)
    with pytest.raises(RuntimeError, match="max_pool2d_inference has no backward"):
        out.sum().backward()


@pytest.mark.parametrize(
    "shape, args, match",
    [
        ((2, 8, 8), (3, 1, 2), r"padding must be non-negative and at most half of kernel_size, "
         r"got padding=\[2, 2\]"),
        ((8, 8), (2,), r"x must be 3-D \(C, H, W\) or 4-D \(N, C, H, W\) with non-zero C, H, W, "
         r"got shape \[8, 8\]"),
        ((1, 1, 2, 2), (3, 1, 0), r"output size 0x0 is too small for input of shape \[1, 1, 2, "),
        ((1, 1, 4, 4), (0,), r"kernel_size, stride and dilation must be positive"),
    ],
)
def test_max_pool2d_inference_bad_inputs_raise(path, shape, args, match):
    """Invalid pooling arguments raise the same message on both paths."""
    with pytest.raises(RuntimeError, match=match):
        ops.max_pool2d_inference(torch.randn(shape), *args)


# ---------------------------------------------------------------------------- all ops


@needs_c_ops
@pytest.mark.parametrize(
    "op, shapes, extra",
    [
        (ops.bias_act, [(300, 1024), (1024,)], ("gelu", -1)),
        (ops.bias_act, [(8, 64, 32, 32), (64,)], ("silu", 1)),
        (ops.add_layer_norm, [(300, 512), (300, 512), (512,), (512,)], ()),
    ],
)
def test_parallel_column_sums_match_reference_and_repeat(op, shapes, extra):
    """Sizes large enough to split bias/weight gradients over threads: right and reproducible."""
    inputs = [randn(*s, requires_grad=True) for s in shapes]
    reference = ops.reference_for(op)
    got = grads(op(*inputs, *extra), inputs)
    again = grads(op(*inputs, *extra), inputs)
    ref_inputs = leaf_copies(*inputs)
    want = grads(reference(*ref_inputs, *extra), ref_inputs)
    for g, a, w in zip(got, again, want):
        assert torch.equal(g, a)
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-4)


@needs_c_ops
@pytest.mark.parametrize(
    "name, args",
    [
        ("bias_act", ((2, 5, 4, 4), (5,), "gelu", 1)),
        ("bias_act", ((4, 8), (8,), "silu")),
        ("add_relu", ((4, 8), (4, 8))),
        ("add_layer_norm", ((4, 8), (4, 8), (8,), (8,), 1e-5)),
        ("max_pool2d_inference", ((1, 2, 8, 8), [3, 3], [2, 2], [1, 1])),
    ],
)
def test_reference_for_swaps_op_for_same_result(name, args):
    """reference_for(op) takes the op's exact arguments and returns the same values."""
    op = getattr(torch.ops.torchgraph, name).default
    args = [torch.randn(a) if isinstance(a, tuple) else a for a in args]
    reference = ops.reference_for(op)
    assert reference is ops.reference_for(op.name()) is ops.REFERENCES[op.name()]
    torch.testing.assert_close(op(*args), reference(*args))


def test_reference_for_accepts_packets_wrappers_and_names():
    """reference_for maps every spelling of an op to its reference, and others to None."""
    assert ops.reference_for("add_relu") is ops.reference_add_relu
    assert ops.reference_for(ops.max_pool2d_inference) is ops.reference_max_pool2d_inference
    if extension.HAS_C_OPS:
        assert ops.reference_for(torch.ops.torchgraph.bias_act) is ops.reference_bias_act
    assert ops.reference_for(torch.ops.aten.relu.default) is None
    assert ops.reference_for(len) is None


class _Block(torch.nn.Module):
    """Uses every op: conv-style epilogue, residual add, pooling, pre-LN add."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(4))
        self.ln_weight = torch.nn.Parameter(torch.randn(4))

    def forward(self, x, skip):
        y = ops.bias_act(x, self.bias, "relu", dim=1)
        y = ops.add_relu(y, skip)
        y = ops.max_pool2d_inference(y, 3, 2, 1)
        tokens = y.flatten(2).transpose(1, 2)  # (N, HW, C)
        out, stream = ops.add_layer_norm(tokens, tokens, self.ln_weight, None)
        return ops.bias_act(out, self.bias, "gelu") + stream


def _block_inputs():
    return torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)


@needs_c_ops
def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) traces the wrappers without graph breaks."""
    torch._dynamo.reset()
    block = _Block().eval()
    inputs = _block_inputs()
    with torch.no_grad():
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(*inputs), block(*inputs))


@needs_c_ops
def test_export_keeps_fused_ops():
    """torch.export records each fused op as one node and the program runs."""
    block = _Block().eval()
    inputs = _block_inputs()
    with torch.no_grad():
        program = torch.export.export(block, inputs)
        targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
        assert {
            torch.ops.torchgraph.bias_act.default,
            torch.ops.torchgraph.add_relu.default,
            torch.ops.torchgraph.max_pool2d_inference.default,
            torch.ops.torchgraph.add_layer_norm.default,
        } <= targets
        torch.testing.assert_close(program.module()(*inputs), block(*inputs))


@needs_c_ops
@pytest.mark.parametrize(
    "call",
    [
        lambda x: torch.ops.torchgraph.bias_act(x, x[0], "gelu"),
        lambda x: torch.ops.torchgraph.add_relu(x, x),
        lambda x: torch.ops.torchgraph.add_layer_norm(x, x, None, None),
        lambda x: torch.ops.torchgraph.max_pool2d_inference(x, [2, 2]),
    ],
)
def test_symbolic_trace_records_one_node(call):
    """torch.fx.symbolic_trace records a torchgraph op as a single call_function node."""

    class Module(torch.nn.Module):
        def forward(self, x):
            return call(x)

    graph = torch.fx.symbolic_trace(Module()).graph
    fused = [n for n in graph.nodes if n.op == "call_function" and "torchgraph" in str(n.target)]
    assert len(fused) == 1


def test_reference_fallback_when_c_ops_disabled(monkeypatch):
    """With HAS_C_OPS off the wrappers run the references (standard autograd nodes)."""
    monkeypatch.setattr(extension, "HAS_C_OPS", False)
    torch._dynamo.reset()  # compiled frames guard on the flag; start clean
    x = randn(3, 8, requires_grad=True)
    bias = randn(8, requires_grad=True)
    out = ops.bias_act(x, bias, "gelu")
    assert "Gelu" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, F.gelu(x + bias))
    out, residual_out = ops.add_layer_norm(x, x, bias, bias)
    assert "LayerNorm" in type(out.grad_fn).__name__
    assert "Relu" in type(ops.add_relu(x, x).grad_fn).__name__
    pooled = ops.max_pool2d_inference(x[None, None], 2)
    pooled.sum().backward()  # the reference is differentiable
    assert x.grad is not None


@needs_c_ops
def test_kernel_path_is_used_when_available():
    """With HAS_C_OPS on, the wrappers dispatch to the compiled ops."""
    x = randn(3, 8, requires_grad=True)
    out = ops.bias_act(x, randn(8), "gelu")
    assert "torchgraph_bias_act" in type(out.grad_fn).__name__


@needs_c_ops
def test_float16_goes_to_reference():
    """Dtypes without a kernel (float16) use the reference; the raw op rejects them."""
    x, bias = torch.randn(4, 8, dtype=torch.float16), torch.randn(8, dtype=torch.float16)
    torch.testing.assert_close(ops.bias_act(x, bias, "relu"), torch.relu(x + bias))
    message = "bias_act: x must be float32, float64 or bfloat16, got Half"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.torchgraph.bias_act(x, bias, "relu")


def test_env_var_disables_c_ops_silently():
    """TORCHGRAPH_DISABLE_C_OPS=1 forces the references and warns nothing."""
    code = (
        "import warnings; warnings.simplefilter('error'); "
        "import torchgraph.ops as ops, torchgraph._extension as e; "
        "import torch; x = torch.randn(2, 3); "
        "assert not e.HAS_C_OPS and ops.add_relu(x, x).equal(torch.relu(x + x)); print('ok')"
    )
    env = {**os.environ, extension.DISABLE_ENV_VAR: "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


OP_MODULES = ["torchgraph.ops"] + [f"torchgraph.ops.{m.name}" for m in pkgutil.iter_modules(ops.__path__)]


@pytest.mark.parametrize("name", OP_MODULES)
def test_docstring_examples_run(name):
    """The Example sections of torchgraph.ops and of each op's module run as doctests."""
    module = importlib.import_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0 or name.endswith("_common")


def test_each_op_has_its_module():
    """One module per op (as torchvision lays out its ops); torchgraph.ops re-exports each wrapper."""
    for qualified in ops.REFERENCES:
        name = qualified.split("::")[1]
        module = importlib.import_module(f"torchgraph.ops.{name}")
        assert getattr(ops, name) is getattr(module, name)
        assert ops.reference_for(getattr(ops, name)) is getattr(module, f"reference_{name}")


# ---------------------------------------------------------------------------- qkv_attention

QKV_CASES = [  # (B, T, heads, D)
    (1, 1, 1, 4),  # one token: softmax over a single key
    (2, 7, 3, 5),  # odd sizes everywhere
    (2, 65, 2, 8),  # one full 64-row causal block plus a one-row block
    (1, 130, 2, 4),  # two full blocks and a ragged 2-row end
    (1, 33, 3, 40),  # tile edges of the AVX2 forward; its bfloat16 gradient needs NOTE: [Row sums from P]
]


def qkv_input(b, t, heads, d, dtype=torch.float32, requires_grad=False):
    return randn(b, t, 3 * heads * d, dtype=dtype, requires_grad=requires_grad)


@needs_c_ops
@pytest.mark.parametrize("onednn", [False, True], ids=["blas", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("b, t, heads, d", QKV_CASES)
def test_qkv_attention_matches_reference(dtype, causal, scale, b, t, heads, d, onednn):
    """The kernel's out, probs and grad of qkv match reference_qkv_attention, with its products on
    BLAS and on oneDNN (NOTE: [Attention GEMMs on oneDNN])."""
    qkv = qkv_input(b, t, heads, d, dtype, requires_grad=True)
    out, probs = torch.ops.torchgraph.qkv_attention.default(qkv, heads, causal, scale, onednn)
    (qkv_ref,) = leaf_copies(qkv)
    expected, expected_probs = ops.reference_qkv_attention(qkv_ref, heads, causal, scale)
    assert out.shape == (b, t, heads * d) and out.dtype == dtype
    assert probs.shape == (b, heads, t, t) and probs.dtype == expected_probs.dtype
    assert_close(out, expected, dtype)
    # probs are float32 for bfloat16 input and computed in float32 on both sides
    assert_close(probs, expected_probs, torch.float32)
    if causal:
        assert not probs.triu(1).any()  # masked keys get exactly zero weight
    # Both sides compute the bfloat16 gradient in float32 and round it to bfloat16 once, so they
    # differ by at most one bf16 ulp (measured: 0.0156 on entries of magnitude ~2.3, i.e. 2^-6):
    # TOLERANCES[bfloat16] (atol 1e-2 + rtol 1.6e-2) covers that without loosening.
    got = grads(ops.qkv_attention(qkv, heads, causal, scale, onednn=onednn), (qkv,))
    want = grads(expected, (qkv_ref,))
    assert_close(got[0], want[0], dtype)


@needs_c_ops
@pytest.mark.parametrize("onednn", [False, True], ids=["blas", "onednn"])
def test_qkv_attention_bfloat16_gradient_as_accurate_as_float32_math(onednn):
    """The bfloat16 gradient is as close to float64 as the same math in float32 rounded once (the
    reference), and closer than eager SDPA in bfloat16: the backward's row sums read the float32
    probabilities, not the rounded output (NOTE: [Row sums from P] in csrc/cpu/qkv_attention.cpp; reading
    the output it was 0.022 against the reference's 0.0102 on this shape)."""
    b, t, heads, d, scale = 1, 33, 3, 40, 0.3
    qkv = qkv_input(b, t, heads, d, torch.bfloat16, requires_grad=True)
    grad_out = randn(b, t, heads * d, dtype=torch.bfloat16)
    exact = qkv.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(ops.reference_qkv_attention(exact, heads, True, scale)[0], exact,
                                  grad_out.double())
    (got,) = torch.autograd.grad(ops.qkv_attention(qkv, heads, True, scale, onednn=onednn), qkv, grad_out)
    (qkv_ref,) = leaf_copies(qkv)
    (reference,) = torch.autograd.grad(ops.reference_qkv_attention(qkv_ref, heads, True, scale)[0], qkv_ref,
                                       grad_out)
    q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in qkv_ref.chunk(3, dim=-1))
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2).flatten(2)
    (eager,) = torch.autograd.grad(sdpa, qkv_ref, grad_out)

    def error(g):
        return (g.double() - want).abs().max().item()

    assert error(got) <= 1.25 * error(reference)
    assert error(got) < error(eager)


@needs_c_ops
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b, t, heads, d", [
    (2, 19, 2, 17),  # 3 six-row tiles + 1 row; a key panel of 16 + 3 keys; features 16 + 1
    (1, 33, 3, 40),  # 5 six-row tiles + 3 rows; 2 panels + 1 key; features 16 + 16 + 8
    (2, 6, 1, 16),  # exactly one tile of rows and one of features
])
def test_qkv_attention_float32_tile_edges(causal, b, t, heads, d):
    """Shapes at the edges of the tiled float32 forward of AVX2 builds (NOTE: [Tiled attention on AVX2] in
    csrc/cpu/attention_tiles.h; elsewhere the BLAS forward runs them): out, probs and the gradient match the
    float64 reference."""
    qkv = qkv_input(b, t, heads, d, requires_grad=True)
    out, probs = torch.ops.torchgraph.qkv_attention.default(qkv, heads, causal, None, False)
    exact = qkv.detach().double().requires_grad_(True)
    expected, expected_probs = ops.reference_qkv_attention(exact, heads, causal, None)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.double(), expected_probs, atol=1e-6, rtol=1e-5)
    if causal:
        assert not probs.triu(1).any()
    grad_out = randn(*out.shape)
    (got,) = torch.autograd.grad(ops.qkv_attention(qkv, heads, causal), qkv, grad_out)
    (want,) = torch.autograd.grad(expected, exact, grad_out.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@needs_c_ops
def test_qkv_attention_onednn_workspace_reused_across_shapes_and_threads():
    """The oneDNN forward's per-thread workspace (NOTE: [Attention workspace]) holds the intermediates
    of one call at a time: calls of growing, shrinking and over-the-cap sizes, float32 and bfloat16,
    and two threads at once all give the reference's values."""
    import threading

    def check(b, t, heads, d, dtype, causal):
        qkv = qkv_input(b, t, heads, d, dtype)
        out, probs = torch.ops.torchgraph.qkv_attention.default(qkv, heads, causal, None, True)
        expected, expected_probs = ops.reference_qkv_attention(qkv, heads, causal)
        assert_close(out, expected, dtype)
        assert_close(probs, expected_probs, torch.float32)

    shapes = [(2, 33, 3, 8), (8, 128, 4, 64), (1, 5, 1, 4), (4, 512, 16, 64), (2, 65, 2, 16)]  # 4 x 512: 32 MiB (f32), 58 (bf16)
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            for shape in shapes:
                check(*shape, dtype, causal)
    errors = []

    def worker(shape):
        try:
            for _ in range(3):
                check(*shape, torch.float32, True)
        except AssertionError as error:  # surfaced below: pytest does not see a thread's failure
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(shape,)) for shape in ((8, 128, 4, 64), (2, 97, 3, 32))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


@needs_c_ops
@pytest.mark.parametrize("causal", [False, True])
def test_qkv_attention_onednn_bfloat16_as_accurate_as_sdpa(causal):
    """bfloat16 on oneDNN keeps the scores in float32 (NOTE: [Attention GEMMs on oneDNN]): on a peaky
    softmax (scores with std ~16) its error against float64 attention on the same rounded inputs is
    SDPA's bfloat16 kernel's (rounding the scores to bfloat16 first made it ~6x larger on average
    and ~25x at the worst entry)."""
    heads = 4
    qkv = (qkv_input(8, 128, heads, 64) * 4).bfloat16()
    exact, _ = ops.reference_qkv_attention(qkv.double(), heads, causal)
    ours, _ = torch.ops.torchgraph.qkv_attention.default(qkv, heads, causal, None, True)
    q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).flatten(2)
    ours_err, sdpa_err = (ours.double() - exact).abs(), (sdpa.double() - exact).abs()
    assert ours_err.mean() <= 1.5 * sdpa_err.mean()
    assert ours_err.max() <= 2.5 * sdpa_err.max()


@needs_c_ops
@pytest.mark.parametrize("causal", [False, True])
def test_qkv_attention_default_scale_is_inverse_sqrt_head_dim(causal):
    """scale=None means 1 / sqrt(D) (SDPA's default), the same as passing it explicitly."""
    qkv = qkv_input(2, 9, 2, 16)
    default = torch.ops.torchgraph.qkv_attention.default(qkv, 2, causal, None)
    explicit = torch.ops.torchgraph.qkv_attention.default(qkv, 2, causal, 0.25)
    for got, want in zip(default, explicit):
        assert_close(got, want, torch.float32)


@needs_c_ops
@pytest.mark.parametrize("onednn", [False, True], ids=["blas", "onednn"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_grad"])
def test_qkv_attention_non_contiguous_inputs(causal, layout, onednn):
    """Transposed and sliced qkv, and a stride-0 grad_out (from .sum()), give the reference's
    values and gradients."""
    b, t, heads, d = 2, 67, 3, 4
    width = 3 * heads * d
    if layout == "transposed":
        qkv = randn(t, b, width).transpose(0, 1)
    elif layout == "sliced":
        qkv = randn(b, t, width + 10)[:, :, 3 : 3 + width]
    else:
        qkv = randn(b, t, width)
    if layout != "expanded_grad":
        assert not qkv.is_contiguous()
    qkv.requires_grad_()
    out = ops.qkv_attention(qkv, heads, causal, onednn=onednn)
    (qkv_ref,) = leaf_copies(qkv)
    expected, _ = ops.reference_qkv_attention(qkv_ref, heads, causal)
    assert "torchgraph_qkv_attention" in type(out.grad_fn).__name__
    assert_close(out, expected, torch.float32)
    if layout == "expanded_grad":
        (got,) = torch.autograd.grad(out.sum(), qkv)
        (want,) = torch.autograd.grad(expected.sum(), qkv_ref)
    else:
        (got,), (want,) = grads(out, (qkv,)), grads(expected, (qkv_ref,))
    assert_close(got, want, torch.float32)


@needs_c_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_qkv_attention_opcheck(dtype, causal):
    """torch.library.opcheck passes for qkv_attention (schema, fake kernel, autograd, AOT)."""
    op = torch.ops.torchgraph.qkv_attention.default
    qkv = qkv_input(2, 5, 3, 2, dtype, requires_grad=True)
    torch.library.opcheck(op, (qkv, 3, causal, None))
    torch.library.opcheck(op, (qkv, 3, causal, 0.5))
    torch.library.opcheck(op, (qkv, 3, causal, 0.5, True))


@needs_c_ops
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b, t, heads, d, scale", [(2, 5, 3, 2, None), (1, 67, 2, 1, 0.7)])
def test_qkv_attention_gradcheck(causal, b, t, heads, d, scale):
    """Gradients of ops.qkv_attention pass gradcheck in float64 (T=67: two causal blocks)."""
    qkv = qkv_input(b, t, heads, d, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.qkv_attention(x, heads, causal, scale), (qkv,))


@pytest.mark.parametrize(
    "shape, heads, match",
    [
        (
            (4, 24),
            2,
            r"qkv_attention: qkv must be 3-D \(batch, seq, 3 \* embed\), got shape \[4, 24\]",
        ),
        ((2, 3, 20), 2, r"qkv_attention: qkv.size\(2\) must be 3 \* heads \* head_dim with "
         r"head_dim >= 1, got 20 for heads=2"),
        ((2, 3, 0), 2, r"qkv_attention: qkv.size\(2\) must be 3 \* heads \* head_dim with "
         r"head_dim >= 1, got 0 for heads=2"),
        ((2, 3, 24), 0, r"qkv_attention: heads must be positive, got 0"),
        ((2, 3, 24), -3, r"qkv_attention: heads must be positive, got -3"),
    ],
)
def test_qkv_attention_bad_inputs_raise(path, shape, heads, match):
    """Bad arguments raise the same message through the kernel and the reference."""
    with pytest.raises(RuntimeError, match=match):
        ops.qkv_attention(torch.randn(shape), heads)


@needs_c_ops
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_qkv_attention_int_dtype_raises(device):
    """The raw op (C++ kernel, and the fake kernel on meta) rejects integer qkv."""
    qkv = torch.zeros(2, 3, 12, dtype=torch.int64, device=device)
    match = r"qkv_attention: qkv must be float32, float64 or bfloat16, got (Long|torch.int64)"
    with pytest.raises(RuntimeError, match=match):
        torch.ops.torchgraph.qkv_attention(qkv, 2, False)


@needs_c_ops
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_qkv_attention_backward_bad_grad_out_raises(device):
    """The backward op (and its fake kernel) rejects a grad_out whose shape is not out's."""
    qkv = qkv_input(2, 5, 2, 4).to(device)
    out, probs = torch.ops.torchgraph.qkv_attention(qkv, 2, True)
    bad = torch.randn(2, 5, 7, device=device)
    with pytest.raises(
        RuntimeError,
        match=r"qkv_attention_backward: grad_out must have shape \[2, 5, 8\], got \[2, 5, 7\]",
    ):
        torch.ops.torchgraph.qkv_attention_backward(bad, qkv, out, probs, 2, True, None)


def test_qkv_attention_reference_for():
    """reference_for maps every spelling of qkv_attention to reference_qkv_attention."""
    assert ops.reference_for("qkv_attention") is ops.reference_qkv_attention
    assert ops.REFERENCES["torchgraph::qkv_attention"] is ops.reference_qkv_attention
    if extension.HAS_C_OPS:
        op = torch.ops.torchgraph.qkv_attention
        assert ops.reference_for(op) is ops.reference_for(op.default) is ops.reference_qkv_attention


def test_qkv_attention_no_grad_and_grad_fn(path):
    """Under no_grad a qkv that requires grad gives the reference's values and no graph;
    with grad enabled the output has a grad_fn."""
    qkv = qkv_input(2, 6, 2, 3, requires_grad=True)
    expected, _ = ops.reference_qkv_attention(qkv.detach(), 2, True)
    with torch.no_grad():
        out = ops.qkv_attention(qkv, 2, causal=True)
    assert out.grad_fn is None and not out.requires_grad
    assert_close(out, expected, torch.float32)
    out = ops.qkv_attention(qkv, 2, causal=True)
    assert out.grad_fn is not None
    assert_close(out, expected, torch.float32)
    if path == "kernel":
        assert "torchgraph_qkv_attention" in type(out.grad_fn).__name__


@pytest.mark.parametrize("b, t", [(0, 4), (2, 0)])
def test_qkv_attention_empty_batch_or_sequence(path, b, t):
    """An empty batch or sequence gives an empty (B, T, E) output on both paths (as SDPA does)."""
    qkv = randn(b, t, 3 * 2 * 4, requires_grad=True)
    out = ops.qkv_attention(qkv, 2, causal=True)
    assert out.shape == (b, t, 8)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


def _sdpa_attention(qkv, heads, causal, scale=None):
    """The formulation fused.qkv_attention replaces: split heads, SDPA, merge heads."""
    b, t, width = qkv.shape
    q, k, v = (z.view(b, t, heads, -1).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return out.transpose(1, 2).reshape(b, t, width // 3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t", [9, 512, 600])
def test_fused_qkv_attention_matches_sdpa(causal, t, any_size_attention):
    """fused.qkv_attention equals split + SDPA + merge, through the kernel (T <= 512; small problems
    too: any_size_attention; on AVX2 CPUs non-causal only up to TILED_ATTENTION_MAX_SEQ) and through the
    SDPA fallback (T > QKV_ATTENTION_MAX_SEQ), for values and gradients."""
    from torchgraph import fused

    heads, d = 2, 4
    qkv = qkv_input(1, t, heads, d, requires_grad=True)
    out = fused.qkv_attention(qkv, heads, causal, scale=0.4)
    (qkv_ref,) = leaf_copies(qkv)
    expected = _sdpa_attention(qkv_ref, heads, causal, scale=0.4)
    tiles_decline = fused.attention._TILED_ATTENTION and not causal and t > fused.TILED_ATTENTION_MAX_SEQ
    uses_kernel = extension.HAS_C_OPS and t <= fused.QKV_ATTENTION_MAX_SEQ and not tiles_decline
    assert ("torchgraph_qkv_attention" in type(out.grad_fn).__name__) == uses_kernel
    assert_close(out, expected, torch.float32)
    (got,), (want,) = grads(out, (qkv,)), grads(expected, (qkv_ref,))
    assert_close(got, want, torch.float32)


def test_qkv_attention_float16_goes_to_reference(path):
    """float16 (no kernel) runs the reference in ops and SDPA in fused; both match float32 SDPA."""
    from torchgraph import fused

    qkv = qkv_input(2, 7, 2, 4, torch.float16)
    expected = _sdpa_attention(qkv.float(), 2, True)
    tol = {"atol": 2e-3, "rtol": 2e-3}  # float16 rounding of the inputs to the two GEMMs
    for out in (ops.qkv_attention(qkv, 2, causal=True), fused.qkv_attention(qkv, 2, causal=True)):
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), expected, **tol)
    if extension.HAS_C_OPS:
        with pytest.raises(RuntimeError, match="qkv_attention: qkv must be float32, float64 or "
                           "bfloat16, got Half"):
            torch.ops.torchgraph.qkv_attention(qkv, 2, True)


@needs_c_ops
def test_qkv_attention_compile_and_export():
    """torch.compile(fullgraph) and torch.export keep ops.qkv_attention as one op; same values."""

    class Attention(torch.nn.Module):
        def forward(self, qkv):
            return ops.qkv_attention(qkv, 2, causal=True)

    qkv = qkv_input(2, 6, 2, 4)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(Attention(), fullgraph=True, backend="aot_eager")
        assert_close(compiled(qkv), ops.qkv_attention(qkv, 2, causal=True), torch.float32)
        program = torch.export.export(Attention(), (qkv,))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.torchgraph.qkv_attention.default in targets
    assert_close(program.module()(qkv), ops.qkv_attention(qkv, 2, causal=True), torch.float32)


@needs_c_ops
@pytest.mark.parametrize(
    "name, call, shapes",
    [
        ("bias_act", lambda x, b: ops.bias_act(x, b, "gelu"), [(3, 4), (4,)]),
        ("add_relu", ops.add_relu, [(3, 4), (3, 4)]),
        ("add_layer_norm", lambda x, r: ops.add_layer_norm(x, r)[0], [(3, 4), (3, 4)]),
        ("qkv_attention", lambda qkv: ops.qkv_attention(qkv, 2, True), [(2, 5, 24)]),
    ],
)
def test_double_backward_raises(name, call, shapes):
    """A second-order gradient through a fused op fails loudly instead of coming out as None."""
    inputs = [randn(*s, requires_grad=True) for s in shapes]
    out = call(*inputs)
    (first,) = torch.autograd.grad((out * out).sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match=f"torchgraph::{name} is not twice differentiable"):
        torch.autograd.grad(first.sum(), inputs[0])
