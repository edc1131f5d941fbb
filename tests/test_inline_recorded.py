"""tg.optimize inlines modules torch.fx cannot trace by recording them (NOTE: [Recorded inlining])."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import fused, ops


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class MaskedAttentionPool(nn.Module):
    """Written as research code often is: a branch on ``mask.dim()``, which torch.fx cannot trace."""

    def __init__(self, dim=16):
        super().__init__()
        self.score = nn.Linear(dim, 1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, temperature=None):
        b, t, d = x.shape
        scores = self.score(x.reshape(b * t, d)).view(b, t)
        if temperature is not None:
            scores = scores / temperature
        if mask is not None:
            if mask.dim() == 3:  # (batch, 1, positions), as some pipelines give it
                mask = mask.squeeze(1)
            scores = scores.masked_fill(mask == 0, float("-inf"))
        weights = scores.softmax(dim=-1)
        return F.relu(self.proj((weights.unsqueeze(-1) * x).sum(dim=1)))


def _called(model) -> list:
    return [model.get_submodule(n.target) for n in model.graph.nodes if n.op == "call_module"]


def _masked_model(pool: nn.Module, by_keyword: bool = True) -> tg.Model:
    x = tg.Input(shape=("T", 16), name="x")
    mask = tg.Input(shape=("T",), dtype=torch.long, name="mask")
    return tg.Model([x, mask], pool(x, mask=mask) if by_keyword else pool(x, mask))


def test_untraceable_module_called_with_keywords_is_recorded_and_inlined():
    """A module fx cannot trace, called with a keyword and two inputs that share a dynamic dim, is
    recorded and spliced: its linears fuse, outputs equal eager at several lengths, and the original
    model keeps its module."""
    pool = MaskedAttentionPool()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(pool)  # the premise: fx alone leaves it opaque
    model = _masked_model(pool).eval()
    fast = tg.optimize(model)
    assert not any(isinstance(m, MaskedAttentionPool) for m in _called(fast))
    assert fused.linear_act in [n.target for n in fast.graph.nodes if n.op == "call_function"]
    assert list(fast.state_dict()) == list(model.state_dict())
    assert isinstance(model.get_submodule(next(n.target for n in model.graph.nodes if n.op == "call_module")),
                      MaskedAttentionPool)  # the original model is untouched
    for length in (5, 9):
        x = torch.randn(3, length, 16)
        mask = (torch.rand(3, length) > 0.3).long()
        mask[:, 0] = 1
        with torch.no_grad():
            torch.testing.assert_close(fast(x, mask), pool.eval()(x, mask=mask), atol=1e-5, rtol=1e-5)


def test_recorded_module_trains_with_the_original_gradients():
    """inference=False: the recorded, inlined module gives the same gradients as the module itself."""
    pool, reference = MaskedAttentionPool(), MaskedAttentionPool()
    reference.load_state_dict(pool.state_dict())
    fast = tg.optimize(_masked_model(pool, by_keyword=False).train(), inference=False)
    assert not any(isinstance(m, MaskedAttentionPool) for m in _called(fast))
    x, mask = torch.randn(4, 7, 16), torch.ones(4, 7, dtype=torch.long)
    fast(x, mask).square().mean().backward()
    reference(x, mask=mask).square().mean().backward()
    grads = dict(reference.named_parameters())
    for key, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads[key.split(".", 1)[1]].grad, atol=1e-6, rtol=1e-5)


def test_unrecordable_module_stays_one_call():
    """A module with data-dependent control flow can be neither traced nor recorded: one opaque call."""

    class DataDependent(nn.Module):
        def forward(self, x, mask=None):
            return x * 2 if x.sum() > 0 else x - 1

    module = DataDependent()
    x = tg.Input(shape=(4,))
    model = tg.Model(x, module(x, mask=None))
    fast = tg.optimize(model)
    assert any(isinstance(m, DataDependent) for m in _called(fast))
    data = torch.randn(2, 4)
    torch.testing.assert_close(fast(data), module(data))


def test_recording_attempts_leave_no_build_behind():
    """A failed recording inside tg.optimize ends its build (no process-wide hold left), and tg.optimize
    called in the middle of the user's own build leaves that build alone (the call stays opaque)."""
    from torchgraph.type_info import building

    class DataDependent(nn.Module):
        def forward(self, x, mask=None):
            return x * 2 if x.sum() > 0 else x - 1

    x = tg.Input(shape=(4,))
    tg.optimize(tg.Model(x, DataDependent()(x, mask=None)))
    assert not building()
    pool = MaskedAttentionPool()
    model = _masked_model(pool)
    h = tg.Input(shape=(8,))                      # the user's build is under way
    fast = tg.optimize(model)
    assert any(isinstance(m, MaskedAttentionPool) for m in _called(fast))
    out = tg.Model(h, nn.Linear(8, 2)(h))(torch.randn(3, 8))  # and finishes as usual
    assert out.shape == (3, 2) and not building()
    assert not any(isinstance(m, MaskedAttentionPool) for m in _called(tg.optimize(model)))


def test_huggingface_bert_used_as_a_layer_is_inlined():
    """A HuggingFace BertModel (random init) used as one layer, its ModelOutput read by field name and
    by position: tg.optimize records it, fuses its linears, LayerNorms and attention, and matches eager."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32,
                                     attn_implementation="sdpa")
    bert = transformers.BertModel(config).eval()
    ids = tg.Input(shape=(12,), dtype=torch.long, name="input_ids")
    mask = tg.Input(shape=(12,), dtype=torch.long, name="attention_mask")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = bert(ids, attention_mask=mask)
        model = tg.Model([ids, mask], [out["last_hidden_state"], out[1]]).eval()
        fast = tg.optimize(model)
    assert not any(isinstance(m, transformers.BertModel) for m in _called(fast))
    targets = {n.target for n in fast.graph.nodes if n.op == "call_function"}
    assert {fused.linear_act, ops.add_layer_norm, fused.scaled_dot_product_attention} <= targets
    data = torch.randint(0, 64, (3, 12))
    padding = torch.ones(3, 12, dtype=torch.long)
    padding[1, 8:] = 0
    with torch.no_grad():
        expected = bert(data, attention_mask=padding)
        got = fast(data, padding)
    torch.testing.assert_close(got[0], expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected.pooler_output, atol=1e-5, rtol=1e-5)
