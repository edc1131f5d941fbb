"""tg.optimize on layers written out the HuggingFace way: GPT-2's Conv1D (addmm) and gelu_new, GELU
written with erf (torchgraph/passes/written_layers.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import fused


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as HuggingFace writes it: weight (in, out), addmm."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)
        nn.init.normal_(self.bias, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class NewGELUActivation(nn.Module):
    """transformers.activations.NewGELUActivation (GPT-2's gelu_new)."""

    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class GELUWithErf(nn.Module):
    """The exact GELU as the original BERT code wrote it."""

    def forward(self, x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class GPT2MLP(nn.Module):
    """transformers' GPT2MLP: c_fc -> gelu_new -> c_proj (dropout 0)."""

    def __init__(self, d=32, act=None):
        super().__init__()
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)
        self.act = act or NewGELUActivation()

    def forward(self, hidden_states):
        return self.c_proj(self.act(self.c_fc(hidden_states)))


def _optimized(module, shape=(None, 32), **options):
    x = tg.Input(shape=shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tg.optimize(tg.Model(x, module(x)), **options)


def _targets(model) -> list:
    return [n.target for n in model.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("act", [NewGELUActivation, GELUWithErf])
def test_gpt2_mlp_becomes_fused_linears(act):
    """Conv1D + written-out GELU + Conv1D: two fused linears (GELU in the first's epilogue), no addmm
    and no elementwise chain left, outputs equal eager at several lengths."""
    mlp = GPT2MLP(act=act()).eval()
    fast = _optimized(mlp)
    targets = _targets(fast)
    assert targets.count(fused.linear_act) == 2 and torch.addmm not in targets
    assert not any(t in targets for t in (torch.tanh, torch.erf, torch.pow))
    act_name = [n.args[3] for n in fast.graph.nodes if n.target is fused.linear_act][0]
    assert act_name == ("gelu_tanh" if act is NewGELUActivation else "gelu")
    for length in (3, 10):
        x = torch.randn(2, length, 32)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), mlp(x), atol=1e-5, rtol=1e-5)


def test_optimized_conv1d_state_dict_is_transposed_and_refuses_an_untransposed_checkpoint():
    """The optimized copy's Conv1D is an nn.Linear at the same path: same keys, transposed weight; a
    Conv1D checkpoint fails to load into it loudly. The original model is untouched."""
    mlp = GPT2MLP().eval()
    fast = _optimized(mlp)
    assert isinstance(mlp.c_fc, Conv1D)
    state = fast.state_dict()
    key = next(k for k in state if k.endswith("c_fc.weight"))
    torch.testing.assert_close(state[key], mlp.c_fc.weight.t())
    with pytest.raises(RuntimeError, match="size mismatch"):
        fast.load_state_dict({key.split(".", 1)[0] + "." + k: v for k, v in mlp.state_dict().items()})


def test_training_mode_keeps_addmm_and_matches_gradients():
    """inference=False: Conv1D stays addmm (gradients reach the stored weights), GELU written out
    becomes F.gelu; every gradient equals eager's."""
    mlp, reference = GPT2MLP(), GPT2MLP()
    reference.load_state_dict(mlp.state_dict())
    fast = _optimized(mlp, inference=False)
    assert torch.addmm in _targets(fast) and F.gelu in _targets(fast)
    x = torch.randn(4, 6, 32)
    fast(x).square().mean().backward()
    reference(x).square().mean().backward()
    grads = dict(reference.named_parameters())
    for key, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads[key.split(".", 1)[1]].grad, atol=1e-6, rtol=1e-4)


def test_look_alikes_are_left_as_written():
    """A tanh GELU with another constant, and a Conv1D whose weight is also read elsewhere (tied), stay."""

    class AlmostGELU(nn.Module):
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.04 * torch.pow(x, 3.0))))

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1D(32, 32)

        def forward(self, x):
            return self.proj(x) + x @ self.proj.weight

    for module in (GPT2MLP(act=AlmostGELU()).eval(), Tied().eval()):
        fast = _optimized(module)
        assert torch.addmm in _targets(fast) or torch.tanh in _targets(fast)
        x = torch.randn(2, 5, 32)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), module(x), atol=1e-5, rtol=1e-5)
    assert torch.tanh in _targets(_optimized(GPT2MLP(act=AlmostGELU()).eval()))
    assert torch.addmm in _targets(_optimized(Tied().eval()))


def test_huggingface_gpt2_fuses_every_linear():
    """A HuggingFace GPT2Model (random init) used as one layer: its 4 Conv1Ds per block are fused
    linears, gelu_new in the epilogue; outputs equal eager."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     attn_implementation="sdpa")
    gpt2 = transformers.GPT2Model(config).eval()
    ids = tg.Input(shape=(12,), dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tg.Model(ids, gpt2(ids)[0])
        fast = tg.optimize(model)
    targets = _targets(fast)
    assert targets.count(fused.linear_act) == 8 and torch.addmm not in targets and torch.tanh not in targets
    data = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(fast(data), gpt2(data)[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert F.mse_loss(tg.optimize(model, dtype=torch.bfloat16)(data), gpt2(data)[0]) < 1e-3
