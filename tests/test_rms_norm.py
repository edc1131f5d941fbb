"""``ops.rms_norm_inference`` and ``tg.optimize`` fusing RMSNorm written out the LLaMA way into it."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models.llama_meta import RMSNorm as MetaRMSNorm  # Meta's llama/model.py spelling
import torchgraph._extension as extension
import torchgraph.ops as ops
from torchgraph import passes

needs_c_ops = pytest.mark.skipif(not extension.HAS_C_OPS, reason="torchgraph._C is not built")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@needs_c_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 16, 256), (3, 7, 33), (2, 5), (1, 4096), (4, 1)])
def test_kernel_matches_the_written_out_norm(shape, dtype):
    """float32: to float rounding; bfloat16: the same value or one bfloat16 step apart (the float32 rstd
    may differ in its last bit, which moves a rounding), never more."""
    x, weight = (3 * torch.randn(shape)).to(dtype), torch.rand(shape[-1]).to(dtype)
    with torch.no_grad():
        out = ops.rms_norm_inference(x, weight, 1e-6)
        expected = ops.reference_rms_norm_inference(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    else:
        step = expected.float().abs() * 2.0 ** -7  # one bfloat16 step at the value's magnitude
        assert ((out.float() - expected.float()).abs() <= step).all()


@needs_c_ops
def test_non_contiguous_input():
    x, weight = torch.randn(16, 6).t(), torch.rand(16)
    torch.testing.assert_close(ops.rms_norm_inference(x, weight, 1e-5),
                               ops.reference_rms_norm_inference(x, weight, 1e-5), atol=1e-6, rtol=1e-6)


@needs_c_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x, weight = torch.randn(3, 5, 40, dtype=dtype), torch.rand(40, dtype=dtype)
    torch.library.opcheck(torch.ops.torchgraph.rms_norm_inference.default, (x, weight, 1e-6))


@needs_c_ops
def test_backward_raises_with_the_fix():
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward.*inference=False"):
        ops.rms_norm_inference(x, torch.rand(8), 1e-6).sum().backward()


@needs_c_ops
@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 8).double(), torch.rand(8).double()), "x must be float32 or bfloat16"),
    ((torch.randn(2, 8), torch.rand(7)), r"weight must have shape \[8\]"),
    ((torch.randn(2, 8), torch.rand(8).bfloat16()), "weight dtype must equal x dtype"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_inputs_raise_the_same_message_on_the_kernel_and_the_fake(args, match, device):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.torchgraph.rms_norm_inference.default(*(a.to(device) for a in args), 1e-6)


# ------------------------------------------------------------------------------------ tg.optimize


class LlamaRMSNorm(nn.Module):
    """As HF transformers writes it (modeling_llama.py), and Mistral and Qwen2 after it."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class ConstantDtypeRMSNorm(LlamaRMSNorm):
    """Casts back to a fixed float32, not to the input's dtype: left as written (in a bfloat16 graph the
    output would be float32, which the fused op, answering in its input's dtype, would not be)."""

    def forward(self, hidden_states):
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(torch.float32)


class GemmaRMSNorm(LlamaRMSNorm):
    """Gemma's: the weight enters as (1 + weight), in float32. Another computation: left as written."""

    def forward(self, hidden_states):
        x = hidden_states.float()
        output = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (output * (1.0 + self.weight.float())).type_as(hidden_states)


class Block(nn.Module):
    """A pre-norm MLP block with a final norm, the shape of a LLaMA decoder's norms."""

    def __init__(self, norm=LlamaRMSNorm, dim=64):
        super().__init__()
        self.norm_in, self.norm_out = norm(dim), norm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        with torch.no_grad():
            for norm_layer in (self.norm_in, self.norm_out):
                norm_layer.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.norm_out(x + self.mlp(self.norm_in(x)))


def _model(norm=LlamaRMSNorm):
    net = Block(norm).eval()
    x = tg.Input(shape=(10, 64))
    return net, tg.Model(x, net(x))


def _norm_calls(model) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "call_function" and n.target is ops.rms_norm_inference)


@pytest.mark.parametrize("norm", [LlamaRMSNorm, MetaRMSNorm], ids=["hf", "meta"])
def test_optimize_fuses_llama_rms_norm_and_matches_eager(norm):
    net, model = _model(norm)
    fast = tg.optimize(model)
    assert _norm_calls(fast) == 2
    assert not any(n.op == "call_method" and n.target in ("pow", "mean") for n in fast.graph.nodes)
    x = 2 * torch.randn(3, 10, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not passes.bfloat16_supported()[0], reason="this CPU has no bfloat16 instructions")
@pytest.mark.parametrize("norm", [LlamaRMSNorm, MetaRMSNorm], ids=["hf", "meta"])
def test_optimize_bfloat16_fuses_it_and_answers_in_the_callers_dtype(norm):
    net, model = _model(norm)
    fast = tg.optimize(model, dtype=torch.bfloat16)
    assert _norm_calls(fast) == 2
    x = 2 * torch.randn(3, 10, 64)
    with torch.no_grad():
        out, expected = fast(x), net(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("norm", [ConstantDtypeRMSNorm, GemmaRMSNorm], ids=["constant_dtype", "gemma"])
def test_other_spellings_stay_as_written(norm):
    net, model = _model(norm)
    fast = tg.optimize(model)
    assert _norm_calls(fast) == 0
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)


def test_training_mode_keeps_the_norm_as_written():
    _, model = _model()
    assert _norm_calls(tg.optimize(model, inference=False)) == 0


def test_optimized_model_exports_to_onnx(tmp_path):
    """The exporter swaps the fused op back to its reference: onnxruntime gives eager's outputs."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net, model = _model()
    path = tmp_path / "norms.onnx"
    tg.export_onnx(tg.optimize(model), path)
    x = torch.randn(2, 10, 64)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), net(x), atol=1e-5, rtol=1e-5)
