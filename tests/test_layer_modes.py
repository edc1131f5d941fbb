"""Each layer's training mode survives tg.save / tg.load and configs (NOTE: [Layer modes] in
torchgraph/layer_modes.py): a tg.Model built around a module in eval mode is itself in training mode, and
its layer loaded in training mode would run its dropout."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg


@tg.register_layer
class DropoutBlock(nn.Module):
    """A third-party block with dropout and a BatchNorm, as HF's layers have."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(0.5)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x):
        return self.norm(self.drop(self.fc(x)))


def _model(block_mode: bool, model_mode: bool) -> tg.Model:
    """A model around a DropoutBlock; the model in ``model_mode``, then the block in ``block_mode``."""
    torch.manual_seed(0)
    block = DropoutBlock()
    x = tg.Input(shape=(8,))
    model = tg.Model(x, nn.Linear(8, 8)(block(x))).train(model_mode)
    block.train(block_mode)
    return model


def _modes(model) -> list:
    return [(name, m.training) for name, m in model.named_modules()]


@pytest.mark.parametrize("block_mode, model_mode", [(False, True), (True, False), (False, False)],
                         ids=["eval block in a training model", "training block in an eval model", "all eval"])
def test_save_and_load_keep_every_layers_mode(tmp_path, block_mode, model_mode):
    model = _model(block_mode, model_mode)
    path = tmp_path / "model.safetensors"
    tg.save(model, path)
    loaded = tg.load(path)
    assert _modes(loaded) == _modes(model)
    if not block_mode:  # no dropout drawn: the outputs are the saved model's
        data = torch.randn(4, 8)
        with torch.no_grad():
            torch.testing.assert_close(loaded(data), model(data), rtol=0, atol=0)


def test_the_config_lists_the_roots_of_the_other_mode_only():
    model = _model(False, True)
    assert model.get_config()["layer_modes"] == [["dropout_block", False]]
    assert "layer_modes" not in _model(True, True).get_config()
    rebuilt = tg.Model.from_config(model.get_config())
    assert _modes(rebuilt) == _modes(model)


@pytest.mark.parametrize("modes, match", [
    ("eval", "'layer_modes' must be a list"),
    ([["dropout_block", "no"]], r"layer_modes\[0\] must be a \[path, bool\] pair"),
    ([["dropout_block"]], r"layer_modes\[0\] must be a \[path, bool\] pair"),
    ([["no_such.layer", False]], "names 'no_such.layer', which is not a layer of the model"),
    ([["__class__", False]], "names '__class__', which is not a layer"),
    ([["dropout_block; import os", False]], "expected a Python identifier or a module path"),
    ([["dropout_block", False]] * 10_001, "at most 10000"),
])
def test_bad_layer_modes_in_a_config_are_refused_clearly(modes, match):
    config = _model(False, True).get_config()
    config["layer_modes"] = modes
    with pytest.raises(ValueError, match=match):
        tg.Model.from_config(config)
