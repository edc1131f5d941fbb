"""Attention written out with an additive mask and float32 softmax casts (Meta's reference LLaMA, HF's eager
attention) -> ``fused.attention_with_additive_mask`` (SDPA with the mask; NOTE: [Additive masks])."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from community_models.llama_meta import ModelArgs, Transformer
from torchgraph import fused, passes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _masked_calls(model) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "call_function" and n.target is fused.attention_with_additive_mask)


class EagerAttention(nn.Module):
    """HF transformers' ``eager_attention_forward`` (modeling_llama.py) around q/k/v projections, with the
    padding mask HF builds: 0 where a key is real, ``torch.finfo(dtype).min`` where it is padding."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, hidden_states, attention_mask):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        dtype = hidden_states.dtype
        causal_mask = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        attn_weights = torch.matmul(query, key.transpose(2, 3)) * self.scaling
        attn_weights = attn_weights + causal_mask
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
        attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
        return self.o_proj(attn_output.reshape(*input_shape, -1))


def _eager_model():
    net = EagerAttention().eval()
    x, keep = tg.Input(shape=(7, 32), name="x"), tg.Input(shape=(7,), dtype=torch.long, name="attention_mask")
    return net, tg.Model([x, keep], net(x, keep))


def _eager_data():
    keep = torch.ones(3, 7, dtype=torch.long)
    keep[1, 4:] = 0
    return torch.randn(3, 7, 32), keep


def test_hf_eager_attention_with_a_padding_mask():
    net, model = _eager_model()
    fast = tg.optimize(model)
    assert _masked_calls(fast) == 1 and "softmax" not in fast.code
    data = _eager_data()
    with torch.no_grad():
        torch.testing.assert_close(fast(*data), net(*data), atol=1e-5, rtol=1e-5)


def test_trainable_optimization_keeps_gradients():
    """The rewrite holds in training mode too (SDPA with a float mask has a backward)."""
    net, model = _eager_model()
    trainable = tg.optimize(model, inference=False)
    assert _masked_calls(trainable) == 1
    x, keep = _eager_data()
    x_fast = x.clone().requires_grad_()
    x.requires_grad_()
    net(x, keep).square().sum().backward()
    trainable(x_fast, keep).square().sum().backward()
    torch.testing.assert_close(x_fast.grad, x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_meta_llama_attention(dtype):
    """Meta's llama/model.py: `scores + mask` with a -inf causal mask, `F.softmax(scores.float(), dim=-1)
    .type_as(xq)`: one masked attention call per block, eager's outputs."""
    net = Transformer(ModelArgs(n_kv_heads=2)).eval()
    tokens = tg.Input(shape=(16,), dtype=torch.long, name="tokens")
    model = tg.Model(tokens, net(tokens))
    if dtype is not None and not passes.bfloat16_supported()[0]:
        pytest.skip("this CPU has no bfloat16 instructions")
    fast = tg.optimize(model, dtype=dtype)
    assert _masked_calls(fast) == 2
    data = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, expected = fast(data), net(data)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype is None else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(out, expected, **tolerance)


class MaskFromInput(nn.Module):
    """Scores plus a mask the caller passes: a row of it may be -inf at every key."""

    def __init__(self, head_dim=8):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + mask
        return scores.softmax(dim=-1) @ v


def test_a_row_masked_everywhere_gives_eagers_nan():
    """SDPA would give zeros for that query; eager's softmax gives NaN, and so does the optimized model
    (NOTE: [Additive masks]); the other rows match."""
    net = MaskFromInput()
    q, k, v = (tg.Input(shape=(2, 5, 8), name=n) for n in "qkv")
    mask = tg.Input(shape=(1, 5, 5), name="mask")
    model = tg.Model([q, k, v, mask], net(q, k, v, mask))
    fast = tg.optimize(model)
    assert _masked_calls(fast) == 1
    data = [torch.randn(3, 2, 5, 8) for _ in range(3)]
    causal = torch.triu(torch.full((5, 5), float("-inf")), diagonal=1).expand(3, 1, 5, 5).clone()
    dead = causal.clone()
    dead[1, 0, 2] = float("-inf")
    for mode in (torch.no_grad, torch.inference_mode):  # inference tensors have no version counter
        with mode():
            for m in (causal.clone(), dead.clone()):
                expected, out = net(*data, m), fast(*data, m)
                assert torch.equal(torch.isnan(out), torch.isnan(expected))
                torch.testing.assert_close(out.nan_to_num(), expected.nan_to_num(), atol=1e-5, rtol=1e-5)
            assert torch.isnan(expected).any()
    with torch.no_grad():  # the same mask tensor changed in place between calls: checked again
        m = causal.clone()
        assert not torch.isnan(fast(*data, m)).any()
        m[0, 0, 1] = float("-inf")
        assert torch.equal(torch.isnan(fast(*data, m)), torch.isnan(net(*data, m)))


class BooleanMaskAdded(nn.Module):
    """`scores + keep` with a boolean `keep` adds ones (torch promotes it): no mask in SDPA's sense."""

    def forward(self, q, k, v, keep):
        return (q @ k.transpose(-2, -1) + keep).softmax(dim=-1) @ v


def test_a_boolean_added_to_the_scores_stays_as_written():
    net = BooleanMaskAdded()
    q, k, v = (tg.Input(shape=(2, 5, 8), name=n) for n in "qkv")
    keep = tg.Input(shape=(1, 5, 5), dtype=torch.bool, name="keep")
    fast = tg.optimize(tg.Model([q, k, v, keep], net(q, k, v, keep)))
    assert _masked_calls(fast) == 0
    data = [torch.randn(2, 2, 5, 8) for _ in range(3)] + [torch.rand(2, 1, 5, 5) > 0.5]
    with torch.no_grad():
        torch.testing.assert_close(fast(*data), net(*data))


def test_hf_llama_eager_attention():
    pytest.importorskip("transformers")
    from community_models.hf import tiny_llama

    net = tiny_llama(attn_implementation="eager").eval()
    ids, keep = (tg.Input(shape=(12,), dtype=torch.long, name=n) for n in ("input_ids", "attention_mask"))
    model = tg.Model([ids, keep], net(input_ids=ids, attention_mask=keep).last_hidden_state)
    fast = tg.optimize(model)
    assert _masked_calls(fast) == 2
    data = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, :3] = 0  # left padding: the first queries see only padding keys (HF's finfo.min: no NaN)
    with torch.no_grad():
        torch.testing.assert_close(fast(data, mask), net(input_ids=data, attention_mask=mask).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
