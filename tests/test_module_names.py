"""tg.from_module of modules whose own names meet tg.Model's attributes: recorded, or a clear refusal.

A module's top-level submodules, parameters and buffers keep their names in the recorded model
(its state_dict is the original's), so a name that a tg.Model attribute already has (``graph``,
``summary``, ``fit``...) is refused before recording, naming the attribute and the fix; ``layers``,
``inputs`` and ``outputs`` are Model properties that yield to a submodule of that name.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from torchgraph.emitting import RESERVED_NAMES


class _Named(nn.Module):
    """A Linear head, and a submodule under ``name`` that the forward calls or never touches."""

    def __init__(self, name: str, child: nn.Module, called: bool):
        super().__init__()
        self.add_module(name, child)
        self.head = nn.Linear(4, 4)
        self.child_name = name
        self.called = called

    def forward(self, x):
        if self.called:
            x = getattr(self, self.child_name)[0](x)
        return self.head(x)


def _assert_records_like_eager(module):
    torch.manual_seed(1)
    model = tg.from_module(module, (4,))
    assert list(model.state_dict()) == list(module.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), module(x), rtol=0, atol=0)
    return model


@pytest.mark.parametrize("name", ["layers", "inputs", "outputs"])
@pytest.mark.parametrize("called", [True, False])
def test_submodule_named_like_a_yielding_model_property(name, called):
    """`self.layers = nn.ModuleList([...])` records whether the forward uses it or not."""
    torch.manual_seed(0)
    module = _Named(name, nn.ModuleList([nn.Linear(4, 4)]), called)
    model = _assert_records_like_eager(module)
    assert type(getattr(model, name)) is nn.ModuleList
    assert getattr(model, name)[0] is getattr(module, name)[0]


def test_empty_unused_layers_list_records():
    """A configurable depth of 0 (`self.layers = nn.ModuleList()`) used to raise a raw KeyError."""
    torch.manual_seed(0)
    module = _Named("layers", nn.ModuleList(), called=False)
    model = _assert_records_like_eager(module)
    assert type(model.layers) is nn.ModuleList and len(model.layers) == 0


@pytest.mark.parametrize("name", ["graph", "code", "meta", "summary", "get_layer", "input_names", "fit"])
@pytest.mark.parametrize("called", [True, False])
def test_submodule_named_like_a_model_attribute_fails_clearly(name, called):
    """Called (it would shadow or be shadowed by the attribute) or not (no place to keep it): refused."""
    module = _Named(name, nn.ModuleList([nn.Linear(4, 4)]), called)
    with pytest.raises(tg.GraphBuildError, match=rf"_Named has a submodule '{name}' \(ModuleList\), the name "
                                                 rf"of an attribute every tg.Model needs.*received '{name}'.*"
                                                 rf"self.{name}_ = "):
        tg.from_module(module, (4,))


@pytest.mark.parametrize("kind", ["parameter", "buffer"])
@pytest.mark.parametrize("name", ["layers", "meta", "summary"])
def test_root_tensor_named_like_a_model_attribute_fails_clearly(kind, name):
    """A root parameter or buffer named `meta` or `layers` cannot sit on the model under that name."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            if kind == "parameter":
                self.register_parameter(name, nn.Parameter(torch.ones(4)))
            else:
                self.register_buffer(name, torch.ones(4))

        def forward(self, x):
            return self.fc(x) * getattr(self, name)

    with pytest.raises(tg.GraphBuildError, match=rf"Scaled has a {kind} '{name}'.*self.{name}_ = "):
        tg.from_module(Scaled(), (4,))


def test_unused_nested_submodule_keeps_its_place_in_the_state_dict():
    """An unused leaf between used ones (`enc.graph` between `enc.layers` and `enc.code`) keeps its order."""
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Module()
            self.enc.layers = nn.ModuleList([nn.Linear(4, 4)])
            self.enc.graph = nn.Linear(4, 4)
            self.enc.code = nn.Linear(4, 4)

        def forward(self, x):
            return self.enc.code(self.enc.layers[0](x))

    _assert_records_like_eager(Encoder())


def test_reserved_names_cover_every_model_attribute():
    """A layer or constant named like any tg.Model attribute would shadow it (or be shadowed).
    Checked in a fresh interpreter: other libraries add attributes to nn.Module at run time
    (transformers' `smart_apply`, on its first model), which the fixed list must not follow, or
    layer names would depend on what the process imported before."""
    code = ("import torchgraph as tg; from torchgraph.emitting import RESERVED_NAMES; "
            "print(sorted({n for n in dir(tg.Model) if not n.startswith('__')} - RESERVED_NAMES))")
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert missing.stdout.strip() == "[]", missing.stdout
    assert "meta" in RESERVED_NAMES and "summary" in RESERVED_NAMES


class Add(nn.Module):
    def forward(self, x):
        return x + 1


class Pop(nn.Module):
    def forward(self, x):
        return x * 2


class Build(nn.Module):
    def forward(self, x):
        return x - 1


def test_sequential_layers_named_like_its_methods_do_not_shadow_them():
    """NOTE: [Subclass attributes]: layers of classes Add, Pop and Build in a tg.Sequential were named
    `add`, `pop` and `build`, and `model.add(layer)` then called the Add layer. They are named
    `add_1`..., the methods work, and the model computes what the layers do."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 4)
    model = tg.Sequential([tg.Input((4,)), linear, Add(), Pop(), Build()])
    assert [name for name, _ in model.named_children()] == ["linear", "add_1", "pop_1", "build_1"]
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), (linear(x) + 1) * 2 - 1)
    model.add(nn.ReLU())
    torch.testing.assert_close(model(x), torch.relu((linear(x) + 1) * 2 - 1))
    assert isinstance(model.pop(), nn.ReLU)
    unbuilt = tg.Sequential([Add(), Pop()])  # named before it is built, the same way
    assert [name for name, _ in unbuilt.named_children()] == ["add_1", "pop_1"]
