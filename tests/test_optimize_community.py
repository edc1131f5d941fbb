"""tg.optimize on the community reference models (tests/community_models): parity with eager for
every architecture, gradients in training mode, what stays opaque and why, bfloat16 accuracy."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models import ARCHITECTURES, input_symbol, tensor_leaves
from torchgraph import fused, ops
from torchgraph.passes import bfloat16_supported
from torchgraph.symbolic import SymbolicTensor

# Modules that stay one call, with the reason (docs/optimize.md, "Known limits"). Modules torch.fx cannot
# trace (HuggingFace's BertModel, nanoGPT's manual CausalSelfAttention) are recorded instead.
OPAQUE = {
    "with_data_dependent_block": {"DataDependent"},  # `if x.sum() > 0:`
}
# What each architecture must fuse into (at least).
FUSED = {
    "resnet18": {fused.conv2d_act, fused.conv2d_add_act, ops.max_pool2d_inference},
    "resnet50": {fused.conv2d_act, fused.conv2d_add_act, ops.max_pool2d_inference},
    "mobilenet_v2": {fused.conv2d_act, fused.conv2d_add_act},
    "mobilenet_v3_small": {fused.conv2d_act, fused.linear_act},
    # nn.TransformerEncoder called with src_key_padding_mask (tests/test_key_padding.py)
    "transformer_classifier": {fused.qkv_attention_on_rows, fused.padded_output_as_nested, ops.add_layer_norm,
                               fused.linear_act},
    "transformer_classifier_prenorm": {fused.qkv_attention_with_padding, ops.add_layer_norm, fused.linear_act},
    "vit": {fused.qkv_attention, ops.add_layer_norm, fused.linear_act},
    "vit_manual_attention": {fused.qkv_attention, ops.add_layer_norm, fused.linear_act},
    "nanogpt": {fused.qkv_attention, ops.add_layer_norm, fused.linear_act},
    "nanogpt_manual_attention": {fused.qkv_attention, ops.add_layer_norm, fused.linear_act},
    "efficientnet_b0": {fused.conv2d_act, fused.conv2d_add_act, fused.linear_act},
    "shufflenet_v2": {fused.conv2d_act, ops.max_pool2d_inference, fused.linear_act},
    "densenet": {fused.conv2d_act, ops.max_pool2d_inference, fused.linear_act},
    "unet": {fused.conv2d_act},
    "siamese": {fused.conv2d_act, fused.linear_act},
    # recorded by tg.from_module where torch.fx cannot trace them (NOTE: [Recorded inlining])
    "hf_bert": {ops.add_layer_norm, fused.linear_act, fused.scaled_dot_product_attention},
    "hf_gpt2": {ops.add_layer_norm, fused.linear_act, fused.scaled_dot_product_attention},
    "hf_llama": {fused.linear_act, fused.scaled_dot_product_attention, ops.rms_norm_inference},
}


def _leaves(out) -> list:
    if isinstance(out, (SymbolicTensor, torch.Tensor)):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [leaf for item in out for leaf in _leaves(item)]
    return []


def _record(arch, module: nn.Module) -> tg.Model:
    """``module`` recorded as one call of a tg.Model (sequence length fixed at the arch's)."""
    inputs = [tg.Input(shape=tuple(arch.seq_len if d is None else d for d in spec.shape), dtype=spec.dtype,
                       name=input_symbol(spec.name)) for spec in arch.inputs]
    outputs = _leaves(module(*inputs))
    return tg.Model(inputs if len(inputs) > 1 else inputs[0], outputs if len(outputs) > 1 else outputs[0])


def _double(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


def _as_list(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def assert_as_close_as_eager(got: list, expected: list, exact: list) -> None:
    """``got`` (the optimized outputs) is, against ``exact`` (float64 eager), no further off than 4x eager
    float32's own error (``expected``), or 1e-5 of the output's size; same devices, shapes and dtypes.

    NOTE: the BatchNorm statistics of the community models make their outputs O(1) (registry.py), and
    ResNet-50's scale eager's rounding errors to 6e-5 of its output."""
    assert len(got) == len(expected) == len(exact)
    for g, e, e64 in zip(got, expected, exact):
        assert g.device == e.device and g.shape == e.shape and g.dtype == e.dtype
        if not g.is_floating_point():
            assert torch.equal(g, e)
            continue
        scale = max(1.0, e64.abs().max().item())
        eager_error = (e.double() - e64).abs().max().item()
        error = (g.double() - e64).abs().max().item()
        assert error <= max(4 * eager_error, 1e-5 * scale), (error, eager_error, scale)


def optimized_as_eager(arch) -> tuple[nn.Module, tg.Model]:
    """``arch``'s model (eval) and ``tg.optimize`` of its recording, the optimized outputs checked against eager's
    on ``arch``'s inputs (:func:`assert_as_close_as_eager`)."""
    module = arch.make_model().eval()
    fast = tg.optimize(_record(arch, module))
    inputs = arch.make_inputs()
    with torch.no_grad():
        expected = tensor_leaves(module(*inputs))
        exact = tensor_leaves(copy.deepcopy(module).double()(*[_double(t) for t in inputs]))
        got = _as_list(fast(*inputs))
    assert_as_close_as_eager(got, expected, exact)
    return module, fast


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_optimized_matches_eager(name):
    """Every community architecture, recorded as one module call, optimizes to a model whose outputs
    equal eager's; its layers are inlined down to torch.nn layers except the documented opaque ones."""
    _, fast = optimized_as_eager(ARCHITECTURES[name])
    called = {type(fast.get_submodule(n.target)) for n in fast.graph.nodes if n.op == "call_module"}
    opaque = {cls.__name__ for cls in called if not cls.__module__.startswith("torch.nn.")
              or cls is nn.TransformerEncoder}
    assert opaque == OPAQUE.get(name, set())
    targets = {n.target for n in fast.graph.nodes if n.op == "call_function"}
    assert FUSED.get(name, set()) <= targets


@pytest.mark.parametrize("name", ["resnet18", "vit", "nanogpt"])
def test_training_mode_gradients_match(name):
    """inference=False on community models: every parameter's gradient equals eager's."""
    arch = ARCHITECTURES[name]
    module, reference = arch.make_model(), arch.make_model()
    fast = tg.optimize(_record(arch, module).train(), inference=False)
    assert_gradients_match(arch, fast, reference)


def assert_gradients_match(arch, fast: tg.Model, reference: nn.Module) -> None:
    """One backward of ``fast`` (trainable, recorded from a copy of ``reference``) and of eager ``reference``
    on ``arch``'s inputs, same dropout draws: every parameter's gradient is eager's."""
    inputs = arch.make_inputs()
    torch.manual_seed(0)
    tensor_leaves(reference.train()(*inputs))[0].square().mean().backward()
    torch.manual_seed(0)
    _as_list(fast(*inputs))[0].square().mean().backward()
    grads = dict(reference.named_parameters())
    for key, p in fast.named_parameters():
        want = grads[key.split(".", 1)[1]].grad
        if want is None:
            assert p.grad is None or not p.grad.any(), key
            continue
        torch.testing.assert_close(p.grad, want, atol=1e-5 + 1e-3 * want.abs().max().item(), rtol=1e-3)


@pytest.mark.skipif(not bfloat16_supported()[0], reason="this CPU has no native bfloat16")
@pytest.mark.parametrize("name", ["resnet50", "vit", "nanogpt"])
def test_bfloat16_accuracy(name):
    """dtype=torch.bfloat16 on community models: float32 out, within bf16 rounding of float32 eager
    (max error <= 5% of the largest output; the benchmark prints the exact figures)."""
    arch = ARCHITECTURES[name]
    module = arch.make_model().eval()
    fast = tg.optimize(_record(arch, module), dtype=torch.bfloat16)
    assert_bfloat16_as_close_as_eager(module, fast, arch.make_inputs())


def assert_bfloat16_as_close_as_eager(module: nn.Module, fast: tg.Model, inputs: list) -> None:
    """``fast`` (optimized with dtype=torch.bfloat16) answers float32 on ``module``'s device, within 5% of the
    output's size of float32 eager, or (ResNet-50 at test size, whose narrow layers scale rounding errors up)
    no further off than twice eager's own bfloat16 model."""
    with torch.no_grad():
        expected = tensor_leaves(module(*inputs))[0]
        got = _as_list(fast(*inputs))[0]
    assert got.dtype == torch.float32 and got.device == expected.device
    eager_bf16 = copy.deepcopy(module).bfloat16()
    bf16_inputs = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        eager_error = (tensor_leaves(eager_bf16(*bf16_inputs))[0].float() - expected).abs().max()
    error = (got - expected).abs().max()
    assert error <= max(0.05 * expected.abs().max(), 2 * eager_error), (error, eager_error)
