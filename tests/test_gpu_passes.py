"""Which passes tg.optimize runs for a model on a GPU (NOTE: [Passes on a GPU] in optimize.py), checked on the CPU:
the device tg.optimize reads from the weights is named "cuda" here, the graph it builds runs on the CPU against
eager. tests/test_optimize_cuda.py runs the same choices on a real GPU."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models import ARCHITECTURES, tensor_leaves
from test_optimize_community import _as_list, _record, assert_gradients_match
from torchgraph import fused, ops

OPTIMIZE = sys.modules["torchgraph.optimize"]


@pytest.fixture
def as_if_on_a_gpu(monkeypatch):
    """tg.optimize decides as for a model whose weights are on a GPU."""
    monkeypatch.setattr(OPTIMIZE, "_weights_device", lambda model: torch.device("cuda"))


def _targets(model: tg.Model) -> set:
    return {n.target for n in model.graph.nodes if n.op == "call_function"}


def _modules(model: tg.Model) -> set:
    return {type(model.get_submodule(n.target)) for n in model.graph.nodes if n.op == "call_module"}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "nanogpt", "transformer_classifier"])
def test_gpu_graph_keeps_eager_calls_and_matches_eager(name, as_if_on_a_gpu):
    """Folding and the conv/linear + activation calls stay (no BatchNorm left), the CPU kernels go, and the
    layout stays NCHW (no residual fusion): the graph matches eager."""
    arch = ARCHITECTURES[name]
    module = arch.make_model().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = tg.optimize(_record(arch, module))
    cpu_only = {fused.conv2d_add_act, fused.qkv_attention, fused.scaled_dot_product_attention,
                ops.max_pool2d_inference, ops.rms_norm_inference}
    assert not _targets(fast) & cpu_only
    assert (fused.conv2d_act in _targets(fast)) == (name in ("resnet18", "mobilenet_v2"))
    assert nn.BatchNorm2d not in _modules(fast)
    inputs = arch.make_inputs()
    with torch.no_grad():
        expected = tensor_leaves(module(*inputs))
        got = _as_list(fast(*inputs))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4 * max(1.0, e.abs().max().item()), rtol=1e-4)


def test_gpu_keeps_the_native_transformer_layers(as_if_on_a_gpu, monkeypatch):
    """nn.TransformerEncoderLayer stays one call on a GPU (its fused fast path); on the CPU it is expanded."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    x = tg.Input(shape=(8, 32))
    model = tg.Model(x, nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)(x)).eval()
    native = {nn.TransformerEncoder, nn.TransformerEncoderLayer}
    assert native & _modules(tg.optimize(model))
    monkeypatch.setattr(OPTIMIZE, "_weights_device", lambda model: torch.device("cpu"))
    assert not native & _modules(tg.optimize(model))


def test_cpu_choices_are_unchanged():
    """On the CPU every pass runs, as before: the same model fuses and expands its layers."""
    arch = ARCHITECTURES["resnet18"]
    fast = tg.optimize(_record(arch, arch.make_model().eval()))
    assert {fused.conv2d_act, fused.conv2d_add_act, ops.max_pool2d_inference} <= _targets(fast)


def test_gpu_choices_follow_the_table(as_if_on_a_gpu, monkeypatch):
    """GPU_SKIPPED_PASSES is the switch: emptied, the GPU graph is the CPU's; GPU_CHANNELS_LAST picks the layout."""
    arch = ARCHITECTURES["resnet18"]
    model = _record(arch, arch.make_model().eval())
    monkeypatch.setattr(OPTIMIZE, "GPU_SKIPPED_PASSES", {})
    monkeypatch.setattr(OPTIMIZE, "GPU_CHANNELS_LAST", True)
    assert {fused.conv2d_act, fused.conv2d_add_act} <= _targets(tg.optimize(model))
    monkeypatch.setattr(OPTIMIZE, "GPU_CHANNELS_LAST", False)
    targets = _targets(tg.optimize(model))
    assert fused.conv2d_act in targets and fused.conv2d_add_act not in targets  # the residual fusion needs it


def test_gpu_training_keeps_eager_ops_and_gradients(as_if_on_a_gpu):
    """inference=False on a GPU: no fused call with a custom backward (NOTE: [Training on a GPU]); the
    gradients are eager's."""
    arch = ARCHITECTURES["nanogpt"]
    module, reference = arch.make_model(), arch.make_model()
    fast = tg.optimize(_record(arch, module).train(), inference=False)
    assert not _targets(fast) & {fused.linear_act, fused.conv2d_act, ops.add_layer_norm, ops.add_relu,
                                 fused.qkv_attention}
    assert_gradients_match(arch, fast, reference)
