"""A registered tg.Model subclass comes back from configs, files and clones as itself."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg


@tg.register_layer
class Classifier(tg.Model):
    """A Keras-style functional subclass: one extra constructor argument, stored in its config."""

    def __init__(self, inputs, outputs, temperature: float = 1.0, **kwargs):
        super().__init__(inputs, outputs, **kwargs)
        self.temperature = temperature

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}

    def probabilities(self, x):
        return (self(x) / self.temperature).softmax(-1)


class Unregistered(tg.Model):
    def get_config(self):
        return {**super().get_config(), "extra": 1}


def classifier():
    x = tg.Input(shape=(4,))
    return Classifier(x, nn.Linear(4, 3)(x), temperature=2.5, name="Clf").eval()


def test_subclass_revives_with_its_own_entries(tmp_path):
    """from_config (through tg.Model or the subclass), tg.load, clone_model and nesting keep the class
    and the entries its get_config added."""
    model = classifier()
    config = model.get_config()
    assert config["class"] == f"{__name__}.Classifier" and config["temperature"] == 2.5
    tg.save(model, tmp_path / "clf.safetensors")
    x = tg.Input(shape=(4,))
    outer = tg.Model(x, model(x))
    revived = [tg.Model.from_config(config), Classifier.from_config(config), tg.load(tmp_path / "clf.safetensors"),
               tg.clone_model(model), tg.Model.from_config(outer.get_config()).clf]
    x0 = torch.randn(2, 4)
    for other in revived:
        assert isinstance(other, Classifier) and other.temperature == 2.5 and other.code == model.code
    assert torch.equal(revived[2].probabilities(x0), model.probabilities(x0))


def test_unregistered_subclass_with_its_own_entries_says_to_register():
    """Entries from an unregistered subclass cannot be revived: the message says what to do."""
    x = tg.Input(shape=(4,))
    model = Unregistered(x, nn.Linear(4, 3)(x))
    with pytest.raises(ValueError, match="must be registered with @tg.register_layer"):
        tg.Model.from_config(model.get_config())


def test_unknown_model_class_is_never_imported():
    """A "class" that is not registered is refused by name."""
    config = classifier().get_config()
    config["class"] = "os.system"
    with pytest.raises(ValueError, match="unknown model class 'os.system'"):
        tg.Model.from_config(config)
