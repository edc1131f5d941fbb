"""Models with timm / torchvision / HuggingFace drop path modules save and load (NOTE: [Drop path at save time]).

``tg.layers.DropPath`` computes each library's spelling exactly; ``tg.save`` stores an unregistered module that
behaves like one of them (checked by running it) as that layer, and ``tg.load`` gives it back: the loaded model
equals the original in eval mode and, under the same seed, in train mode. A look-alike is not recognised.
"""

import copy
import json
import struct
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from community_models import drop_path as dp
from torchgraph.drop_paths import as_drop_path
from torchgraph.trees import tree_leaves

DropPath = tg.layers.DropPath


def _hf_drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """transformers/models/swin/modeling_swin.py (and 43 other models)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class HFDropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return _hf_drop_path(x, self.drop_prob, self.training)


SPELLINGS = [  # (original module, the DropPath arguments it is saved with)
    (dp.DropPath(0.3), dict(scale_by_keep=True, mode="row", noise="bernoulli")),
    (dp.DropPath(0.3, scale_by_keep=False), dict(scale_by_keep=False, mode="row", noise="bernoulli")),
    (dp.StochasticDepth(0.3, "row"), dict(scale_by_keep=True, mode="row", noise="bernoulli")),
    (dp.StochasticDepth(0.3, "batch"), dict(scale_by_keep=True, mode="batch", noise="bernoulli")),
    (HFDropPath(0.3), dict(scale_by_keep=True, mode="row", noise="uniform_floor")),
]


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("original, arguments", SPELLINGS)
def test_the_layer_computes_each_spelling_exactly(original, arguments):
    """The same random numbers and rounding as the original under the same seed, its input itself in eval."""
    for p in (0.0, 0.3, 0.9, 1.0):
        original = copy.copy(original)
        setattr(original, "p" if isinstance(original, dp.StochasticDepth) else "drop_prob", p)
        layer = DropPath(p, **arguments)
        for shape, dtype in (((7,), torch.float32), ((8, 5), torch.float32), ((6, 3, 4, 4), torch.float64)):
            x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
            for seed in range(3):
                torch.manual_seed(seed)
                expected = original.train()(x)
                torch.manual_seed(seed)
                _same(layer.train()(x), expected)
            assert layer.eval()(x) is x and original.eval()(x) is x
    assert DropPath(0.0).train()(x) is x


def test_bad_arguments_are_refused():
    for bad, match in ((1.5, "drop_prob must be a probability"), (-0.1, "drop_prob must be a probability"),
                       ("0.1", "drop_prob must be a probability"), (True, "drop_prob must be a probability")):
        with pytest.raises(ValueError, match=rf"DropPath: {match}. Expected a number in \[0, 1\]"):
            DropPath(bad)
    with pytest.raises(ValueError, match=r"DropPath: unknown mode. Expected one of \['row', 'batch'\]; received 'col'"):
        DropPath(0.1, mode="col")
    with pytest.raises(ValueError, match=r"DropPath: unknown noise. Expected one of \['bernoulli', 'uniform_floor'\]"):
        DropPath(0.1, noise="gaussian")
    with pytest.raises(ValueError, match=r"DropPath: scale_by_keep must be a bool"):
        DropPath(0.1, scale_by_keep=1)


@pytest.mark.parametrize("original, arguments", SPELLINGS)
def test_each_spelling_is_recognised_with_its_arguments(original, arguments):
    """The user's module and random state are left as they were."""
    original.train()
    torch.manual_seed(123)
    recognised = as_drop_path(original)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))
    assert original.training and (original.p if hasattr(original, "p") else original.drop_prob) == 0.3
    assert type(recognised) is DropPath and recognised.get_config() == dict(drop_prob=0.3, **arguments)


def test_huggingface_classes_are_recognised():
    from transformers.models.convnext.modeling_convnext import ConvNextDropPath
    from transformers.models.dinov2.modeling_dinov2 import Dinov2DropPath
    from transformers.models.segformer.modeling_segformer import SegformerDropPath
    from transformers.models.swin.modeling_swin import SwinDropPath

    for cls in (SwinDropPath, SegformerDropPath, ConvNextDropPath, Dinov2DropPath):
        for p in (0.0, 0.1, 1.0):
            assert as_drop_path(cls(p)).get_config() == dict(drop_prob=p, scale_by_keep=True, mode="row",
                                                              noise="uniform_floor")


class _ExtraScale(dp.DropPath):
    def forward(self, x):
        return dp.drop_path(x, self.drop_prob, self.training) * 1.0001 if self.training else x


class _PerChannelMask(dp.DropPath):
    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty(x.shape[:2] + (1,) * (x.ndim - 2)).bernoulli_(keep)
        return x * mask.div_(keep)


class _FixedRate(dp.DropPath):
    """Reads its rate from elsewhere: ``drop_prob`` is only a name here."""

    def forward(self, x):
        return dp.drop_path(x, 0.3, self.training)


class _DropsInEvalToo(dp.DropPath):
    def forward(self, x):
        return dp.drop_path(x, self.drop_prob, True)


class _InPlace(dp.DropPath):
    """Without scaling, ``x.mul_(mask)`` returns the same values as ``x * mask``, but changes the caller's ``x``."""

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        return x.mul_(x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.drop_prob))


class _ElementDropout(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class _WithBuffer(dp.DropPath):
    def __init__(self, drop_prob):
        super().__init__(drop_prob)
        self.register_buffer("calls", torch.zeros(()))


@pytest.mark.parametrize("look_alike", [_ExtraScale(0.3), _PerChannelMask(0.3), _PerChannelMask(0.01),
                                        _FixedRate(0.3), _DropsInEvalToo(0.3), _InPlace(0.3), _ElementDropout(0.3),
                                        _WithBuffer(0.3)], ids=lambda m: type(m).__name__ + str(m.extra_repr()))
def test_look_alikes_are_not_recognised_and_cannot_be_saved(look_alike, tmp_path):
    """A module that merely looks like a drop path keeps the old clear save error (with a hint)."""
    assert as_drop_path(look_alike) is None
    x = tg.Input(shape=(4, 3, 3))
    model = tg.Model(x, look_alike(nn.Conv2d(4, 4, 1)(x)))
    hint = r" \(It has a drop probability '(drop_prob|p)', but it does not compute exactly like timm's"
    with pytest.raises(ValueError, match=r"get_config cannot describe a test_drop_path_save\.\w+: its constructor "
                       r"arguments are unknown\. Decorate the class with @tg.register_layer .*" + hint):
        tg.save(model, tmp_path / "m.safetensors")


def _record(net, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the drop paths stay opaque layers (tests/test_drop_path.py checks)
        return tg.from_module(net, inputs)


def _round_trip(model, tmp_path, inputs: dict, drop_paths: dict):
    """Save and load; the loaded model has tg.layers.DropPath with ``drop_paths``' arguments at those layers,
    and gives the same outputs as ``model`` in eval mode and in train mode under the same seed."""
    tg.save(model, tmp_path / "m.safetensors")
    loaded = tg.load(tmp_path / "m.safetensors")
    found = {n.target: loaded.get_submodule(n.target).get_config() for n in loaded.graph.nodes
             if n.op == "call_module" and isinstance(loaded.get_submodule(n.target), DropPath)}
    assert found == drop_paths
    for mode in (False, True, False):
        model.train(mode)
        loaded.train(mode)
        for seed in (0, 1):
            torch.manual_seed(seed)
            expected = model(**inputs)
            torch.manual_seed(seed)
            got = loaded(**inputs)
            for a, b in zip(tree_leaves(got), tree_leaves(expected)):
                _same(a[1], b[1])
    return loaded


def _args(p, **kw):
    return dict(dict(drop_prob=p, scale_by_keep=True, mode="row", noise="bernoulli"), **kw)


def test_timm_vit_blocks_round_trip(tmp_path):
    torch.manual_seed(0)
    net = dp.drop_path_vit(depth=2, drop_path_rate=0.4)
    model = _record(net, (5, 16))
    rates = {f"{b}.drop_path{i}": net[b].drop_path1.drop_prob for b in (1, 2) for i in (1, 2)}
    assert rates["1.drop_path1"] == pytest.approx(0.2) and rates["2.drop_path1"] == pytest.approx(0.4)
    _round_trip(model, tmp_path, {"x": torch.randn(6, 5, 16)}, {path: _args(p) for path, p in rates.items()})
    assert model.get_submodule("1.drop_path1") is net[1].drop_path1  # the live model keeps the original's


def test_timm_convnext_blocks_round_trip_and_summary_plot_onnx(tmp_path):
    torch.manual_seed(0)
    net = dp.drop_path_convnext(depth=2, drop_path_rate=0.25)
    model = _record(net, (3, 16, 16))
    loaded = _round_trip(model, tmp_path, {"x": torch.randn(8, 3, 16, 16)},
                         {"1.drop_path": _args(0.25), "2.drop_path": _args(0.25)})
    printed = []
    loaded.summary(print_fn=printed.append)
    assert "\n".join(printed).count(" (DropPath) ") == 2
    assert tg.model_to_dot(loaded, max_nodes=None).source.count("DropPath") == 2
    tg.export_onnx(loaded.eval(), tmp_path / "model.onnx", exporter="legacy")  # verified in onnxruntime
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert not ops & {"Bernoulli", "RandomUniformLike", "RandomUniform", "Floor"}


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_torchvision_mbconv_round_trip(mode, tmp_path):
    """MBConv adds the input in place after stochastic depth (``result += input``): the alias is kept."""
    torch.manual_seed(0)
    model = _record(dp.mbconv_net(mode=mode), (3, 8, 8))
    _round_trip(model, tmp_path, {"x": torch.randn(8, 3, 8, 8)},
                {f"{i}.stochastic_depth": _args(0.2, mode=mode) for i in (1, 2)})


def _hf(name):
    transformers = pytest.importorskip("transformers")
    if name == "swin":
        config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                         num_heads=[2, 2], window_size=4, drop_path_rate=0.3)
        return transformers.SwinModel(config), {"encoder.layers.1.blocks.0.drop_path": 0.3}
    config = transformers.SegformerConfig(num_encoder_blocks=2, depths=[2, 1], sr_ratios=[2, 1],
                                          hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                                          num_attention_heads=[1, 2], mlp_ratios=[2, 2], drop_path_rate=0.3)
    return transformers.SegformerModel(config), {"stages.0.blocks.1.drop_path": 0.15,
                                                 "stages.1.blocks.0.drop_path": 0.3}


@pytest.mark.parametrize("name", ["swin", "segformer"])
def test_huggingface_models_round_trip(name, tmp_path):
    torch.manual_seed(0)
    net, rates = _hf(name)
    model = _record(net, {"pixel_values": (3, 32, 32)})
    pixels = torch.randn(2, 3, 32, 32)
    found = {path: m.drop_prob for path, m in net.named_modules() if type(m).__name__.endswith("DropPath")}
    assert found == pytest.approx(rates)
    loaded = _round_trip(model, tmp_path, {"pixel_values": pixels},
                         {path: _args(net.get_submodule(path).drop_prob, noise="uniform_floor") for path in rates})
    net.eval()
    _same(loaded.eval()(pixel_values=pixels)["last_hidden_state"], net(pixel_values=pixels).last_hidden_state)


def test_hand_written_model_with_a_timm_drop_path_saves(tmp_path):
    """The recognition works on any path to a config, not only tg.from_module's."""
    torch.manual_seed(0)
    x = tg.Input(shape=(16,))
    h = nn.Linear(16, 16)(x)
    model = tg.Model(x, h + dp.DropPath(0.5)(h))
    _round_trip(model, tmp_path, {"input_1": torch.randn(8, 16)}, {"drop_path": _args(0.5)})
    assert type(tg.clone_model(model).get_submodule("drop_path")) is DropPath


def test_optimize_drops_the_layer_in_inference_and_keeps_it_for_training(tmp_path):
    torch.manual_seed(0)
    net = dp.drop_path_vit(depth=2, drop_path_rate=0.5)
    model = _record(net, (5, 16))
    loaded = tg.load(tg.save(model, tmp_path / "m.safetensors") or tmp_path / "m.safetensors")
    x = torch.randn(4, 5, 16)
    for m in (model, loaded):  # the original's timm DropPath and the torchgraph layer alike
        fast = tg.optimize(m.eval())
        assert not any("drop_path" in str(n.target) for n in fast.graph.nodes)
        torch.testing.assert_close(fast(x), net.eval()(x), rtol=1e-5, atol=1e-5)
        # for training: still a call, so it keeps following the mode (a trace would freeze it)
        trainable = tg.optimize(m.train(), inference=False)
        assert [n.target for n in trainable.graph.nodes if "drop_path" in str(n.target)] == \
            ["1.drop_path1", "1.drop_path2", "2.drop_path1", "2.drop_path2"]
        torch.manual_seed(1)
        first = trainable.eval()(x)
        torch.manual_seed(2)
        assert torch.equal(trainable(x), first)  # eval: no mask drawn
        torch.manual_seed(1)
        expected = net.train()(x)
        torch.manual_seed(1)
        torch.testing.assert_close(trainable.train()(x), expected, rtol=1e-5, atol=1e-5)


def _crafted(tmp_path, kwargs):
    """A saved hand-written model whose DropPath entry has ``kwargs``."""
    x = tg.Input(shape=(4,))
    path = tmp_path / "m.safetensors"
    tg.save(tg.Model(x, DropPath(0.1)(nn.Linear(4, 4)(x))), path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    config = json.loads(header["__metadata__"]["config"])
    (entry,) = [e for e in config["layers"] if e["class"] == "torchgraph.layers.DropPath"]
    entry["kwargs"].update(kwargs)
    header["__metadata__"]["config"] = json.dumps(config)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return path


@pytest.mark.parametrize("kwargs, match", [
    ({"drop_prob": 1.5}, r"drop_prob must be a probability. Expected a number in \[0, 1\]; received 1.5"),
    ({"drop_prob": -0.1}, r"drop_prob must be a probability"),
    ({"drop_prob": "0.1"}, r"drop_prob must be a probability"),
    ({"mode": "col"}, r"unknown mode. Expected one of \['row', 'batch'\]; received 'col'"),
    ({"noise": "gaussian"}, r"unknown noise. Expected one of \['bernoulli', 'uniform_floor'\]; received 'gaussian'"),
    ({"scale_by_keep": "yes"}, r"scale_by_keep must be a bool"),
    ({"p": 0.1}, r"unexpected keyword argument 'p'"),
])
def test_a_crafted_file_with_bad_drop_path_arguments_fails_clearly(kwargs, match, tmp_path):
    path = _crafted(tmp_path, kwargs)
    with pytest.raises(ValueError, match=r"layer 'drop_path': torchgraph.layers.DropPath could not be built from "
                       r"its config: .*" + match):
        tg.load(path)


class _BlockWithOurLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop_path = DropPath(0.5)

    def forward(self, x):
        h = self.fc(x)
        return h + self.drop_path(h)


def test_from_module_keeps_the_torchgraph_layer_as_a_layer_without_a_warning():
    """tg.layers are leaves of tg.from_module like torch.nn's layers; the call follows the mode."""
    for mode in (True, False):
        net = _BlockWithOurLayer().train(mode)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = tg.from_module(net, (8,))
        assert [n.target for n in model.graph.nodes if n.op == "call_module"] == ["fc", "drop_path"]
        x = torch.randn(16, 8)
        for training in (False, True):
            net.train(training)
            model.train(training)
            torch.manual_seed(0)
            expected = net(x)
            torch.manual_seed(0)
            _same(model(x), expected)
