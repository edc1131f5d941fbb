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
    assert {fused.conv2d_act, ops.add_relu, ops.max_pool2d_inference} <= targets
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


def test_resnet50_optimizes_quickly():
    """Optimizing ResNet-50 takes well under a second (measured: ~0.25 s here)."""
    model = applications.resnet50(num_classes=1000, input_shape=(3, 64, 64))
    start = time.perf_counter()
    tg.optimize(model)
    assert time.perf_counter() - start < 1.0


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


@pytest.mark.parametrize("name", ["torchgraph.optimize", "torchgraph.fused"])
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
