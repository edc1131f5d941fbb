"""tg.optimize: fused graphs compute what the original computes, and stay usable everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import applications, fused, ops
from torchgraph.model import ValueSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _cnn() -> tg.Model:
    x = tg.Input(shape=(3, 16, 16), name="image")
    h = F.relu(nn.BatchNorm2d(8)(nn.Conv2d(3, 8, 3, padding=1)(x)))
    h = nn.MaxPool2d(2)(h)
    r = nn.BatchNorm2d(8)(nn.Conv2d(8, 8, 3, padding=1, bias=False)(h))
    h = F.relu(r + h)
    h = nn.SiLU()(nn.Conv2d(8, 8, 1)(h))
    y = nn.Linear(8, 5)(torch.flatten(nn.AdaptiveAvgPool2d(1)(h), 1))
    return _randomize(tg.Model(x, y, name="CNN"))


def _gpt() -> tg.Model:
    return applications.gpt_stack(num_blocks=2, dim=32, heads=4, seq_len=16)


def _fused_targets(model) -> set:
    return {n.target for n in model.graph.nodes if n.op == "call_function"}


def _check_outputs(model, x, atol=1e-5, **options):
    model.eval()
    fast = tg.optimize(model, **options)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=atol, rtol=1e-4)
    return fast


def test_mlp_matches_and_shows_fused_calls():
    """An MLP's linear + ReLU pairs become fused.linear_act calls, visible in model.code."""
    model = applications.mlp(depth=4, width=32, num_classes=3)
    fast = _check_outputs(model, torch.randn(5, 32))
    assert "linear_act" in fast.code and "'relu'" in fast.code
    assert "relu(" not in fast.code.replace("'relu'", "")


def test_cnn_folds_batchnorm_and_fuses():
    """BatchNorm (random stats) folds into the conv; conv+act, add+relu, max-pool are rewritten."""
    model = _cnn()
    fast = _check_outputs(model, torch.randn(4, 3, 16, 16))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    targets = _fused_targets(fast)
    assert {fused.conv2d_act, fused.conv2d_add_act, ops.max_pool2d_inference} <= targets
    assert ops.add_relu not in targets  # relu(conv(h) + h): the add and relu run in the conv's epilogue
    assert "'silu'" in fast.code


def test_resnet18_matches():
    """ResNet-18 with random BatchNorm statistics: same outputs within float32 tolerance."""
    model = _randomize(applications.resnet18(num_classes=10, input_shape=(3, 32, 32)))
    _check_outputs(model, torch.randn(2, 3, 32, 32), atol=1e-4)


def test_gpt_stack_matches_and_fuses_add_layer_norm():
    """A pre-LN GPT stack: residual add + LayerNorm and linear + GELU are fused."""
    model = _gpt()
    fast = _check_outputs(model, torch.randn(3, 16, 32))
    targets = _fused_targets(fast)
    assert ops.add_layer_norm in targets and fused.linear_act in targets
    assert "'gelu'" in fast.code


def test_dynamic_sequence_length():
    """A GPT stack with a dynamic sequence length runs at two lengths."""
    model = applications.gpt_stack(num_blocks=1, dim=32, heads=4, seq_len=None).eval()
    fast = tg.optimize(model)
    for t in (5, 11):
        x = torch.randn(2, t, 32)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-4)


def test_original_untouched_and_result_is_a_model():
    """The input model keeps its graph, layers and weights; the result is a new tg.Model."""
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    code = model.code
    fast = tg.optimize(model)
    assert isinstance(fast, tg.Model) and fast is not model
    assert type(fast).__name__ == "CNN"
    assert model.code == code
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not {id(p) for p in fast.parameters()} & {id(p) for p in model.parameters()}
    assert fast.meta["torchgraph"] == model.meta["torchgraph"]
    assert fast.input_names == ["image"] and fast.output_names == model.output_names


def test_every_node_keeps_a_spec_and_summary_works():
    """New nodes carry tg_spec, so summary and model.inputs work on the result."""
    fast = tg.optimize(_gpt())
    for node in fast.graph.nodes:
        if node.op not in ("get_attr", "output"):
            assert "tg_spec" in node.meta, node.name
    spec = next(n for n in fast.graph.nodes if n.op == "output").args[0].meta["tg_spec"]
    assert isinstance(spec, ValueSpec) and spec.format() == "(None, 16, 32)"
    lines = []
    fast.summary(print_fn=lines.append)
    assert "add_layer_norm" in "\n".join(lines)
    assert fast.inputs[0].shape[1:] == (16, 32)


def test_training_mode_keeps_gradients():
    """inference=False keeps BatchNorm and max-pool, and gradients equal the original's."""
    model = _cnn().train()
    fast = tg.optimize(model, inference=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert ops.max_pool2d_inference not in _fused_targets(fast)
    x = torch.randn(4, 3, 16, 16)
    model(x).square().sum().backward()
    fast(x).square().sum().backward()
    grads = dict(model.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-4, rtol=1e-4)


def test_training_mode_gpt_gradients():
    """A GPT stack optimized for training: fused ops with backward, same gradients."""
    model = _gpt()
    fast = tg.optimize(model, inference=False)
    assert ops.add_layer_norm in _fused_targets(fast)
    x = torch.randn(2, 16, 32)
    model(x).square().sum().backward()
    fast(x).square().sum().backward()
    grads = dict(model.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-4, rtol=1e-4)


def test_shared_layer_is_not_folded():
    """A conv called twice keeps its BatchNorm: folding would change its other call."""
    x = tg.Input(shape=(4, 8, 8))
    conv, bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    y = bn(conv(x)) + conv(x)
    model = _randomize(tg.Model(x, y))
    fast = _check_outputs(model, torch.randn(2, 4, 8, 8))
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())


def test_channels_last_does_not_leak_to_views():
    """With channels_last=True, a view after a conv still works: the tensor is made contiguous first."""
    x = tg.Input(shape=(3, 8, 8))
    h = F.relu(nn.Conv2d(3, 4, 3, padding=1)(x))
    y = nn.Linear(4 * 8 * 8, 2)(h.view(h.size(0), -1))
    model = tg.Model(x, [y, h])
    fast = _check_outputs(model, torch.randn(2, 3, 8, 8), channels_last=True)
    with torch.no_grad():
        assert fast(torch.randn(2, 3, 8, 8))[1].is_contiguous()


def test_exports_to_onnx_as_standard_ops(tmp_path):
    """The optimized CNN and GPT export to ONNX without torchgraph ops, and match in onnxruntime."""
    pytest.importorskip("onnxruntime")
    import onnx

    for model in (_cnn(), _gpt()):
        path = tg.export_onnx(tg.optimize(model.eval()), tmp_path / "m.onnx")
        domains = {n.domain for n in onnx.load(path).graph.node}
        assert domains <= {"", "ai.onnx"}, domains


def test_survives_torch_compile():
    """torch.compile of the optimized model gives the same outputs."""
    model = _cnn().eval()
    fast = tg.optimize(model)
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)


def test_double_precision_and_no_onednn_path():
    """After .double() the fused calls take the standard-op path and still match."""
    model = _cnn().eval().double()
    fast = tg.optimize(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_pickle_and_deepcopy_roundtrip():
    """The optimized model pickles (tg.save-style torch.save) and deep-copies."""
    import copy
    import io

    fast = tg.optimize(_gpt())
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x))
        torch.testing.assert_close(copy.deepcopy(fast)(x), fast(x))


def test_resnet50_conv_weights_are_written_once():
    """Optimizing ResNet-50 copies no conv weight twice: each folded conv gets one new weight and the
    unfolded ones are copied once (its time is a benchmark figure, benchmarks/bench_peers.py, not a test)."""
    model = applications.resnet50(num_classes=1000, input_shape=(3, 64, 64))
    fast = tg.optimize(model)
    originals = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in originals for p in fast.parameters())


def test_rejects_non_models():
    """A plain nn.Module gets a clear TypeError."""
    with pytest.raises(TypeError, match="tg.optimize: expected a tg.Model; received Linear"):
        tg.optimize(nn.Linear(2, 2))


def test_works_without_the_extension():
    """With TORCHGRAPH_DISABLE_C_OPS=1 the rewrite still runs and matches (reference fallbacks)."""
    code = (
        "import torch, torchgraph as tg\n"
        "from torchgraph import _extension, applications\n"
        "assert not _extension.HAS_C_OPS\n"
        "torch.manual_seed(0)\n"
        "m = applications.resnet18(10, (3, 32, 32)).eval()\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(tg.optimize(m)(x), m(x), atol=1e-4, rtol=1e-4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TORCHGRAPH_DISABLE_C_OPS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("name", ["torchgraph.optimize", "torchgraph.fused", "torchgraph.fused.conv",
                                  "torchgraph.fused.attention", "torchgraph.fused.weights",
                                  "torchgraph.fused._common"])
def test_docstring_examples(name):
    """The docstring examples of the optimize modules run."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_docs_page_runs():
    """The python blocks of docs/optimize.md run."""
    import re

    text = open(os.path.join(ROOT, "docs", "optimize.md")).read()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
    exec(compile(code, "docs/optimize.md", "exec"), {})


def test_packed_conv_weights_follow_load_state_dict():
    """The prepacked oneDNN weights (3x3 convs, >= 16 channels) are refreshed when weights change."""
    x = tg.Input(shape=(16, 8, 8))
    model = tg.Model(x, F.relu(nn.Conv2d(16, 32, 3, padding=1)(x))).eval()
    fast = tg.optimize(model)
    data = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(data), model(data), atol=1e-5, rtol=1e-4)
        for p in model.parameters():
            p.mul_(-2.0)
        fast.load_state_dict(model.state_dict())
        torch.testing.assert_close(fast(data), model(data), atol=1e-5, rtol=1e-4)
        assert fast(data).is_contiguous()


# ---------------------------------------------------------------------------- attention


def _attention_model(seq_len=6, dim=12, heads=3, *, causal=False, scale=None, merge="flatten",
                     reuse=None, chunks=3, chunk_dim=-1, **sdpa_kwargs) -> tg.Model:
    """Hand-written self-attention on a packed projection: Linear -> chunk -> head split -> SDPA ->
    head merge -> Linear. ``reuse`` names an intermediate value that is also returned."""
    x = tg.Input(shape=(seq_len, dim), name="tokens")
    b, t, e = x.shape
    if chunk_dim == -1:
        qkv = nn.Linear(dim, chunks * dim)(x)
        parts = qkv.chunk(chunks, dim=-1)
    else:  # q | k | v stacked along the sequence instead
        qkv = torch.cat([nn.Linear(dim, dim)(x) for _ in range(3)], dim=1)
        parts = qkv.chunk(3, dim=chunk_dim)
    q, k, v = parts[:3]
    q_split = q.view(b, t, heads, e // heads)
    q_heads = q_split.transpose(1, 2)
    k_heads = k.view(b, t, heads, e // heads).transpose(1, 2)
    v_heads = v.view(b, t, heads, e // heads).transpose(1, 2)
    a = F.scaled_dot_product_attention(q_heads, k_heads, v_heads, is_causal=causal, scale=scale,
                                       **sdpa_kwargs)
    back = a.transpose(1, 2)
    y = back.flatten(2) if merge == "flatten" else back.reshape(b, t, e)
    if chunks == 4:
        y = y * torch.sigmoid(parts[3])  # the fourth chunk gates the output
    y = nn.Linear(dim, dim)(y)
    extra = {"q": q, "split": q_split, "heads": q_heads, "sdpa": a, "back": back}.get(reuse)
    return tg.Model(x, y if extra is None else [y, extra], name="Attention")


def _attention_nodes(model) -> list:
    return [n for n in model.graph.nodes
            if n.op == "call_function" and n.target is fused.qkv_attention]


def _assert_fully_fused(model, count):
    nodes = _attention_nodes(model)
    assert len(nodes) == count
    assert all(n.name.startswith("attention") for n in nodes)
    assert not any(n.op == "call_method" and n.target == "chunk" for n in model.graph.nodes)
    assert not {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                fused.scaled_dot_product_attention} & \
        _fused_targets(model)


def test_gpt_attention_fuses_to_one_call_per_block():
    """Each GPT block's chunk/split/SDPA/merge becomes one fused.qkv_attention (causal), and the
    optimized model matches the original in eval."""
    model = _gpt()
    fast = _check_outputs(model, torch.randn(3, 16, 32))
    _assert_fully_fused(fast, count=2)
    assert all(n.args[1:] == (4, True) and not n.kwargs for n in _attention_nodes(fast))
    assert "qkv_attention" in fast.code


@pytest.mark.parametrize("merge", ["flatten", "reshape"])
@pytest.mark.parametrize("scale", [None, 0.5])
def test_hand_written_attention_fuses(merge, scale):
    """Non-causal attention written by hand (any merge spelling, explicit scale) is fused with its
    arguments and matches."""
    model = _attention_model(causal=False, scale=scale, merge=merge)
    fast = _check_outputs(model, torch.randn(2, 6, 12))
    _assert_fully_fused(fast, count=1)
    (node,) = _attention_nodes(fast)
    assert node.args[1:] == (3, False)
    assert node.kwargs == ({} if scale is None else {"scale": scale})


def test_attention_fused_for_training_with_same_gradients():
    """inference=False keeps the fused attention, and the parameter and input gradients equal the
    original model's (relative error ~3e-7 measured)."""
    model = _gpt()
    fast = tg.optimize(model, inference=False)
    assert fast.training
    _assert_fully_fused(fast, count=2)
    x = torch.randn(2, 16, 32, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_()
    weights = torch.randn(2, 16, 32)
    (model(x) * weights).sum().backward()
    (fast(x_fast) * weights).sum().backward()

    def close(got, want):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())

    close(x_fast.grad, x.grad)
    grads = dict(model.named_parameters())
    for name, p in fast.named_parameters():
        close(p.grad, grads[name].grad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attn_mask": torch.ones(6, 6, dtype=torch.bool).tril()},
        {"enable_gqa": True},
        {"chunks": 4},
        {"chunk_dim": 1},
    ],
    ids=["attn_mask", "enable_gqa", "chunk4", "chunk_dim1"],
)
def test_attention_variants_not_fused(kwargs):
    """Masks, grouped-query attention and other chunkings are not fused into qkv_attention (and still
    match): the SDPA call stays, as fused.scaled_dot_product_attention with the same arguments."""
    model = _attention_model(**kwargs)
    fast = _check_outputs(model, torch.randn(2, 6, 12))
    assert not _attention_nodes(fast)
    assert fused.scaled_dot_product_attention in _fused_targets(fast)


@pytest.mark.parametrize("reuse", ["q", "split", "heads", "sdpa", "back"])
def test_attention_with_shared_intermediate_not_fused(reuse):
    """When a value inside the pattern is also returned, the pattern is kept (outputs match)."""
    model = _attention_model(reuse=reuse, causal=True)
    fast = _check_outputs(model, torch.randn(2, 6, 12))
    assert not _attention_nodes(fast)


def test_attention_with_dropout_not_fused():
    """dropout_p > 0 is left alone: with the same seed the optimized model draws the same mask."""
    model = _attention_model(dropout_p=0.5).eval()
    fast = tg.optimize(model)
    assert not _attention_nodes(fast)
    x = torch.randn(2, 6, 12)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-4)


def test_dynamic_sequence_length_attention(monkeypatch, any_size_attention):
    """With a dynamic T the attention is fused; T=20 runs the kernel, T=600 (more than
    QKV_ATTENTION_MAX_SEQ) the SDPA fallback, and both match the original."""
    model = applications.gpt_stack(num_blocks=1, dim=16, heads=2, seq_len=None).eval()
    fast = tg.optimize(model)
    _assert_fully_fused(fast, count=1)
    calls = []
    kernel = ops.qkv_attention

    def counting_kernel(qkv, *args, **kwargs):
        calls.append(qkv.shape[1])
        return kernel(qkv, *args, **kwargs)

    monkeypatch.setattr(ops, "qkv_attention", counting_kernel)
    assert fused.QKV_ATTENTION_MAX_SEQ < 600
    for t in (20, 600):
        x = torch.randn(2, t, 16)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-4)
    assert calls == ([20] if ops._use_kernel(torch.ones(1)) else [])


@pytest.mark.usefixtures("mkl_routes")
def test_attention_kernel_or_sdpa_follows_the_measurements(monkeypatch):
    """NOTE: [Kernel or SDPA], with the kernel's products on BLAS (Intel CPUs): heads of >= 64 take the
    kernel when causal or up to 128 positions; smaller heads only on small problems; the choice never
    changes the values."""
    pick = fused.attention._kernel_beats_sdpa
    assert pick((8, 128, 3 * 256), 4, False) and pick((8, 128, 3 * 256), 4, True)
    assert not pick((1, 197, 3 * 384), 6, False) and pick((1, 197, 3 * 384), 6, True)
    assert not pick((8, 128, 3 * 512), 16, True) and not pick((8, 128, 3 * 256), 8, False)
    assert pick((4, 64, 3 * 128), 4, False)
    calls = []
    kernel = ops.qkv_attention
    monkeypatch.setattr(ops, "qkv_attention", lambda qkv, *a, **k: calls.append(1) or kernel(qkv, *a, **k))
    qkv = torch.randn(2, 40, 3 * 64)
    with torch.no_grad():
        for heads in (1, 4):  # heads of 64 and of 16, non-causal, 40 positions: both kernel-sized
            torch.testing.assert_close(fused.qkv_attention(qkv, heads), fused.attention._sdpa_qkv_attention(qkv, heads, False, None),
                                       atol=1e-5, rtol=1e-5)
    assert len(calls) == (2 if ops._use_kernel(qkv) else 0)


@pytest.mark.parametrize("routes", ["mkl_routes", "onednn_routes"])
def test_attention_on_onednn_takes_every_short_sequence(routes, request, monkeypatch):
    """Where the kernel's products run on oneDNN (CPUs other than Intel), float32 and bfloat16
    attention take the kernel with onednn=True for every sequence up to QKV_ATTENTION_MAX_SEQ,
    shapes SDPA won with BLAS included (ViT-S's 197 non-causal positions, heads of 32); with BLAS
    (Intel), bfloat16 stays on SDPA (NOTE: [bfloat16 attention]). Values equal SDPA's either way."""
    request.getfixturevalue(routes)
    calls = []
    kernel = ops.qkv_attention
    monkeypatch.setattr(ops, "qkv_attention",
                        lambda qkv, *a, **k: calls.append((qkv.dtype, k.get("onednn"))) or kernel(qkv, *a, **k))
    on_onednn = routes == "onednn_routes"
    torch.manual_seed(0)
    with torch.no_grad():
        for shape, heads in (((1, 197, 3 * 384), 6), ((2, 128, 3 * 256), 8)):
            for dtype in (torch.float32, torch.bfloat16):
                calls.clear()
                qkv = torch.randn(shape).to(dtype)
                expected = fused.attention._sdpa_qkv_attention(qkv, heads, False, None)
                tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(fused.qkv_attention(qkv, heads), expected, **tol)
                if not ops._use_kernel(qkv):
                    assert calls == []
                elif on_onednn:  # bfloat16 on oneDNN where the CPU has bf16 instructions, else SDPA
                    assert calls == ([(dtype, True)] if dtype in fused._common._ONEDNN_DTYPES else [])
                else:
                    assert calls == ([] if dtype == torch.bfloat16 or shape[1] == 197 else [(dtype, False)])


# ---------------------------------------------------------------------------- linear_act training


@pytest.mark.skipif(not fused._common._HAS_ONEDNN, reason="oneDNN's _linear_pointwise is not available")
@pytest.mark.parametrize("act", ops.ACTIVATIONS)
@pytest.mark.parametrize("x_shape", [(5, 8), (2, 3, 8)])
@pytest.mark.parametrize("needs_grad", ["all", "weight"])
@pytest.mark.parametrize("loss", ["weighted", "sum"])
@pytest.mark.parametrize("weight_grad_on_mkl", [True, False])
def test_linear_act_training_path_matches(act, x_shape, needs_grad, loss, weight_grad_on_mkl, monkeypatch):
    """With gradients needed, float32 CPU linear_act runs _TrainableLinearAct (above the small-linear
    threshold, lowered here); values and the gradients of x, weight and bias equal
    act(F.linear(x, w, b)), with the weight gradient on MKL (Intel CPUs) or oneDNN (others).
    (``loss="sum"`` hands the backward a stride-0 gradient.)"""
    monkeypatch.setattr(fused.linear, "ONEDNN_LINEAR_MIN_MACS", 0)
    monkeypatch.setattr(fused.linear, "MKL_GEMMS_FAST", weight_grad_on_mkl)
    if act != "none" and not ops._use_kernel(torch.ones(1)):
        pytest.skip("the trainable path needs the bias_act kernels for an activation")
    tensors = [torch.randn(x_shape), torch.randn(6, 8), torch.randn(6)]
    flags = [needs_grad == "all", True, needs_grad == "all"]
    inputs = [t.clone().requires_grad_(f) for t, f in zip(tensors, flags)]
    ref_inputs = [t.clone().requires_grad_(f) for t, f in zip(tensors, flags)]
    y = fused.linear_act(*inputs, act)
    expected = ops._ACTIVATION_FNS[act](F.linear(*ref_inputs))
    assert "_TrainableLinearAct" in type(y.grad_fn).__name__
    assert y.shape == (*x_shape[:-1], 6)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn(y.shape)

    def total(out):
        return (out * weights).sum() if loss == "weighted" else out.sum()

    got = torch.autograd.grad(total(y), [t for t in inputs if t.requires_grad])
    want = torch.autograd.grad(total(expected), [t for t in ref_inputs if t.requires_grad])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- GPT under compile


def test_optimized_gpt_survives_torch_compile():
    """torch.compile of the optimized GPT (fused attention inside) gives the original's outputs."""
    model = _gpt().eval()
    fast = tg.optimize(model)
    assert _attention_nodes(fast)
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)


def _channels_last_convs(model) -> list:
    return [n for n in model.graph.nodes
            if n.target is fused.conv2d_act and n.kwargs.get("channels_last", False)]


class _ConvOutputs(torch.fx.Interpreter):
    """Runs a model node by node, keeping what each fused.conv2d_act call returned."""

    def __init__(self, model):
        super().__init__(model)
        self.outputs = []

    def call_function(self, target, args, kwargs):
        result = super().call_function(target, args, kwargs)
        if target is fused.conv2d_act:
            self.outputs.append(result)
        return result


def test_inference_runs_conv_stacks_channels_last():
    """By default the ungrouped convs answer in channels_last; what leaves the stack is contiguous,
    the weights (state_dict) keep their layout, and channels_last=False keeps every tensor contiguous."""
    model = _randomize(applications.resnet18(num_classes=10, input_shape=(3, 32, 32)))
    fast = _check_outputs(model, torch.randn(2, 3, 32, 32), atol=1e-4)
    convs = [n for n in fast.graph.nodes if n.target is fused.conv2d_act]
    assert convs and _channels_last_convs(fast) == convs
    assert all(t.is_contiguous() for t in fast.state_dict().values())
    with torch.no_grad():
        recorder = _ConvOutputs(fast)
        out = recorder.run(torch.randn(2, 3, 32, 32))
    assert out.is_contiguous() and len(recorder.outputs) == len(convs)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in recorder.outputs)
    plain = _check_outputs(model, torch.randn(2, 3, 32, 32), atol=1e-4, channels_last=False)
    assert not _channels_last_convs(plain)


def test_grouped_conv_stays_in_the_stack_and_views_get_contiguous_inputs():
    """A depthwise conv runs channels_last inside the stack (1.7-3x faster than NCHW here); a view
    after the stack reads a contiguous tensor."""
    x = tg.Input(shape=(8, 6, 6))
    h = nn.Conv2d(8, 16, 3, padding=1)(x)
    h = F.relu(nn.Conv2d(16, 16, 3, padding=1, groups=16)(h))
    h = nn.Conv2d(16, 4, 1)(h)
    y = nn.Linear(4 * 6 * 6, 3)(h.view(h.size(0), -1))
    fast = _check_outputs(tg.Model(x, [y, h]), torch.randn(2, 8, 6, 6))
    grouped = [n for n in fast.graph.nodes if n.target is fused.conv2d_act and n.args[6] == 16]
    assert len(grouped) == 1 and grouped[0].kwargs == {"channels_last": True}
    assert grouped[0].args[0].target is fused.conv2d_act
    view = next(n for n in fast.graph.nodes if n.target == "view")
    assert view.args[0].target == "contiguous"
    with torch.no_grad():
        assert all(t.is_contiguous() for t in fast(torch.randn(2, 8, 6, 6)))


def test_inference_optimized_model_still_differentiates():
    """Called with an input that requires grad, the inference-optimized conv stack takes the
    standard path (no oneDNN, no channels_last) and its input gradient is the original's."""
    x = tg.Input(shape=(3, 8, 8))
    h = F.relu(nn.BatchNorm2d(16)(nn.Conv2d(3, 16, 3, padding=1)(x)))
    h = F.relu(nn.Conv2d(16, 16, 3, padding=1)(h) + h)
    model = _randomize(tg.Model(x, nn.Linear(16, 2)(torch.flatten(nn.AdaptiveAvgPool2d(1)(h), 1))))
    fast = tg.optimize(model.eval())
    x1 = torch.randn(2, 3, 8, 8, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    fast(x1).sum().backward()
    model(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)


def test_conv_weights_made_under_inference_mode():
    """Weights created inside torch.inference_mode have no version counter: packed per call, not cached."""
    with torch.inference_mode():
        x, w, b = torch.randn(2, 16, 5, 5), torch.randn(8, 16, 3, 3), torch.randn(8)
        for channels_last in (False, True):
            y = fused.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", channels_last=channels_last)
            torch.testing.assert_close(y, F.relu(F.conv2d(x, w, b, padding=1)), atol=1e-4, rtol=1e-4)


def test_saving_an_optimized_model_as_config_says_what_to_do(tmp_path):
    """tg.save (a config + weights) refuses an optimized graph with the fix, and writes nothing."""
    path = tmp_path / "fast.safetensors"
    with pytest.raises(ValueError, match="comes from tg.optimize.*call tg.optimize after tg.load"):
        tg.save(tg.optimize(_gpt()), path)
    assert list(tmp_path.iterdir()) == []
