"""tg.from_module: existing nn.Modules recorded down to their leaf modules, exactly equivalent.

Small modules written the way PyTorch users write them (subclassed blocks, nn.Sequential stages,
nn.ModuleList loops, tied weights, parameters read directly by forward). The community models
(torchvision, timm, HuggingFace) are in test_from_module_models.py.
"""

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg


def record(module, *inputs, **kwargs):
    """tg.from_module, failing the test on any warning (fallbacks warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return tg.from_module(module, *inputs, **kwargs)


def assert_same_state(model, module):
    """Same keys in the same order, the same tensor objects."""
    assert list(model.state_dict()) == list(module.state_dict())
    theirs = module.state_dict(keep_vars=True)
    assert all(t is theirs[k] for k, t in model.state_dict(keep_vars=True).items())


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        return x + self.gamma * self.mlp(self.norm(x))


class Net(nn.Module):
    """A stem, a ModuleList loop of subclassed blocks, a parameter read by forward, a head."""

    def __init__(self, dim=8, depth=3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.stem = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Dropout(0.0), nn.Linear(dim, 3))
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        h = self.stem(x)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), h], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.head(h[:, 0]) * self.scale


def test_subclassed_model_is_recorded_down_to_leaves():
    """Blocks, the ModuleList loop and nn.Sequential are looked through; leaves keep their paths."""
    torch.manual_seed(0)
    net = Net()
    model = record(net, (5, 4))
    assert isinstance(model, tg.Model) and type(model).__name__ == "Net"
    targets = [n.target for n in model.graph.nodes if n.op == "call_module"]
    assert targets == ["stem"] + [f"blocks.{i}.{p}" for i in range(3)
                                  for p in ("norm", "mlp.0", "mlp.1", "mlp.2")] + ["head.0", "head.1", "head.2"]
    assert "blocks.0.gamma" in {n.target for n in model.graph.nodes if n.op == "get_attr"}
    assert_same_state(model, net)
    for batch in (1, 6):
        x = torch.randn(batch, 5, 4)
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    assert [n.meta.get("tg_scope") for n in model.graph.nodes if n.name == "add"] == ["blocks.0"]


def test_train_and_eval_outputs_match_and_originals_checkpoint_loads():
    """BatchNorm in train mode updates the same statistics; a checkpoint of the original loads."""
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                             nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)), nn.Flatten(),
                             nn.Linear(8 * 6 * 6, 4))

    net, other = make(), make()
    model = record(net, (3, 8, 8))
    checkpoint = copy.deepcopy(other.state_dict())
    model.load_state_dict(checkpoint)  # strict: exactly the original's keys
    assert all(torch.equal(net.state_dict()[k], v) for k, v in checkpoint.items())
    x = torch.randn(4, 3, 8, 8)
    twin = copy.deepcopy(net)
    model.train(), twin.train()
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)
    torch.testing.assert_close(net[1].running_mean, twin[1].running_mean, rtol=0, atol=0)
    assert int(net[1].num_batches_tracked) == 1
    model.eval(), twin.eval()
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)


def test_recording_leaves_the_module_as_it_was():
    """Modes, buffers (BatchNorm statistics, counters) and parameters are unchanged by from_module."""
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    net[2].eval()
    before = copy.deepcopy(net.state_dict())
    record(net, (4,))
    assert net.training and net[1].training and not net[2].training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class TinyGPT(nn.Module):
    """nanoGPT's pattern: tied embedding/head weights, a causal-mask buffer, positions from arange."""

    def __init__(self, vocab=50, dim=16, block_size=8):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab, dim), wpe=nn.Embedding(block_size, dim),
                                              ln_f=nn.LayerNorm(dim)))
        self.attn = nn.Linear(dim, 3 * dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))
        self.register_buffer("rope", torch.arange(block_size).float(), persistent=False)

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos) + self.rope[:t, None]
        q, k, v = self.attn(x).split(x.size(-1), dim=2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[0, :, :t, :t] == 0, float("-inf"))
        x = self.transformer.ln_f(F.softmax(att, dim=-1) @ v)
        return self.lm_head(x)


def test_tied_weights_buffers_and_positions_keep_their_keys():
    """Tied weights stay tied, buffers keep their keys (non-persistent ones stay out of state_dict)."""
    torch.manual_seed(0)
    gpt = TinyGPT()
    model = record(gpt, tg.Input(shape=(8,), dtype=torch.long, name="idx"))
    assert_same_state(model, gpt)
    assert "rope" not in model.state_dict() and "rope" in dict(model.named_buffers())
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 50, (3, 8))
    torch.testing.assert_close(model(idx), gpt(idx), rtol=0, atol=0)
    # One training step on the graph moves the shared weight once, as it would in the original.
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss="cross_entropy")
    model.fit(idx, torch.randint(0, 50, (3, 8, 50)).float().softmax(-1), epochs=1, verbose=0)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    torch.testing.assert_close(model(idx), gpt(idx), rtol=0, atol=0)


class Positions(nn.Module):
    """Operations on parameters alone: they must be recorded (read at run time), never baked."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 10, 4))
        self.table = nn.Embedding(6, 4)

    def forward(self, x):
        return x + self.pos[:, : x.shape[1]].exp() + self.table(torch.arange(6))[: x.shape[1]]


def test_operations_on_parameters_are_recorded_not_baked():
    """After load_state_dict or a training step the graph reads the new values, with gradients."""
    torch.manual_seed(0)
    net = Positions()
    model = record(net, (5, 4))
    assert not [n for n in model.graph.nodes if n.op == "get_attr" and n.target.startswith("constant")
                and model.get_buffer(n.target).dtype.is_floating_point]
    with torch.no_grad():
        net.pos.add_(1.0)
        net.table.weight.mul_(3.0)
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    model(x).sum().backward()
    assert net.pos.grad is not None and net.table.weight.grad is not None


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on data
            return self.fc(x)
        return -x


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        self.calls += 1  # state changed outside any operation on the input
        return self.fc(x)


class ModeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * (0.5 if self.training else 1.0)  # reads the mode (F.dropout & co. follow it)


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * 2


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = DataDependent(), Counter(), ModeBranch(), Hooked()
        self.features = []
        self.d.register_forward_hook(lambda module, args, out: self.features.append(out))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.d(self.c(self.b(self.a(x)))))


def test_unrecordable_submodules_stay_opaque_with_one_warning_each():
    """Data-dependent control flow, state updates, mode-dependent code and hooks: one opaque layer
    each, a warning naming it and why; the outputs stay exact."""
    torch.manual_seed(0)
    net = Mixed()
    with pytest.warns(UserWarning) as caught:
        model = tg.from_module(net, (4,))
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 4
    reasons = {"'a' (DataDependent)": "needs the data of a symbolic tensor",
               "'b' (Counter)": "changes its own tensor 'calls' in place",
               "'c' (ModeBranch)": "different operations in train and eval mode",
               "'d' (Hooked)": "hooks"}
    for who, why in reasons.items():
        assert any(who in m and why in m and "leaf_modules=[" in m for m in messages), (who, messages)
    assert [n.target for n in model.graph.nodes if n.op == "call_module"] == ["a", "b", "c", "d", "head"]
    assert_same_state(model, net)
    net.eval(), model.eval()
    for x in (torch.ones(3, 4), -torch.ones(3, 4)):  # both branches of DataDependent
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    assert int(net.b.calls) == 4  # 2 calls each of the original and the graph: nothing from building
    assert len(net.features) >= 4 and torch.equal(net.features[-1], net.features[-2])  # the hook runs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tg.from_module(net, (4,), leaf_modules=["a", Counter, net.c, Hooked])  # named: no warnings


class RarelyActive(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.abs().sum() > 1e9:  # never on the probe data
            return self.fc(x)
        return x  # the input object itself: the call would vanish from a graph


def test_data_dependent_module_returning_its_input_is_a_call():
    """A fallback module that hands back its input object on the probe data is still a call of the graph
    (NOTE: [Returned inputs]): the model runs it, so it computes on data that takes the other branch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), RarelyActive(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"'1' \(RarelyActive\) stays one opaque layer"):
        model = tg.from_module(net, (4,))
    assert [n.target for n in model.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    for scale in (1.0, 1e10):
        x = torch.randn(3, 4) * scale
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


def test_root_that_cannot_be_recorded_fails_clearly():
    """Hooks on the root itself, or data-dependent code in its own forward: a GraphBuildError."""
    net = Hooked()
    net.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(tg.GraphBuildError, match="Hooked has forward or backward hooks"):
        tg.from_module(net, (4,))
    with pytest.raises(tg.GraphBuildError, match="needs the data of a symbolic tensor"):
        tg.from_module(DataDependent(), (4,))
    with pytest.raises(tg.GraphBuildError, match="different operations in train and eval mode"):
        tg.from_module(RootModeBranch(), (4,))


class RootModeBranch(nn.Module):
    def forward(self, x):
        return x + 1 if self.training else x - 1


def test_hook_changing_an_output_is_a_clear_error():
    """A forward hook that returns a new output cannot be recorded: the error says which and why."""
    net = nn.Sequential(Hooked(), nn.Linear(4, 2))
    net[0].register_forward_hook(lambda module, args, out: out + 1)
    with pytest.raises(tg.GraphBuildError, match="'0' \\(Hooked\\) has forward hooks; one that changes the output"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tg.from_module(net, (4,))


def test_shape_errors_name_the_innermost_layer():
    """A module that cannot run at the given shape fails at build time, naming the layer by path."""
    net = nn.Sequential(nn.Linear(8, 4), nn.Sequential(nn.ReLU(), nn.Linear(5, 2)))
    with pytest.raises(tg.GraphBuildError, match=r"Layer '1\.1' \(Linear.*in_features=5.*received 4"):
        tg.from_module(net, (8,))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(3, 4)

    def forward(self, tokens, features, scale: float = 1.0, extra=None):
        out = self.embed(tokens).mean(1) + self.proj(features)
        return {"out": out * scale, "tokens": tokens} if extra is None else out


def test_inputs_as_shapes_inputs_dicts_and_settings():
    """Shapes become inputs named after forward's arguments; dicts give keywords and plain settings."""
    net = TwoInputs()
    tokens = tg.Input(shape=(None,), dtype=torch.long, name="tokens")
    model = record(net, tokens, (3,))
    assert model.input_names == ["tokens", "features"] and model.output_names == ["out", "tokens"]
    t, f = torch.randint(0, 10, (2, 7)), torch.randn(2, 3)
    torch.testing.assert_close(model(t, f)["out"], net(t, f)["out"], rtol=0, atol=0)
    keyword = record(net, {"tokens": tokens, "features": (3,), "scale": 2.0})
    assert keyword.input_names == ["tokens", "features"]
    torch.testing.assert_close(keyword(tokens=t, features=f)["out"], net(t, f, scale=2.0)["out"], rtol=0, atol=0)


class Generator(nn.Module):
    """``forward(self, input)``, as torch.nn, the DCGAN tutorial and CycleGAN write it."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh())

    def forward(self, input):
        return self.main(input)


def test_a_forward_argument_named_after_a_builtin():
    """``input`` cannot be an argument of generated code: the model takes it as ``input_`` whether given as a
    shape, a dict key or positionally (where it was refused as a dict key: "choose another name", of someone
    else's forward)."""
    net, x = Generator(), torch.randn(2, 3, 5, 5)
    for inputs in ({"input": (3, 5, 5)}, {"input": tg.Input(shape=(3, 5, 5), name="image")}):
        model = record(net, inputs)
        assert model.input_names == ["input_"]
        torch.testing.assert_close(model(input_=x), net(x), rtol=0, atol=0)
    positional = record(net, (3, 5, 5))
    torch.testing.assert_close(positional(x), net(x), rtol=0, atol=0)


def test_bad_inputs_are_clear_errors():
    """No inputs, a real tensor, a computed symbolic tensor, a non-module."""
    net = TwoInputs()
    with pytest.raises(tg.GraphBuildError, match="no inputs given for TwoInputs"):
        tg.from_module(net)
    with pytest.raises(tg.GraphBuildError, match=r"input 1 must be a tg.Input.*real tensor"):
        tg.from_module(net, tg.Input(shape=(3,), dtype=torch.long), torch.randn(2, 3))
    x = tg.Input(shape=(3,))
    with pytest.raises(tg.GraphBuildError, match="computed from other inputs"):
        tg.from_module(nn.Linear(3, 3), x * 2)
    with pytest.raises(TypeError, match="expected an nn.Module; received function"):
        tg.from_module(lambda x: x, (3,))
    with pytest.raises(tg.GraphBuildError, match="leaf_modules names .'nope'.*not submodules"):
        tg.from_module(net, (None,), (3,), leaf_modules=["nope"])


class WithLayers(nn.Module):
    """`self.layers` (the name of a tg.Model property) and an unused submodule."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x).relu()
        return x


def test_submodule_named_like_a_model_property_and_unused_submodules():
    """model.layers is the ModuleList, as in the original; unused submodules keep their weights."""
    net = WithLayers()
    model = record(net, (4,))
    assert model.layers is not net.layers and type(model.layers) is nn.ModuleList
    assert model.layers[0] is net.layers[0] and model.unused is net.unused
    assert_same_state(model, net)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).relu()


def _blocks_under(name: str) -> nn.Module:
    """A module whose looked-through blocks sit in ``self.<name> = nn.ModuleList(...)``."""

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, name, nn.ModuleList([_Block(), _Block()]))

        def forward(self, x):
            for block in getattr(self, name):
                x = block(x)
            return x

    return Top()


@pytest.mark.parametrize("name", ["layers", "inputs", "outputs"])
def test_looked_through_blocks_under_a_model_property_name(name):
    """``self.layers = nn.ModuleList([Block(), ...])`` with the blocks recorded through (HF Llama's
    layout): the names the Model property yields to are kept; it used to fail as a reserved scope."""
    torch.manual_seed(0)
    net = _blocks_under(name)
    model = tg.from_module(net, tg.Input(shape=(4,)))
    assert type(getattr(model, name)) is nn.ModuleList
    assert_same_state(model, net)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["graph", "code", "meta", "optimizer"])
def test_blocks_under_an_attribute_every_model_needs_fail_clearly(name):
    with pytest.raises(tg.GraphBuildError, match=rf"Top has a submodule '{name}' \(ModuleList\), the name of "
                                                 rf"an attribute every tg.Model needs.*Rename that attribute.*"
                                                 rf"self.{name}_ = ") as info:
        tg.from_module(_blocks_under(name), tg.Input(shape=(4,)))
    assert "use_cache" not in str(info.value)  # the outputs hint only follows an outputs error


class _BranchOnLength(nn.Module):
    """Branches on a dynamic length as HF's sdpa_attention does (`elif q_length == 1 and ...`)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.size(1) == 1:  # False at every probe length: recorded as assert(not_(T == 1))
            return self.fc(x) * 2
        if x.size(1) > 1:  # True: recorded as assert(truth(T > 1))
            return self.fc(x) + 1
        return x


def test_branches_on_a_dynamic_length_keep_their_guards_through_save_and_load(tmp_path):
    """The guards of branches on a dynamic size survive tg.save/tg.load (the safe file used to be
    refused: "a call_function node must take at least one value computed by the model") and
    model_from_json (which silently dropped them)."""
    torch.manual_seed(0)
    net = _BranchOnLength()
    model = tg.from_module(net, tg.Input(shape=(None, 4)))
    tg.save(model, tmp_path / "m.safetensors")
    rebuilt = [tg.load(tmp_path / "m.safetensors"), tg.model_from_json(model.to_json())]
    rebuilt[1].load_state_dict(model.state_dict())
    guards = model.code.count("torch._assert(")
    assert guards == 2  # one per branch (the recording in the other mode used to add each again)
    x = torch.randn(2, 5, 4)
    for m in [model, *rebuilt]:
        assert m.code.count("torch._assert(") == guards
        torch.testing.assert_close(m(x), net(x), rtol=0, atol=0)
        with pytest.raises(AssertionError, match=r"the model was built where `if x.size\(1\) == 1:"):
            m(torch.randn(2, 1, 4))


class _WithEmptyContainers(nn.Module):
    """HF ConvNext's first stage: `self.downsampling_layer = nn.ModuleList()` stays empty; likewise
    optional heads kept in an empty nn.ModuleDict."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Module(), nn.Module()])
        for i, stage in enumerate(self.stages):
            stage.downsampling_layer = nn.ModuleList() if i == 0 else nn.ModuleList([nn.Linear(4, 4)])
            stage.block = nn.Linear(4, 4)
        self.heads = nn.ModuleDict()

    def forward(self, x):
        for stage in self.stages:
            for layer in stage.downsampling_layer:
                x = layer(x)
            x = stage.block(x).relu()
        return x


def test_empty_containers_survive_save_and_load(tmp_path):
    """The file used to be refused on load ("container 'stages.0.downsampling_layer' holds nothing")."""
    torch.manual_seed(0)
    net = _WithEmptyContainers()
    model = tg.from_module(net, tg.Input(shape=(4,)))
    tg.save(model, tmp_path / "m.safetensors")
    loaded = tg.load(tmp_path / "m.safetensors")
    assert type(loaded.stages[0].downsampling_layer) is nn.ModuleList and len(loaded.stages[0].downsampling_layer) == 0
    assert type(loaded.heads) is nn.ModuleDict and list(loaded.state_dict()) == list(net.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_a_container_over_an_attribute_or_without_parent_is_refused():
    config = tg.from_module(_WithEmptyContainers(), tg.Input(shape=(4,))).get_config()
    for bad in ("training", "nowhere.list", "stages.0.block.inner"):
        crafted = dict(config, containers={**config["containers"], bad: "ModuleList"})
        with pytest.raises(ValueError, match=f"container '{bad}'"):
            tg.model_from_json(json.dumps(crafted))


def test_result_saves_loads_exports_optimizes_and_trains(tmp_path):
    """Everything in torchgraph works on a from_module model: save/load (same keys, same outputs),
    config, ONNX (verified in onnxruntime), optimize, summary, plot, and a training step."""
    torch.manual_seed(0)
    net = WithLayers()
    model = record(net, (4,))
    x = torch.randn(5, 4)
    tg.save(model, tmp_path / "m.safetensors")
    loaded = tg.load(tmp_path / "m.safetensors")
    assert list(loaded.state_dict()) == list(net.state_dict())
    assert type(loaded.layers) is nn.ModuleList and loaded.unused.weight.shape == (2, 2)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert tg.model_from_json(model.to_json()).code == model.code
    tg.export_onnx(model, tmp_path / "m.onnx")
    torch.testing.assert_close(tg.optimize(model)(x), net(x))
    lines = []
    model.summary(print_fn=lines.append)
    assert "layers.0 (Linear)" in lines[0] or "layers_0 (Linear)" in lines[0]
    model.compile(optimizer="sgd", loss="mse")
    before = net.layers[0].weight.detach().clone()
    model.fit(x, torch.randn(5, 4), epochs=1, verbose=0)
    assert not torch.equal(before, net.layers[0].weight)  # shared with the original


def test_scoped_symbolic_model_names_and_round_trips(tmp_path):
    """tg.scope: dotted layer names (state_dict keys), scopes per node, kept by save/load and pickle."""
    import pickle

    x = tg.Input(shape=(8,))
    with tg.scope("encoder"):
        h = nn.Linear(8, 16)(x).relu()
        with tg.scope("block"):
            h = h + nn.Linear(16, 16)(h)
    model = tg.Model(x, nn.Linear(16, 2)(h))
    assert list(model.state_dict()) == ["encoder.linear.weight", "encoder.linear.bias", "encoder.block.linear.weight",
                                        "encoder.block.linear.bias", "linear.weight", "linear.bias"]
    scopes = {n.name: n.meta.get("tg_scope") for n in model.graph.nodes}
    assert scopes["relu"] == "encoder" and scopes["add"] == "encoder.block" and scopes["linear"] is None
    for copy_ in (pickle.loads(pickle.dumps(model)), tg.load(_saved(model, tmp_path))):
        assert {n.name: n.meta.get("tg_scope") for n in copy_.graph.nodes} == scopes
        assert list(copy_.state_dict()) == list(model.state_dict())
    with pytest.raises(tg.GraphBuildError, match="scope name must be a Python identifier"):
        with tg.scope("two words"):
            pass
    with pytest.raises(tg.GraphBuildError, match="scope name 'layers' is reserved"):
        with tg.scope("layers"):
            y = nn.Linear(8, 2)(x)
        tg.Model(x, y)


def _saved(model, tmp_path):
    path = tmp_path / "scoped.safetensors"
    tg.save(model, path)
    return path


def test_from_module_doc_blocks_run_on_their_own(tmp_path, monkeypatch, capsys):
    """docs/from_module.md: each python block runs alone; its summary text is the real output; the
    picture it shows is committed and is what plot_model draws."""
    import pathlib
    import re
    import struct

    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "from_module.md"
    text = page.read_text()
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 10
    for i, block in enumerate(blocks):
        if "transformers" in block:
            pytest.importorskip("transformers")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(block, f"from_module.md[{i}]", "exec"), {"__name__": "__main__"})
        printed = capsys.readouterr().out
        if i == 0:
            shown = re.search(r"```text\n(.*?)```", text, flags=re.S).group(1)
            assert shown in printed
    picture = (page.parent / "images" / "resnet50_depth1.png").read_bytes()
    width, height = struct.unpack(">II", picture[16:24])
    assert picture[:4] == b"\x89PNG" and 300 < width < 1_000 and 1_000 < height < 2_000


def test_copies_and_pickles_keep_the_module_tree():
    """deepcopy, pickle and torch.save keep the keys, the containers, non-persistent buffers, scopes."""
    import io
    import pickle

    torch.manual_seed(0)
    gpt = TinyGPT()
    model = record(gpt, tg.Input(shape=(8,), dtype=torch.long, name="idx"))
    idx = torch.randint(0, 50, (2, 8))
    expected = model(idx)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                  torch.load(buffer, weights_only=False)):
        assert list(other.state_dict()) == list(gpt.state_dict())
        assert "rope" not in other.state_dict() and type(other.transformer) is nn.ModuleDict
        assert other.lm_head.weight is other.transformer.wte.weight
        assert {n.meta.get("tg_scope") for n in other.graph.nodes} == {n.meta.get("tg_scope") for n in model.graph.nodes}
        torch.testing.assert_close(other(idx), expected, rtol=0, atol=0)


class HalvedInTraining(nn.Module):
    """Records one operation more in train mode than in eval mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h * 0.5 if self.training else h


class Pair(nn.Module):
    def __init__(self, inner: nn.Module, other: nn.Module, relu: bool = True):
        super().__init__()
        self.inner, self.other, self.relu = inner, other, relu

    def forward(self, x):
        h = self.other(self.inner(x))
        return h.relu() if self.relu else h  # without relu the root reads the grandchild's output


def _opaque_and_layers(net):
    with pytest.warns(UserWarning) as caught:
        model = tg.from_module(net, (4,))
    opaque = sorted(str(w.message).split("'")[1] for w in caught if "stays one opaque layer" in str(w.message))
    return model, opaque, [n.target for n in model.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("case", ["child", "siblings", "grandchild"])
def test_a_submodule_recording_more_operations_in_one_mode_stays_opaque_alone(case):
    """A mode-dependent number of records moves the child's values in its parents' records: only the
    innermost differing module becomes opaque, its parents (the root too) are recorded through."""
    torch.manual_seed(0)
    if case == "child":
        net, expected = Pair(HalvedInTraining(), nn.Linear(4, 4)), ["inner"]
        layers = ["inner", "other"]
    elif case == "siblings":
        net, expected = Pair(HalvedInTraining(), HalvedInTraining()), ["inner", "other"]
        layers = ["inner", "other"]
    else:
        net = Pair(nn.Linear(4, 4), Pair(nn.Linear(4, 4), HalvedInTraining(), relu=False))
        expected = ["other.other"]
        layers = ["inner", "other.inner", "other.other"]
    model, opaque, called = _opaque_and_layers(net)
    assert opaque == expected and called == layers
    x = torch.randn(3, 4)
    for mode in (True, False):
        torch.testing.assert_close(model.train(mode)(x), net.train(mode)(x), rtol=0, atol=0)


def test_a_root_differing_itself_still_fails_after_its_children_fall_back():
    """The root reads the mode too: once the child is opaque, the root still differs, and that is an error."""

    class RootAndChild(Pair):
        def forward(self, x):
            h = self.other(self.inner(x))
            return h + 1 if self.training else h - 1

    with pytest.raises(tg.GraphBuildError, match="RootAndChild.forward records different operations"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tg.from_module(RootAndChild(HalvedInTraining(), nn.Linear(4, 4)), (4,))


def test_zero_dim_float_constant_in_a_looked_through_forward():
    """A 0-d float tensor made in a forward (DeBERTa-v2's ``torch.tensor(head_dim, dtype=torch.float)``)
    is compared between the train and eval recordings by its bytes; a 0-d tensor cannot be viewed as
    bytes directly (that raised a RuntimeError and failed the build)."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) / torch.sqrt(torch.tensor(4, dtype=torch.float))

    net = nn.Sequential(Scaled(), nn.ReLU()).eval()
    model = tg.from_module(net, (4,))
    assert [n.target for n in model.graph.nodes if n.op == "call_module"] == ["0.fc", "1"]
    x = torch.randn(3, 4)
    assert torch.equal(model(x), net(x))


def test_sequential_root_saves_and_loads(tmp_path):
    """A model recorded from an nn.Sequential has top-level layers named "0", "1", ... (as the
    original's state_dict keys): tg.save wrote them, and tg.load refused the file ("expected a Python
    identifier"), so what the user saved could not be read back."""
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.ParameterList([nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))])

        def forward(self, x):
            return x * self.w[0] + self.w[1]

    torch.manual_seed(0)
    net = nn.Sequential(Scale(), nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.GELU()),
                        nn.Linear(8, 2)).eval()
    model = tg.from_module(net, (4,))
    tg.save(model, tmp_path / "sequential.safetensors")
    loaded = tg.load(tmp_path / "sequential.safetensors")
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), net(x))
    assert list(loaded.state_dict()) == list(net.state_dict())
    assert isinstance(loaded.get_submodule("3"), nn.Sequential)
    rebuilt = tg.Model.from_config(model.get_config())
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(x), net(x))
