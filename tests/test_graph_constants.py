"""Parameters and constants used directly in a graph: stored, reloaded, named (ViT-style models)."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg


def vit_tokens(dim: int = 16, patches: int = 4):
    """The front of a ViT written the functional way: class token and position embedding as
    parameters used in the graph (timm keeps them as `cls_token` and `pos_embed`)."""
    img = tg.Input(shape=(3, 8, 8), name="image")
    cls_token = nn.Parameter(torch.randn(1, 1, dim))
    pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim))
    x = nn.Conv2d(3, dim, 4, stride=4)(img).flatten(2).transpose(1, 2)
    x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = pos_embed + x  # the parameter on the left: recorded as a method call on it
    x = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=32, batch_first=True, dropout=0.0)(x)
    return tg.Model(img, nn.Linear(dim, 3)(nn.LayerNorm(dim)(x[:, 0])), name="TinyViT").eval()


def test_vit_parameters_are_named_after_their_variables():
    """The default names are the variables' names: timm's state_dict keys, no key map needed."""
    model = vit_tokens()
    keys = list(model.state_dict())
    assert "cls_token" in keys and "pos_embed" in keys
    assert "cls_token.expand(" in model.code and "pos_embed.add(" in model.code


def test_vit_round_trips_through_config_save_and_load(tmp_path):
    """Methods called on parameters with model values as arguments rebuild, save and load."""
    model = vit_tokens()
    rebuilt = tg.Model.from_config(model.get_config())
    assert rebuilt.code == model.code and list(rebuilt.state_dict()) == list(model.state_dict())
    tg.save(model, tmp_path / "vit.safetensors")
    loaded = tg.load(tmp_path / "vit.safetensors")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded.cls_token, nn.Parameter) and loaded.cls_token.requires_grad


def test_tg_name_names_a_parameter():
    """tg.name(parameter, name) sets its attribute and state_dict key; duplicates are refused."""
    x = tg.Input(shape=(4,))
    shift = tg.name(nn.Parameter(torch.zeros(4)), "bias_shift")
    model = tg.Model(x, x + shift)
    assert list(model.state_dict()) == ["bias_shift"] and model.bias_shift is shift
    clone = tg.clone_model(model)
    assert list(clone.state_dict()) == ["bias_shift"] and clone.bias_shift is not shift
    other = tg.name(nn.Parameter(torch.ones(4)), "bias_shift")
    with pytest.raises(tg.GraphBuildError, match="'bias_shift' given with tg.name .* already used"):
        tg.Model(x, x + shift + other)
    with pytest.raises(TypeError, match="symbolic tensor"):
        tg.name(x, "input_value")


def test_unnamed_constants_get_counted_names_that_avoid_layers_and_reserved_words():
    """A tensor no variable holds is `constant`/`parameter`; names never shadow a layer or an attribute."""
    x = tg.Input(shape=(4,))
    training = torch.ones(4)  # a variable named like an nn.Module attribute
    linear = torch.full((4,), 2.0)  # ...and like the layer that follows
    h = x * training + linear
    y = nn.Linear(4, 4)(h) + torch.tensor([1.0, 2.0, 3.0, 4.0]) + nn.Parameter(torch.zeros(4))
    model = tg.Model(x, y)
    names = [n for n, _ in model.named_buffers()] + [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(["training_1", "linear_1", "constant", "parameter", "linear.weight",
                                    "linear.bias"])
    rebuilt = tg.Model.from_config(model.get_config())
    assert sorted(rebuilt.state_dict()) == sorted(model.state_dict())


def test_replay_errors_name_the_node_once():
    """A node that fails to replay is named once in the message (the prefix used to be printed twice)."""
    x = tg.Input(shape=(4,), name="x")
    cls_token = nn.Parameter(torch.zeros(1, 4))
    config = tg.Model(x, cls_token.expand(x.shape[0], -1) + x).get_config()
    node = next(n for n in config["nodes"] if n["target"] == "expand")
    node["args"] = [node["args"][0], 3, 5]  # no model value left: refused
    with pytest.raises(ValueError) as info:
        tg.Model.from_config(config)
    assert str(info.value).count("node 'expand'") == 1, str(info.value)
