"""A tg.Model is a plain nn.Module: every PyTorch tool accepts it."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg


def _cnn():
    torch.manual_seed(0)
    x = tg.Input(shape=(3, 16, 16), name="image")
    h = F.relu(nn.BatchNorm2d(8)(nn.Conv2d(3, 8, 3, padding=1)(x)))
    h = nn.MaxPool2d(2)(h)
    h = h.view(h.size(0), -1)
    return tg.Model(x, nn.Linear(8 * 8 * 8, 10)(h), name="CNN").eval()


def test_state_dict_round_trip_into_a_rebuilt_model():
    """A state_dict saved from one build loads into a fresh build of the same code."""
    a, b = _cnn(), _cnn()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(a(x), b(x))


def test_torch_save_and_load_whole_model():
    """torch.save/torch.load of the whole model keeps class, code, names and input checks."""
    model = _cnn()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, tg.Model) and type(loaded).__name__ == "CNN"
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))
    assert [n.name for n in loaded.graph.nodes] == [n.name for n in model.graph.nodes]
    with pytest.raises(ValueError, match="input 'image'"):
        loaded(torch.randn(3, 1, 16, 16))


def test_deepcopy_is_independent():
    """copy.deepcopy gives an equal model with its own parameters."""
    model = _cnn()
    clone = copy.deepcopy(model)
    assert isinstance(clone, tg.Model)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(clone(x), model(x))
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert not torch.allclose(clone(x), model(x))


def test_pickle_500_layer_model():
    """Pickling a 500-layer model does not hit a RecursionError."""
    model = tg.applications.mlp(depth=250, width=8)
    assert len(list(model.children())) == 250
    data = pickle.dumps(model)
    restored = pickle.loads(data)
    x = torch.randn(2, 8)
    torch.testing.assert_close(restored(x), model(x))
    assert len([n for n in restored.graph.nodes]) == len([n for n in model.graph.nodes])


class _NamesRecorder(pickle.Unpickler):
    """Unpickles, noting each torchgraph global the pickle names (module.qualname)."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.names = set()

    def find_class(self, module, name):
        if module.startswith("torchgraph"):
            self.names.add(f"{module}.{name}")
        return super().find_class(module, name)


def test_pickled_model_names_the_same_globals_in_every_version():
    """A pickle names torchgraph objects by their historic paths (ValueSpec as torchgraph.model's),
    so a model pickled by one version unpickles in another, whatever module now defines them."""
    model = _cnn()
    recorder = _NamesRecorder(pickle.dumps(model))
    restored = recorder.load()
    assert recorder.names == {"torchgraph.dims.DynamicDim", "torchgraph.model.Model",
                              "torchgraph.model.ValueSpec", "torchgraph.model._Retracer",
                              "torchgraph.model._rebuild_model"}
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(restored(x), model(x))


def test_fx_symbolic_trace():
    """torch.fx.symbolic_trace re-traces the model into an equal graph."""
    model = _cnn()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(traced(x), model(x))


def test_torch_compile_fullgraph():
    """torch.compile(model, fullgraph=True) compiles without graph breaks and matches eager."""
    model = _cnn()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_torch_export_with_dynamic_batch():
    """torch.export with a dynamic batch dim runs at other batch sizes (CNN and LSTM)."""
    model = _cnn()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (torch.randn(4, 3, 16, 16),), dynamic_shapes={"image": {0: batch}})
    for b in (2, 9):
        x = torch.randn(b, 3, 16, 16)
        torch.testing.assert_close(ep.module()(x), model(x))

    seq = tg.Input(shape=(5, 4), name="seq")
    out, (h, _) = nn.LSTM(4, 6, batch_first=True)(seq)
    rnn = tg.Model(seq, out[:, -1] + h[0]).eval()
    ep = torch.export.export(rnn, (torch.randn(3, 5, 4),), dynamic_shapes={"seq": {0: torch.export.Dim("b")}})
    x = torch.randn(7, 5, 4)
    torch.testing.assert_close(ep.module()(x), rnn(x))


def test_jit_script_when_layers_are_scriptable():
    """torch.jit.script works when every layer is scriptable."""
    model = _cnn()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(scripted(x), model(x))


def test_training_step_with_autograd_and_optimizer():
    """A model trains like any module: loss falls over a few SGD steps."""
    model = _cnn().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.parameters())


def test_to_dtype_and_input_dtype_check_follow_the_model():
    """model.to(float64) runs on float64 inputs; float32 inputs are then refused clearly."""
    model = _cnn().to(torch.float64)
    assert model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64
    assert model.conv2d.weight.dtype == torch.float64


def test_data_parallel_style_replication():
    """nn.DataParallel-style replication (GraphModule._replicate_for_data_parallel) keeps working."""
    model = _cnn()
    replica = model._replicate_for_data_parallel()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(replica(x), model(x))
