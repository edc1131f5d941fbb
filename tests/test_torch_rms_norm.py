"""torch's own ``nn.RMSNorm`` / ``F.rms_norm`` through ``tg.optimize``: ``ops.rms_norm_inference`` with
torch's rounding (``weight_in_float32=True``: the weight multiplied in float32, one rounding)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
import torchgraph._extension as extension
import torchgraph.ops as ops
from torchgraph import passes

needs_c_ops = pytest.mark.skipif(not extension.HAS_C_OPS, reason="torchgraph._C is not built")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _within_one_bfloat16_step(out, expected):
    step = expected.float().abs() * 2.0 ** -7  # one bfloat16 step at the value's magnitude
    return bool(((out.float() - expected.float()).abs() <= step).all())


@needs_c_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("eps", [1e-5, None])
@pytest.mark.parametrize("shape", [(8, 16, 256), (3, 7, 33), (4, 1)])
def test_kernel_matches_torch_rms_norm(shape, eps, affine, dtype):
    """float32: to float rounding; bfloat16: torch's value or one step apart (its rstd may differ in the last
    bit), never HF's rounding before the weight, which is further off for weights far from 1."""
    x = (3 * torch.randn(shape)).to(dtype)
    weight = (4 * torch.rand(shape[-1]) - 2).to(dtype) if affine else None
    with torch.no_grad():
        expected = F.rms_norm(x, (shape[-1],), weight, eps)
        out = ops.rms_norm_inference(x, weight, torch.finfo(torch.float32).eps if eps is None else eps, True)
        reference = ops.reference_rms_norm_inference(x, weight, 1e-5 if eps else torch.finfo(torch.float32).eps,
                                                     True)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(reference, expected, atol=1e-6, rtol=1e-5)
    else:
        assert _within_one_bfloat16_step(out, expected)
        assert torch.equal(reference, expected)  # the reference is torch's computation, op for op


@needs_c_ops
def test_eps_none_is_float32_epsilon_for_bfloat16_inputs_too():
    """Where eps decides the value (rows of tiny numbers), torch adds float32's epsilon, not bfloat16's."""
    x, weight = (1e-4 * torch.randn(4, 256)).bfloat16(), torch.rand(256).bfloat16()
    fast = tg.optimize(_wrap(nn.Sequential(_norm_like(nn.RMSNorm(256), weight)), (256,)))
    assert _norm_calls(fast) == 1
    with torch.no_grad():
        expected = F.rms_norm(x.float(), (256,), weight.float())
        assert expected.abs().max() > 0.5  # float32's epsilon leaves these rows normalised
        torch.testing.assert_close(fast(x.float()), expected, atol=1e-5, rtol=1e-5)


@needs_c_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_without_weight_and_with_torch_rounding(dtype):
    x = torch.randn(3, 5, 40, dtype=dtype)
    torch.library.opcheck(torch.ops.torchgraph.rms_norm_inference.default, (x, None, 1e-6, True))
    torch.library.opcheck(torch.ops.torchgraph.rms_norm_inference.default,
                          (x, torch.rand(40, dtype=dtype), 1e-6, True))


# ------------------------------------------------------------------------------------ tg.optimize


def _norm_like(norm: nn.RMSNorm, weight=None) -> nn.RMSNorm:
    if weight is not None:
        with torch.no_grad():
            norm.weight.copy_(weight)
    elif norm.weight is not None:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
    return norm


def _wrap(net: nn.Module, shape) -> tg.Model:
    x = tg.Input(shape=shape)
    return tg.Model(x, net.eval()(x))


def _norm_calls(model) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "call_function" and n.target is ops.rms_norm_inference)


class TitanBlock(nn.Module):
    """torchtitan's pre-norm block shape: nn.RMSNorm before the MLP and after the residual."""

    def __init__(self, dim=64, eps=1e-5, affine=True):
        super().__init__()
        self.ffn_norm = _norm_like(nn.RMSNorm(dim, eps=eps, elementwise_affine=affine))
        self.norm = _norm_like(nn.RMSNorm(dim, eps=eps, elementwise_affine=affine))
        self.w1, self.w2 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x):
        h = x + self.w2(F.silu(self.w1(self.ffn_norm(x))))
        return self.norm(h)


class OffsetRMSNorm(nn.RMSNorm):
    """A subclass with its own forward: inlined, the norm inside it fused, the offset kept."""

    def forward(self, x):
        return super().forward(x) + 1.0


class FunctionalNorm(nn.Module):
    """F.rms_norm with a parameter as its weight, eps left to torch."""

    def __init__(self, dim=64):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc(F.rms_norm(x, (x.shape[-1],), self.scale))


@pytest.mark.parametrize("net, norms", [
    (lambda: TitanBlock(), 2),
    (lambda: TitanBlock(eps=None), 2),
    (lambda: TitanBlock(affine=False), 2),
    (lambda: FunctionalNorm(), 1),
    (lambda: nn.Sequential(nn.Linear(64, 64), _norm_like(OffsetRMSNorm(64))), 1),
], ids=["nn.RMSNorm", "eps_none", "no_weight", "F.rms_norm", "subclass"])
def test_optimize_fuses_torch_rms_norm_and_matches_eager(net, norms):
    net = net()
    model = _wrap(net, (10, 64))
    fast = tg.optimize(model)
    assert _norm_calls(fast) == norms
    assert not any(n.op == "call_module" and isinstance(fast.get_submodule(n.target), nn.RMSNorm)
                   for n in fast.graph.nodes)
    assert fast.state_dict().keys() == model.state_dict().keys()
    x = 2 * torch.randn(3, 10, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not passes.bfloat16_supported()[0], reason="this CPU has no bfloat16 instructions")
def test_optimize_bfloat16_fuses_it_and_answers_in_the_callers_dtype():
    net = TitanBlock()
    fast = tg.optimize(_wrap(net, (10, 64)), dtype=torch.bfloat16)
    assert _norm_calls(fast) == 2
    x = 2 * torch.randn(3, 10, 64)
    with torch.no_grad():
        out, expected = fast(x), net(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=5e-2)


def test_a_norm_over_two_dims_stays_as_written():
    net = nn.Sequential(nn.Linear(64, 64), _norm_like(nn.RMSNorm((10, 64))))
    fast = tg.optimize(_wrap(net, (10, 64)))
    assert _norm_calls(fast) == 0
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)


def test_training_mode_keeps_the_norm_as_written():
    net = TitanBlock()
    fast = tg.optimize(_wrap(net, (10, 64)), inference=False)
    assert _norm_calls(fast) == 0


def test_optimized_model_exports_to_onnx(tmp_path):
    """The exporter swaps the fused op back to its reference: onnxruntime gives eager's outputs."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = TitanBlock(affine=False)
    net.ffn_norm = _norm_like(nn.RMSNorm(64))
    path = tmp_path / "norms.onnx"
    tg.export_onnx(tg.optimize(_wrap(net, (10, 64))), path)
    x = torch.randn(2, 10, 64)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_models_with_nn_rms_norm_export_to_onnx(exporter, tmp_path):
    """The legacy exporter has no aten::rms_norm before opset 23: the export writes it in primitive ops
    (NOTE: [rms_norm in ONNX] in torchgraph/export/references.py), with and without a weight."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = TitanBlock(eps=None).eval()
    net.norm = nn.RMSNorm(64, elementwise_affine=False)
    path = tmp_path / "norms.onnx"
    tg.export_onnx(_wrap(net, (10, 64)), path, exporter=exporter)
    x = torch.randn(2, 10, 64)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), net(x), atol=1e-5, rtol=1e-5)
