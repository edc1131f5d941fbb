"""tg.from_module records blocks whose residual branch goes through stochastic depth (drop path).

timm's ``DropPath``, torchvision's ``StochasticDepth`` and HuggingFace's ``XxxDropPath`` return their input
object unchanged when not training: the call must still be a layer of the graph (NOTE: [Returned inputs] in
torchgraph/returned_inputs.py), so the blocks around it are recorded through, and the model matches eager in
eval mode and, under the same seed, in train mode.
"""

import warnings

import pytest
import torch
import torch.nn as nn
from test_from_module_models import _assert_equivalent

import torchgraph as tg
from community_models import drop_path as dp


def _record(net, *inputs, drop_path_types=(dp.DropPath, dp.StochasticDepth)):
    """The model, checking that only the drop path modules stayed opaque (each with its warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tg.from_module(net, *inputs)
    opaque = [str(w.message).split("'")[1] for w in caught if "stays one opaque layer" in str(w.message)]
    expected = [name for name, m in net.named_modules() if isinstance(m, drop_path_types)]
    assert sorted(opaque) == sorted(expected)
    return model


def _drop_path_calls(model) -> list:
    return [n.target for n in model.graph.nodes if n.op == "call_module" and
            isinstance(model.get_submodule(n.target), (dp.DropPath, dp.StochasticDepth))]


def test_timm_vit_blocks_with_drop_path():
    """Each DropPath is a layer of the graph (the original's module); the blocks are recorded through."""
    torch.manual_seed(0)
    net = dp.drop_path_vit(depth=2, drop_path_rate=0.1)
    model = _record(net, (5, 16))
    assert _drop_path_calls(model) == ["1.drop_path1", "1.drop_path2", "2.drop_path1", "2.drop_path2"]
    assert model.get_submodule("1.drop_path1") is net[1].drop_path1
    assert not any(m._forward_hooks for m in net.modules())  # the recording's hooks are gone
    assert {"1.attn.qkv", "1.mlp.fc1", "2.norm2"} <= {n.target for n in model.graph.nodes}
    _assert_equivalent(model, net, {"x": torch.randn(4, 5, 16)})


def test_timm_vit_block_as_the_root():
    """The block itself recorded: before, its own forward differed between the modes and the build failed."""
    torch.manual_seed(0)
    net = dp.DropPathViTBlock(32, 4, drop_path=0.1)
    model = _record(net, (5, 32))
    assert _drop_path_calls(model) == ["drop_path1", "drop_path2"]
    _assert_equivalent(model, net, {"x": torch.randn(4, 5, 32)})


def test_timm_convnext_blocks_with_drop_path():
    """ConvNeXt adds the shortcut after drop path (``self.drop_path(x) + shortcut``)."""
    torch.manual_seed(0)
    net = dp.drop_path_convnext(depth=2, drop_path_rate=0.25)
    model = _record(net, (3, 16, 16))
    assert _drop_path_calls(model) == ["1.drop_path", "2.drop_path"]
    _assert_equivalent(model, net, {"x": torch.randn(8, 3, 16, 16)})


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_torchvision_stochastic_depth_in_mbconv(mode):
    """torchvision's MBConv does ``result = self.stochastic_depth(result); result += input`` (in place)."""
    torch.manual_seed(0)
    net = dp.mbconv_net(mode=mode)
    model = _record(net, (3, 8, 8))
    assert _drop_path_calls(model) == ["1.stochastic_depth", "2.stochastic_depth"]
    _assert_equivalent(model, net, {"x": torch.randn(8, 3, 8, 8)})


def test_model_eval_switches_drop_path_and_summary_shows_it():
    """model.eval() turns every drop path off (the identity, as eager); summary lists them as layers."""
    torch.manual_seed(0)
    net = dp.drop_path_convnext(depth=2, drop_path_rate=0.5)
    model = _record(net, (3, 16, 16))
    x = torch.randn(8, 3, 16, 16)
    model.train()
    torch.manual_seed(1)
    trained = model(x)
    torch.manual_seed(2)
    assert not torch.equal(model(x), trained)  # a new mask each call
    model.eval()
    assert not model.get_submodule("1.drop_path").training
    torch.testing.assert_close(model(x), net.eval()(x), rtol=0, atol=0)
    printed = []
    model.summary(print_fn=printed.append)
    assert "\n".join(printed).count(" (DropPath) ") == 2


class _Returned(nn.Module):
    """Returns its input unchanged in eval mode and a new tensor in train mode, like drop path."""

    def forward(self, x):
        return x * 2 if self.training else x


class _InPlaceAfterIdentity(nn.Module):
    """The caller changes the layer's output in place: in eval it is the caller's own input too."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.branch = _Returned()

    def forward(self, x):
        h = self.linear(x)
        y = self.branch(h)
        y.add_(1.0)
        return h * 3 + y


def test_in_place_op_after_a_call_that_returned_its_input():
    """In eval the in-place add changes `h` too (the same object), in the graph as in eager."""
    net = _InPlaceAfterIdentity()
    model = _record(net, (4,), drop_path_types=_Returned)
    assert "branch" in {n.target for n in model.graph.nodes}
    x = torch.randn(3, 4)
    for mode in (False, True):
        net.train(mode)
        model.train(mode)
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    net.eval()
    h = net.linear(x)
    torch.testing.assert_close(net(x), (h + 1) * 3 + (h + 1))  # the alias, spelled out


class _ReturnsPair(nn.Module):
    def forward(self, x):
        if self.training:
            return {"out": x * 0.5, "skip": x + 1}
        return {"out": x, "skip": x + 1}


class _UsesPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.pair = _ReturnsPair()

    def forward(self, x):
        d = self.pair(self.linear(x))
        return d["out"] - d["skip"]


def test_returned_input_inside_a_dict_output():
    """A returned input nested in the layer's outputs is replaced by the call's output there."""
    net = _UsesPair()
    model = _record(net, (4,), drop_path_types=_ReturnsPair)
    _assert_equivalent(model, net, {"x": torch.randn(3, 4)})


@tg.register_layer
class RegisteredDropPath(dp.DropPath):
    """A user's own DropPath class, registered: it saves with its arguments."""


class _OneBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = dp.ConvNeXtBlock(4, drop_path=0.3)
        self.block.drop_path = RegisteredDropPath(0.3)

    def forward(self, x):
        return self.block(self.stem(x))


def test_registered_drop_path_saves_and_loads(tmp_path):
    """A model with a registered DropPath class round-trips through tg.save/tg.load, same outputs in both modes."""
    torch.manual_seed(0)
    net = _OneBlock()
    model = _record(net, (3, 8, 8), drop_path_types=RegisteredDropPath)
    tg.save(model, tmp_path / "m.safetensors")
    loaded = tg.load(tmp_path / "m.safetensors")
    assert isinstance(loaded.get_submodule("block.drop_path"), RegisteredDropPath)
    assert loaded.get_submodule("block.drop_path").drop_prob == 0.3
    x = torch.randn(4, 3, 8, 8)
    for mode in (False, True):
        model.train(mode)
        loaded.train(mode)
        torch.manual_seed(0)
        expected = model(x)
        torch.manual_seed(0)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_unregistered_drop_path_class_saves_as_the_torchgraph_layer(tmp_path):
    """Its constructor arguments are unknown, but it computes like timm's: tg.save stores it as
    tg.layers.DropPath (tests/test_drop_path_save.py covers the spellings and the look-alikes)."""
    torch.manual_seed(0)
    model = _record(dp.drop_path_convnext(depth=1), (3, 16, 16))
    tg.save(model, tmp_path / "m.safetensors")
    assert type(tg.load(tmp_path / "m.safetensors").get_submodule("1.drop_path")) is tg.layers.DropPath


def test_huggingface_swin_with_default_drop_path_rate(tmp_path):
    """SwinModel's SwinDropPath (drop_path_rate 0.1 by default) stays a layer; the stages are recorded through."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.swin.modeling_swin import SwinDropPath

    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                     window_size=4)
    assert config.drop_path_rate == 0.1
    net = transformers.SwinModel(config)
    model = _record(net, {"pixel_values": (3, 32, 32)}, drop_path_types=SwinDropPath)
    called = {n.target for n in model.graph.nodes if n.op == "call_module"}
    dropping = [name for name, m in net.named_modules() if isinstance(m, SwinDropPath)]
    assert dropping == ["encoder.layers.1.blocks.0.drop_path"]  # the rates rise from 0 (nn.Identity) to 0.1
    assert set(dropping) <= called and "encoder.layers.1.blocks.0.attention.q_proj" in called
    _assert_equivalent(model, net, {"pixel_values": torch.randn(2, 3, 32, 32)})
    tg.save(model, tmp_path / "m.safetensors")  # as tg.layers.DropPath (tests/test_drop_path_save.py)


def test_hand_written_build_keeps_a_drop_path_already_in_eval_mode():
    """``y = drop_path(h)`` in hand-written symbolic code with a DropPath in eval mode: its forward
    returns its input without an operation, and the graph skipped the layer (silently: model.train()
    then never dropped a path). The call is now a layer of the graph, and the hook that finds it is
    installed only while the thread builds."""
    from torch.nn.modules.module import _global_forward_hooks

    torch.manual_seed(0)
    linear, drop = nn.Linear(16, 16), dp.DropPath(0.5).eval()
    x = tg.Input(shape=(16,))
    assert len(_global_forward_hooks) == 1  # the build's hook
    h = linear(x)
    model = tg.Model(x, h + drop(h))
    assert not _global_forward_hooks  # gone with the build: other module calls take torch's fast path
    # ... and no stale with_kwargs mark of it (torch.compile then warns of global hooks for good)
    from torch.nn.modules import module as module_hooks
    assert not getattr(module_hooks, "_global_forward_hooks_with_kwargs", {})
    assert [n.target for n in model.graph.nodes if n.op == "call_module"] == ["linear", "drop_path"]
    assert model.drop_path is drop

    def eager(t):
        u = linear(t)
        return u + drop(u)

    data = torch.randn(8, 16)
    model.train(), drop.train()
    torch.manual_seed(1)
    expected = eager(data)
    torch.manual_seed(1)
    assert torch.equal(model(data), expected)
    model.eval()
    assert torch.equal(model(data), linear(data) * 2)


def test_hand_written_build_hook_ignores_other_threads():
    """While one thread builds, another thread's module calls are left alone (and pay only the check)."""
    import threading

    x = tg.Input(shape=(4,))
    seen = []
    drop = dp.DropPath(0.5).eval()
    worker = threading.Thread(target=lambda: seen.append(drop(torch.ones(2, 4))))
    worker.start()
    worker.join()
    assert torch.equal(seen[0], torch.ones(2, 4))
    model = tg.Model(x, nn.Linear(4, 4)(x))
    assert [n.op for n in model.graph.nodes].count("call_module") == 1
