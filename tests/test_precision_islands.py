"""tg.optimize(dtype=torch.bfloat16) on code with float32 islands that never end in the graph (T5's layer
norm: NOTE: [Float32 islands] in torchgraph/passes/precision.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from torchgraph.passes import bfloat16_supported

pytestmark = pytest.mark.skipif(not bfloat16_supported()[0], reason="this CPU has no native bfloat16")


class T5LayerNorm(nn.Module):
    """transformers' T5LayerNorm: upcast for the variance, cast back only if the weight is half precision."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size) + 0.1 * torch.randn(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm = T5LayerNorm(d)
        self.wi = nn.Linear(d, 2 * d, bias=False)
        self.wo = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        return x + self.wo(torch.relu(self.wi(self.norm(x))))


def _relative_error(got, want) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def test_t5_style_norm_computes_in_bfloat16():
    """The float32 island of the norm is cast to bfloat16 where it enters the linear: it runs, float32 out,
    within bfloat16 rounding of eager float32."""
    torch.manual_seed(0)
    net = nn.Sequential(Block(), Block()).eval()
    x = tg.Input(shape=(None, 32))
    fast = tg.optimize(tg.Model(x, net(x)), dtype=torch.bfloat16)
    data = torch.randn(2, 7, 32)
    with torch.no_grad():
        got, want = fast(data), net(data)
    assert got.dtype == torch.float32 and _relative_error(got, want) < 2e-2


def test_huggingface_t5_encoder_optimizes_in_bfloat16():
    """transformers' T5EncoderModel (random init), recorded: tg.optimize(dtype=torch.bfloat16) runs and
    stays within bfloat16 rounding of eager float32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   dropout_rate=0.0)
    net = transformers.T5EncoderModel(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tg.from_module(net, {"input_ids": tg.Input(shape=(tg.Dim("seq", max=32),), dtype=torch.long,
                                                           name="input_ids")})
        fast = tg.optimize(model, dtype=torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = net(input_ids=ids).last_hidden_state
        got = fast(input_ids=ids)["last_hidden_state"]
    assert _relative_error(got, want) < 2e-2
