"""LLaMA 3 as torchtitan writes it (tests/community_models/llama_titan.py) through torchgraph.

torch-native spellings: ``nn.RMSNorm``, SDPA behind a wrapper module, complex rotary embeddings from a
buffer passed to every block, ``repeat_kv`` for grouped-query attention, ``nn.ModuleDict`` blocks.
"""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
import torchgraph.ops as ops
from community_models.llama_titan import Attention, Transformer, TransformerModelArgs
from torchgraph import fused, passes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _net(**overrides) -> Transformer:
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)
    net = Transformer(TransformerModelArgs(**{**args, **overrides}))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return net


def _model(net: Transformer, seq: int = 16) -> tg.Model:
    tokens = tg.Input(shape=(seq,), dtype=torch.long, name="tokens")
    return tg.Model(tokens, net(tokens))


def _tokens(batch: int = 3, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_recordings_match_eager_and_the_recording_saves(tmp_path):
    """The recording keeps the complex rotary table, a non-persistent buffer, and a file keeps it too
    (NOTE: [Complex constants] in torchgraph/config.py)."""
    net = _net().eval()
    tokens = _tokens()
    with torch.no_grad():
        expected = net(tokens)
        torch.testing.assert_close(_model(net)(tokens), expected, atol=1e-6, rtol=1e-6)
        recorded = tg.from_module(net, tg.Input(shape=(16,), dtype=torch.long))
        torch.testing.assert_close(recorded(tokens), expected, atol=1e-6, rtol=1e-6)
        tg.save(recorded, tmp_path / "titan.safetensors")
        loaded = tg.load(tmp_path / "titan.safetensors").eval()
        torch.testing.assert_close(loaded(tokens), expected, atol=0, rtol=0)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_optimize_inlines_the_attention_and_fuses_the_norms(qk_norm):
    """fx cannot trace the attention (``*xq.shape[:-1]``) and the block passes the rotary buffer, which a
    recording of the attention alone cannot take as an input: the whole transformer is recorded instead
    (NOTE: [Parents of untraceable modules] in passes/inline.py), so SDPA and every norm are in the graph."""
    net = _net(use_qk_norm=qk_norm).eval()
    fast = tg.optimize(_model(net))
    called = [type(fast.get_submodule(n.target)) for n in fast.graph.nodes if n.op == "call_module"]
    assert Attention not in called and nn.RMSNorm not in called
    targets = [n.target for n in fast.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.rms_norm_inference) == 5 + (4 if qk_norm else 0)
    assert targets.count(fused.scaled_dot_product_attention) == 2
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), net(tokens), atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not passes.bfloat16_supported()[0], reason="this CPU has no bfloat16 instructions")
def test_optimize_bfloat16_is_close_to_float32():
    net = _net().eval()
    fast = tg.optimize(_model(net), dtype=torch.bfloat16)
    tokens = _tokens()
    with torch.no_grad():
        out, expected = fast(tokens), net(tokens)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0.1, rtol=0.1)
    assert (out.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_training_graph_gives_the_gradients_of_eager():
    net = _net()
    fast = tg.optimize(_model(net), inference=False)
    tokens = _tokens()
    fast(tokens).square().mean().backward()
    net(tokens).square().mean().backward()
    grads = dict(net.named_parameters())
    for name, param in fast.named_parameters():
        original = grads[name.split(".", 1)[1]]
        torch.testing.assert_close(param.grad, original.grad, atol=1e-5, rtol=1e-4)
