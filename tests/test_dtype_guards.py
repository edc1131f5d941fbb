"""Branches on ``x.dtype`` / ``x.device`` in a build record checks (NOTE: [Dtype guards] in dtype_guards.py).

A model built in float32 that compared a dtype must never silently keep float32's branch after
``model.to(torch.float16)``: it either gives eager's answer or raises a clear error.
"""

import json
import os

import pytest
import torch
import torch.nn as nn

import torchgraph as tg


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 4)


def _inputs(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(dtype) * 100


def _float16_branch_model():
    x = tg.Input(shape=(4,))
    h = _linear()(x)
    if h.dtype == torch.float16:
        h = h.clamp(-1, 1)
    else:
        h = h * 2
    return tg.Model(x, h)


def test_equality_branch_matches_eager_in_build_dtype_and_raises_after_half():
    """`if h.dtype == torch.float16:` is exact in float32 and raises (naming line and dtypes) after .half()."""
    model = _float16_branch_model()
    layer = _linear()
    assert torch.equal(model(_inputs()), layer(_inputs()) * 2)
    model.half()
    with pytest.raises(RuntimeError, match=r"`if h.dtype == torch.float16:` \(test_dtype_guards.py:\d+\) branched on the "
                                           r"dtype when the model was built: it was torch.float32, not equal to "
                                           r"torch.float16; the model now runs with the dtype torch.float16, equal "
                                           r"to torch.float16, so that line would take the other branch") as info:
        model(_inputs(torch.float16))
    assert "tg.from_module(module.half(), ...)" in str(info.value)  # the fix


def test_equality_branch_is_exact_after_to_other_dtypes_with_the_same_answer():
    """float64 and bfloat16 also answer False to `== torch.float16`: the model runs and matches eager."""
    for dtype in (torch.float64, torch.bfloat16):
        model = _float16_branch_model().to(dtype)
        expected = _linear().to(dtype)(_inputs(dtype)) * 2
        assert torch.equal(model(_inputs(dtype)), expected)


def test_membership_and_inequality_branches():
    """`in (float16, bfloat16)` and `!=` record the comparisons Python made; `.half()` and `.bfloat16()` raise."""
    x = tg.Input(shape=(4,))
    h = _linear()(x)
    upcast = h.dtype in (torch.float16, torch.bfloat16)
    h = h.float() * 3 if upcast else h + 1
    if h.dtype != torch.float32:
        h = h.float()
    model = tg.Model(x, h)
    assert model.code.count("check_branch(") == 3
    assert torch.equal(model(_inputs()), _linear()(_inputs()) + 1)
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(RuntimeError, match=rf"`upcast = h.dtype in \(torch.float16, torch.bfloat16\)` .* now "
                                               rf"runs with the dtype {dtype}, equal to {dtype}"):
            _float16_branch_model()  # an unrelated build in between changes nothing
            tg.Model(x, h).to(dtype)(_inputs(dtype))


def test_device_type_branch_raises_on_another_device():
    """`if h.device.type == "cpu":` raises when the model runs on another device (meta here)."""
    x = tg.Input(shape=(4,))
    h = _linear()(x)
    h = h - 1 if h.device.type == "cpu" else h
    model = tg.Model(x, h)
    assert torch.equal(model(_inputs()), _linear()(_inputs()) - 1)
    with pytest.raises(RuntimeError, match=r"`h = h - 1 if h.device.type == \"cpu\" else h` .* branched on the "
                                           r"device.type when the model was built: it was 'cpu', equal to 'cpu'; "
                                           r"the model now runs with the device.type 'meta', not equal to 'cpu'"):
        model.to("meta")(_inputs().to("meta"))


def test_device_type_not_equal_stays_true_on_another_device():
    """LLaMA's `x.device.type if isinstance(x.device.type, str) and x.device.type != "mps" else "cpu"` runs on meta."""
    x = tg.Input(shape=(4,))
    h = _linear()(x)
    device_type = h.device.type if isinstance(h.device.type, str) and h.device.type != "mps" else "cpu"
    assert str(device_type) == "cpu"  # (str() of it: comparing it here would be checked too)
    model = tg.Model(x, h * 2)
    assert model.to("meta")(_inputs().to("meta")).device.type == "meta"


def test_dtype_attribute_and_dict_lookup_are_checked():
    """`x.dtype.itemsize` and `{dtype: eps}[x.dtype]` bake a build-dtype value in: checked, raise after .half()."""
    x = tg.Input(shape=(4,))
    h = _linear()(x)
    eps = {torch.float32: 1e-6, torch.float16: 1e-3}[h.dtype]
    model = tg.Model(x, h + eps * h.dtype.itemsize)
    assert torch.allclose(model(_inputs()), _linear()(_inputs()) + 4e-6)
    with pytest.raises(RuntimeError, match=r"eps = \{torch.float32: 1e-6, torch.float16: 1e-3\}\[h.dtype\]"):
        model.half()(_inputs(torch.float16))


def test_identical_checks_are_recorded_once_and_same_tensor_comparisons_not_at_all():
    """Comparing one tensor's dtype twice the same way gives one check; `h.dtype == h.dtype` none."""
    x = tg.Input(shape=(4,))
    h = _linear()(x)
    for _ in range(5):
        assert not h.dtype == torch.float16
    assert h.dtype == h.dtype
    model = tg.Model(x, h)
    assert model.code.count("check_branch(") == 1


def test_comparing_two_tensors_dtypes_follows_both():
    """`a.dtype == b.dtype` reads both dtypes when the model runs: it holds after .half() of both."""
    x = tg.Input(shape=(4,))
    a, b = _linear(0)(x), _linear(1)(x)
    out = a + b if a.dtype == b.dtype else a
    model = tg.Model(x, out).half()
    expected = _linear(0).half()(_inputs(torch.float16)) + _linear(1).half()(_inputs(torch.float16))
    assert torch.equal(model(_inputs(torch.float16)), expected)


class RMSNorm(nn.Module):
    """LLaMA's: upcasts with a dtype passed to torch, never compared."""

    def __init__(self, size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, size))
        self.eps = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return self.weight * hidden_states.to(input_dtype)


class MaskedScores(nn.Module):
    """A finfo mask: the dtype passed to torch.finfo, never compared."""

    def __init__(self):
        super().__init__()
        self.proj = _linear()

    def forward(self, scores, mask):
        return self.proj(scores).masked_fill(mask < 0, torch.finfo(scores.dtype).min).softmax(-1)


def test_passing_dtypes_to_torch_records_no_check_and_stays_exact_after_bfloat16():
    """RMSNorm's upcast and a finfo mask record no check and equal eager after .to(torch.bfloat16)."""
    norm, scorer = RMSNorm(4), MaskedScores()
    model = tg.from_module(norm, (4,))
    masked = tg.from_module(scorer, (4,), (4,))
    assert "check_branch" not in model.code + masked.code
    scores = _inputs()
    mask = torch.tensor([[1.0, -1, 1, 1], [-1, -1, -1, -1], [1, 1, 1, 1]])
    for dtype in (torch.float32, torch.bfloat16):
        norm.to(dtype), model.to(dtype), scorer.to(dtype), masked.to(dtype)
        assert torch.equal(model(scores.to(dtype)), norm(scores.to(dtype)))
        assert torch.equal(masked(scores.to(dtype), mask.to(dtype)), scorer(scores.to(dtype), mask.to(dtype)))


class BartLikeEncoderLayer(nn.Module):
    """The end of transformers' BartEncoderLayer.forward: a float16-only clamp of overflowing states."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, hidden_states):
        hidden_states = self.norm(hidden_states + self.fc2(torch.relu(self.fc1(hidden_states))) * 1000)
        if hidden_states.dtype == torch.float16 and (
            torch.isinf(hidden_states).any() or torch.isnan(hidden_states).any()
        ):
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states


class T5LikeFF(nn.Module):
    """transformers' T5LayerFF/T5Block clamp: `if hidden_states.dtype == torch.float16: ...torch.where(...)`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wi, self.wo = nn.Linear(4, 8, bias=False), nn.Linear(8, 4, bias=False)

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.wo(torch.relu(self.wi(hidden_states)))
        if hidden_states.dtype == torch.float16:
            clamp_value = torch.where(
                torch.isinf(hidden_states).any(),
                torch.finfo(hidden_states.dtype).max - 1000,
                torch.finfo(hidden_states.dtype).max,
            )
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states


class ViTLikeEmbedding(nn.Module):
    """transformers' ViTModel.forward: casts its input to the weights' dtype when they differ."""

    def __init__(self, literal: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 4)
        self.literal = literal

    def forward(self, pixel_values):
        if self.literal:
            if pixel_values.dtype != torch.float32:
                pixel_values = pixel_values.float()
            return self.proj(pixel_values.to(self.proj.weight.dtype))
        expected_dtype = self.proj.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        return self.proj(pixel_values)


def test_comparison_with_a_parameters_dtype_follows_the_parameter():
    """`x.dtype != self.proj.weight.dtype` is checked against the weight's dtype when the model runs:
    exact after .to(torch.bfloat16), as eager is; the literal `!= torch.float32` raises there."""
    module = ViTLikeEmbedding()
    model = tg.from_module(module, (4,))
    assert "proj_weight = self.proj.weight" in model.code and "proj_weight.dtype" in model.code
    assert list(model.state_dict()) == list(module.state_dict())
    module.to(torch.bfloat16), model.to(torch.bfloat16)
    assert torch.equal(model(_inputs(torch.bfloat16)), module(_inputs(torch.bfloat16)))
    literal = tg.from_module(ViTLikeEmbedding(literal=True), (4,)).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"`if pixel_values.dtype != torch.float32:` .* it was torch.float32, equal "
                                           r"to torch.float32; the model now runs with the dtype torch.bfloat16"):
        literal(_inputs(torch.bfloat16))


@pytest.mark.parametrize("make", [BartLikeEncoderLayer, T5LikeFF], ids=["bart", "t5"])
def test_from_module_float16_clamp_is_exact_in_float32_and_raises_after_half(make):
    """HF's float16-only clamps recorded in float32: exact in float32/bfloat16, a clear error after .half()."""
    module = make()
    model = tg.from_module(module, (4,))
    assert "check_branch" in model.code
    assert torch.equal(model(_inputs()), module(_inputs()))
    model.to(torch.bfloat16), module.to(torch.bfloat16)
    assert torch.equal(model(_inputs(torch.bfloat16)), module(_inputs(torch.bfloat16)))
    model.half()
    with pytest.raises(RuntimeError, match=r"`(if )?hidden_states.dtype == torch.float16.*` \(test_dtype_guards.py:"
                                           r"\d+\) branched on the dtype when the model was built: it was "
                                           r"torch.float32, not equal to torch.float16; the model now runs with "
                                           r"the dtype torch.float16, equal to torch.float16"):
        model(_inputs(torch.float16))


def test_from_module_recorded_in_float16_takes_eager_branch():
    """The fix the error names: recording the module in float16 follows float16's branch, exactly."""
    module = T5LikeFF().half()
    model = tg.from_module(module, tg.Input(shape=(4,), dtype=torch.float16))
    assert "clamp" in model.code
    big = torch.full((3, 4), 65000.0, dtype=torch.float16)  # finite, but the residual sum overflows float16
    assert torch.isinf(big + module.wo(torch.relu(module.wi(big)))).any()
    assert torch.equal(model(big), module(big)) and torch.isfinite(model(big)).all()


def test_save_load_keeps_the_check(tmp_path):
    """tg.save/tg.load round trip: the loaded model checks the branch too."""
    model = _float16_branch_model()
    path = os.path.join(tmp_path, "model.safetensors")
    tg.save(model, path)
    loaded = tg.load(path)
    assert torch.equal(loaded(_inputs()), model(_inputs()))
    with pytest.raises(RuntimeError, match=r"`if h.dtype == torch.float16:` .* it was torch.float32, not equal to "
                                           r"torch.float16; the model now runs with the dtype torch.float16"):
        loaded.half()(_inputs(torch.float16))


@pytest.mark.parametrize("position, bad", [(0, {"node": "linear"}), (1, "__class__"), (1, "index"),
                                           (2, {"node": "linear"}), (3, "yes"), (4, 7)])
def test_crafted_config_cannot_abuse_check_branch(position, bad):
    """A config naming torchgraph.check_branch with other arguments is refused with a ValueError."""
    from torchgraph.config import model_from_json

    text = _float16_branch_model().to_json()
    config = json.loads(text)
    nodes = [n for n in _walk(config) if isinstance(n, dict) and n.get("target") == "torchgraph.check_branch"]
    assert len(nodes) == 1
    nodes[0]["args"][position] = bad
    with pytest.raises(ValueError):
        model_from_json(json.dumps(config))


def _walk(obj):
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def test_export_onnx_runs_the_build_branch(tmp_path):
    """export_onnx of a model with checks works; onnxruntime matches the model."""
    ort = pytest.importorskip("onnxruntime")
    model = _float16_branch_model()
    path = os.path.join(tmp_path, "model.onnx")
    tg.export_onnx(model, path)
    session = ort.InferenceSession(path)
    (out,) = session.run(None, {session.get_inputs()[0].name: _inputs().numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(_inputs()).detach())


def test_clone_optimize_compile_and_training_keep_the_check():
    """clone_model, tg.optimize, torch.compile and train mode keep the check (and its answer)."""
    model = _float16_branch_model()
    for derived in (tg.clone_model(model), tg.optimize(model)):
        assert "check_branch" in derived.code
        with pytest.raises(RuntimeError, match="now runs with the dtype torch.float16"):
            derived.half()(_inputs(torch.float16))
    model.train()
    assert torch.equal(torch.compile(model, backend="eager")(_inputs()), model(_inputs()))


def test_optimize_bfloat16_of_a_float16_branch_runs_as_eager():
    """tg.optimize(dtype=torch.bfloat16) computes in bfloat16: `== torch.float16` is still False, so it runs."""
    from torchgraph.passes.precision import bfloat16_supported

    if not bfloat16_supported()[0]:
        pytest.skip(f"tg.optimize(dtype=torch.bfloat16) needs CPU bfloat16 support: {bfloat16_supported()[1]}")
    optimized = tg.optimize(_float16_branch_model().eval(), dtype=torch.bfloat16)
    expected = _linear().to(torch.bfloat16)(_inputs(torch.bfloat16)).float() * 2
    torch.testing.assert_close(optimized(_inputs()), expected, rtol=2e-2, atol=2e-1)


def test_transformers_bart_encoder_checks_its_float16_clamp():
    """transformers' BART encoder (random init) recorded in float32: exact in float32 and bfloat16, raises in float16."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        attn_implementation="eager")
    encoder = transformers.BartModel(config).get_encoder().eval()
    model = tg.from_module(encoder, {"input_ids": tg.Input(shape=(tg.Dim("seq", max=64),), dtype=torch.long)})
    assert model.code.count("check_branch(") == config.encoder_layers  # one per layer's clamp
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        encoder.to(dtype), model.to(dtype)
        assert torch.equal(model(input_ids=ids)["last_hidden_state"], encoder(input_ids=ids).last_hidden_state)
    model.half()
    with pytest.raises(RuntimeError, match=r"`if hidden_states.dtype == torch.float16 and .*` \(modeling_bart.py:\d+\) "
                                           r"branched on the dtype when the model was built"):
        model(input_ids=ids)
