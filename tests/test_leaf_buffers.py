"""tg.from_module with leaves whose forward uses the leaf's own parameters and buffers.

Each module is written the way its community writes it (ViT's cls_token, timm's LayerScale,
nanoGPT's causal `bias` buffer, HF llama's rotary `inv_freq`, BatchNorm-style running statistics,
step counters) and is recorded twice: declared in ``leaf_modules`` (one opaque layer, replayed from
its probe run: NOTE: [Call kinds] in scope_replay.py) and looked through. Both must compute what
eager PyTorch computes, must leave the module's buffers as they were at build time, and must come
back from ``tg.save``/``tg.load`` computing the same.
"""

import copy
import itertools
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg


def check_leaf_and_looked_through(make, inputs, batches, tmp_path, leaf_cls, *, fallback=False):
    """Record ``make()`` with and without ``leaf_cls`` as a leaf; compare with eager on ``batches``.

    ``fallback``: looked through, the module stays one opaque layer with a warning (its forward
    changes its own buffers); otherwise recording must not warn.
    """
    leaves = list(leaf_cls) if isinstance(leaf_cls, tuple) else [leaf_cls]
    for as_leaf in (True, False):
        torch.manual_seed(0)
        net = make()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = tg.from_module(net, *inputs, leaf_modules=leaves if as_leaf else None)
        messages = [str(w.message) for w in caught]
        if fallback and not as_leaf:
            assert any("stays one opaque layer" in m for m in messages), messages
        else:
            assert not messages, messages
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()), "building changed a buffer"
        if as_leaf:
            assert any(n.op == "call_module" and isinstance(model.get_submodule(n.target), leaf_cls)
                       for n in model.graph.nodes)

        path = tmp_path / f"leaf_{as_leaf}.safetensors"
        tg.save(model, path)
        loaded = tg.load(path)
        loaded.train(net.training)
        eager, eager_for_loaded = copy.deepcopy(net), copy.deepcopy(net)
        for batch in batches:  # twice in a row: state a forward changes carries over, as in eager
            for _ in range(2):
                torch.testing.assert_close(model(*batch), eager(*batch), rtol=0, atol=0)
                torch.testing.assert_close(loaded(*batch), eager_for_loaded(*batch), rtol=0, atol=0)
        for key, value in eager.state_dict().items():
            torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The reported case: torch ops on a buffer alone
# ---------------------------------------------------------------------------------------------

@tg.register_layer
class ScaledLinear(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.register_buffer("scale", torch.tensor(3.0))
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        pos = torch.arange(x.size(-1), dtype=x.dtype)
        s = self.scale.clone()
        return self.lin(x) * s + pos


@tg.register_layer
class ScaleFirst(nn.Module):
    """The first torch call of its forward is on a buffer, before any on the input."""

    def __init__(self, dim=8):
        super().__init__()
        self.register_buffer("scale", torch.tensor(2.0))
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        s = self.scale.exp()
        return self.lin(x) * s


class TwoScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = ScaledLinear()
        self.second = ScaleFirst()

    def forward(self, x):
        return self.second(self.first(x) + 1)


def test_buffer_cloned_in_a_leaf(tmp_path):
    """`self.scale.clone()` / `self.scale.exp()` in a leaf's forward, also as its first torch call."""
    check_leaf_and_looked_through(TwoScaled, [(8,)], [(torch.randn(3, 8),), (torch.randn(5, 8),)], tmp_path,
                                  (ScaledLinear, ScaleFirst))


# ---------------------------------------------------------------------------------------------
# ViT / timm: parameters read directly
# ---------------------------------------------------------------------------------------------

@tg.register_layer
class LayerScale(nn.Module):  # timm.layers.LayerScale
    def __init__(self, dim, init_values=1e-5, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


@tg.register_layer
class ViTEmbed(nn.Module):  # cls token and position embedding as in timm's VisionTransformer._pos_embed
    def __init__(self, patch=4, dim=16, num_patches=4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.pos_embed[:, : x.shape[1]]


class TinyViT(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.embed = ViTEmbed(dim=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Linear(dim, dim)
        self.ls = LayerScale(dim, init_values=0.1)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.ls(self.mlp(self.norm(x)))
        return self.head(x[:, 0])


def test_vit_cls_token_pos_embed_and_layer_scale(tmp_path):
    """`self.cls_token.expand(B, -1, -1)`, `self.pos_embed[:, :n]`, `x * self.gamma` in leaves."""
    check_leaf_and_looked_through(TinyViT, [(3, 8, 8)], [(torch.randn(2, 3, 8, 8),), (torch.randn(4, 3, 8, 8),)],
                                  tmp_path, (ViTEmbed, LayerScale))


# ---------------------------------------------------------------------------------------------
# nanoGPT: the causal mask buffer, sliced by the sequence length
# ---------------------------------------------------------------------------------------------

@tg.register_layer
class CausalSelfAttention(nn.Module):  # karpathy/nanoGPT model.py, the non-flash path
    def __init__(self, n_embd=16, n_head=2, block_size=12):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                             .view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPTBlock(nn.Module):
    def __init__(self, n_embd=16):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd)

    def forward(self, x):
        return x + self.attn(self.ln_1(x))


def test_nanogpt_causal_mask_buffer_at_every_length(tmp_path):
    """`self.bias[:, :, :T, :T]` with a dynamic sequence length: exact at several lengths."""
    seq = tg.Input(shape=(tg.Dim("seq", max=12), 16))
    check_leaf_and_looked_through(GPTBlock, [seq], [(torch.randn(2, t, 16),) for t in (3, 7, 12)], tmp_path,
                                  CausalSelfAttention)


# ---------------------------------------------------------------------------------------------
# HF llama: rotary embeddings from a non-persistent inv_freq buffer
# ---------------------------------------------------------------------------------------------

@tg.register_layer
class LlamaRotaryEmbedding(nn.Module):  # transformers' LlamaRotaryEmbedding.forward (default rope)
    def __init__(self, dim=8, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = 1.0

    def forward(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class RotaryQuery(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.rotary_emb = LlamaRotaryEmbedding(dim)

    def forward(self, x, position_ids):
        cos, sin = self.rotary_emb(x, position_ids)
        q = self.q_proj(x)
        return q * cos + rotate_half(q) * sin


def test_llama_rotary_inv_freq_buffer(tmp_path):
    """`self.inv_freq[None, :, None]...` as the leaf's first torch call; a non-persistent buffer."""
    inputs = [tg.Input(shape=("seq", 8), name="x"), tg.Input(shape=("seq",), dtype=torch.long, name="position_ids")]
    batches = [(torch.randn(2, t, 8), torch.arange(t).expand(2, t) + offset) for t, offset in ((5, 0), (9, 3))]
    check_leaf_and_looked_through(RotaryQuery, inputs, batches, tmp_path, LlamaRotaryEmbedding)


# ---------------------------------------------------------------------------------------------
# Meta's and torchtitan's rotary embeddings: a complex64 table in a non-persistent buffer
# ---------------------------------------------------------------------------------------------

@tg.register_layer
class ComplexRotaryQuery(nn.Module):
    """``apply_rotary_emb`` of llama/model.py and torchtitan on a query, its ``freqs_cis`` a buffer."""

    def __init__(self, dim=8, end=16, theta=10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        freqs = torch.outer(torch.arange(end), freqs).float()
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(freqs), freqs), persistent=False)
        self.wq = nn.Linear(dim, dim)

    def forward(self, x):
        xq = self.wq(x)
        xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
        freqs_cis = self.freqs_cis[: x.shape[1]]
        return torch.view_as_real(xq_ * freqs_cis).flatten(2).type_as(x)


class RotaryBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.rotary = ComplexRotaryQuery()
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        return self.out(self.rotary(x))


def test_complex_rotary_table_buffer(tmp_path):
    """The complex table is written into the file's config (real and imaginary parts) and comes back
    exactly: a recording of Meta's or torchtitan's LLaMA could not be saved before."""
    check_leaf_and_looked_through(RotaryBlock, [(10, 8)], [(torch.randn(2, 10, 8),)], tmp_path,
                                  ComplexRotaryQuery)


def test_complex_constant_of_the_wrong_length_is_refused():
    model = tg.from_module(ComplexRotaryQuery(), (10, 8))
    config = model.get_config()
    entry = next(e for e in config["constants"] if e["dtype"] == "complex64")
    assert len(entry["value"]) == 2 * 16 * 4  # 16 x 4 complex numbers, real and imaginary parts
    entry["value"] = entry["value"][:-1]
    with pytest.raises(ValueError, match="flat list of 128 numbers \\(real and imaginary parts"):
        tg.Model.from_config(config)


# ---------------------------------------------------------------------------------------------
# Running statistics: read in eval mode, updated in train mode
# ---------------------------------------------------------------------------------------------

@tg.register_layer
class RunningNorm(nn.Module):
    """BatchNorm written by hand: reads `self.running_mean`, updates it in train mode."""

    def __init__(self, dim=6, momentum=0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.randn(dim))
        self.register_buffer("running_var", torch.rand(dim) + 0.5)

    def forward(self, x):
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / torch.sqrt(var + 1e-5)


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = RunningNorm()

    def forward(self, x):
        return self.norm(self.fc(x))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_running_statistics_read_and_updated(tmp_path, train):
    """Eval reads the running statistics; train updates them at run time (never at build time)."""
    check_leaf_and_looked_through(lambda: NormNet().train(train), [(4,)],
                                  [(torch.randn(5, 4),), (torch.randn(3, 4),)], tmp_path, RunningNorm,
                                  fallback=True)  # looked through, it differs between train and eval


# ---------------------------------------------------------------------------------------------
# A step counter mutated in forward
# ---------------------------------------------------------------------------------------------

@tg.register_layer
class StepScaled(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.register_buffer("steps", torch.tensor(0))
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        y = self.lin(x)
        self.steps.add_(1)
        return y * self.steps, self.steps.clone()


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.counter = StepScaled()

    def forward(self, x):
        y, steps = self.counter(x)
        return y + steps


def test_buffer_mutated_in_forward(tmp_path):
    """`self.steps.add_(1)`: counted at every run of the model, never by building it."""
    check_leaf_and_looked_through(Counting, [(4,)], [(torch.randn(2, 4),), (torch.randn(3, 4),)], tmp_path,
                                  StepScaled, fallback=True)


# ---------------------------------------------------------------------------------------------
# A leaf given a dynamic size
# ---------------------------------------------------------------------------------------------

@tg.register_layer
class AddPositions(nn.Module):
    def forward(self, x, n):
        return x + torch.arange(n, dtype=x.dtype)


class Positions(nn.Module):
    def __init__(self):
        super().__init__()
        self.add_positions = AddPositions()

    def forward(self, x):
        return self.add_positions(x, x.size(1))


def test_leaf_given_a_dynamic_size(tmp_path):
    """`torch.arange(n)` in a leaf called with n = x.size(1), a dynamic size."""
    check_leaf_and_looked_through(Positions, [tg.Input(shape=("n",))], [(torch.randn(2, 5),), (torch.randn(3, 9),)],
                                  tmp_path, AddPositions)


# ---------------------------------------------------------------------------------------------
# A forward that really differs between calls: the error says what differed
# ---------------------------------------------------------------------------------------------

_CALLS = itertools.count()


class Alternating(nn.Module):
    """Chooses its operations by a call counter: every call does something else than the last."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x):
        if next(_CALLS) % 2:
            return x * self.scale
        return x + self.scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.alternating = Alternating()

    def forward(self, x):
        return self.alternating(self.fc(x))


@pytest.mark.parametrize("as_leaf", [True, False], ids=["leaf", "looked_through"])
def test_forward_that_differs_between_calls_names_the_operations(as_leaf):
    """The GraphBuildError names the layer, both operations and their arguments (dims, buffer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # looked through, it first falls back to one layer (warned)
        with pytest.raises(tg.GraphBuildError) as info:
            tg.from_module(Net(), (4,), leaf_modules=[Alternating] if as_leaf else None)
    text = str(info.value)
    assert text.startswith("Layer 'alternating' (Alternating()): its forward did different operations")
    received, expected = ("'add'", "'mul'") if "received 'add'" in text else ("'mul'", "'add'")
    assert f"Expected operation 1 to be {expected} on ((None, 4) float32, buffer 'scale' (4,) float32)" in text
    assert f"received {received} on ((None, 4) float32, buffer 'scale' (4,) float32)" in text
    assert "not from random numbers, call counters" in text
    assert "test_leaf_buffers.py:" in text  # where the differing call is


# ---------------------------------------------------------------------------------------------
# Constants computed before the first use of an input (also in a plain tg.Model)
# ---------------------------------------------------------------------------------------------

@tg.register_layer
class Ramp(nn.Module):
    """Operations on a constant before the inputs are touched: they run for real in the call itself."""

    def forward(self, x):
        ramp = torch.arange(4).float() * 2
        return x + ramp.softmax(0)


class Ramped(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.ramp = Ramp()

    def forward(self, x):
        return self.ramp(self.fc(x))


def test_constants_computed_before_the_inputs_are_used(tmp_path):
    """`torch.arange(4).float() * 2` before the first operation on the input, in a layer."""
    check_leaf_and_looked_through(Ramped, [(4,)], [(torch.randn(2, 4),)], tmp_path, Ramp)
    x = tg.Input(shape=(4,))
    model = tg.Model(x, Ramp()(x))
    data = torch.randn(3, 4)
    torch.testing.assert_close(model(data), Ramp()(data), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Nested leaves, one of them called twice
# ---------------------------------------------------------------------------------------------

@tg.register_layer
class InnerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0, 4.0]))

    def forward(self, x):
        s = self.scale.clone()
        return x * s


@tg.register_layer
class OuterGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = InnerScale()
        self.p = nn.Parameter(torch.randn(4))

    def forward(self, x):
        bias = self.p.sigmoid() * 2  # a parameter's chain before the input is used
        return self.inner(x) + bias


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gate = OuterGate()

    def forward(self, x):
        return self.gate(self.lin(x)) + self.gate(x)


@pytest.mark.parametrize("leaves", [(OuterGate,), (InnerScale,), (OuterGate, InnerScale)],
                         ids=["outer", "inner", "both"])
def test_nested_leaves_called_twice(tmp_path, leaves):
    """A leaf inside a leaf, the outer one called twice, buffers and parameters used alone."""
    check_leaf_and_looked_through(Shared, [(4,)], [(torch.randn(3, 4),)], tmp_path, leaves)


# ---------------------------------------------------------------------------------------------
# The real transformers LlamaRotaryEmbedding (random-init config, nothing downloaded)
# ---------------------------------------------------------------------------------------------

def test_transformers_llama_rotary_embedding_as_a_leaf():
    """transformers' own LlamaRotaryEmbedding and LlamaDecoderLayers, the rotary kept as a leaf."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    class LlamaStack(nn.Module):  # LlamaModel.forward without its cache and mask plumbing
        def __init__(self, config):
            super().__init__()
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.decoder = nn.ModuleList(modeling_llama.LlamaDecoderLayer(config, i)
                                         for i in range(config.num_hidden_layers))
            self.norm = modeling_llama.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.rotary_emb = modeling_llama.LlamaRotaryEmbedding(config)

        def forward(self, input_ids, position_ids):
            h = self.embed_tokens(input_ids)
            position_embeddings = self.rotary_emb(h, position_ids)
            for layer in self.decoder:
                h = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
            return self.norm(h)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    net = LlamaStack(config).eval()
    inputs = (tg.Input(shape=("seq",), dtype=torch.long, name="input_ids"),
              tg.Input(shape=("seq",), dtype=torch.long, name="position_ids"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = tg.from_module(net, *inputs, leaf_modules=[modeling_llama.LlamaRotaryEmbedding,
                                                           modeling_llama.LlamaAttention])
    assert isinstance(model.get_submodule("rotary_emb"), modeling_llama.LlamaRotaryEmbedding)
    for t in (7, 12):
        ids, positions = torch.randint(0, 100, (2, t)), torch.arange(t).expand(2, t)
        torch.testing.assert_close(model(ids, positions), net(ids, positions), rtol=0, atol=0)
