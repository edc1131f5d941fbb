"""tg.export_onnx: real torch.onnx exports, checked in real onnxruntime."""

import doctest
import importlib
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import export as tg_export
from torchgraph.export import OnnxExportError, input_specs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


# ------------------------------------------------------------------------------------------ helpers

def _dims(path, which="input"):
    """{name: [dim_param or dim_value, ...]} of the file's inputs (or outputs)."""
    graph = onnx.load(path, load_external_data=False).graph
    values = graph.input if which == "input" else graph.output
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def _run(path, **feeds):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


def _export(model, tmp_path, name="model.onnx", **kwargs):
    path = str(tmp_path / name)
    assert tg.export_onnx(model, path, **kwargs) == path
    return path


# ------------------------------------------------------------------------------------------ works for

@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_mlp_names_and_dynamic_batch(tmp_path, exporter):
    """An MLP exports with the model's input/output names and a dynamic batch, and runs at any batch."""
    x = tg.Input(shape=(16,), name="features")
    y = nn.Linear(32, 4)(F.relu(nn.Linear(16, 32)(x)))
    model = tg.Model(x, y)
    path = _export(model, tmp_path, exporter=exporter)
    assert _dims(path) == {"features": ["batch", 16]}
    assert _dims(path, "output") == {"output": ["batch", 4]}
    xs = torch.randn(7, 16)
    np.testing.assert_allclose(_run(path, features=xs)[0], model(xs).detach().numpy(), atol=1e-5)


def test_cnn_batchnorm_exported_in_eval_and_model_untouched(tmp_path):
    """BatchNorm exports with its running stats; the user's model stays in train mode, stats unchanged."""
    x = tg.Input(shape=(3, None, None), name="image")
    bn = nn.BatchNorm2d(8)
    h = F.relu(bn(nn.Conv2d(3, 8, 3, padding=1)(x)))
    y = nn.Linear(8, 5)(F.adaptive_avg_pool2d(h, 1).flatten(1))
    model = tg.Model(x, y)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.training
    path = _export(model, tmp_path)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _dims(path) == {"image": ["batch", 3, "image_dim2", "image_dim3"]}
    xs = torch.randn(2, 3, 20, 27)
    model.eval()
    np.testing.assert_allclose(_run(path, image=xs)[0], model(xs).detach().numpy(), atol=1e-4)


def test_resnet_blocks(tmp_path):
    """ResNet basic blocks (conv-bn-relu, strided downsample shortcut, residual add) export and verify."""
    layers = tg.applications.resnet_layers("resnet18", num_classes=10)
    # Two stages are enough to cover identity and downsample blocks; keep the test fast.
    small = {k: v for k, v in layers.items() if not k.startswith(("layer3", "layer4"))}
    small["fc"] = nn.Linear(128, 10)
    x = tg.Input(shape=(3, 32, 32), name="image")
    model = tg.Model(x, tg.applications.resnet_forward(small, x))
    path = _export(model, tmp_path)
    assert _dims(path)["image"] == ["batch", 3, 32, 32]


def test_transformer_encoder_layer_and_mha(tmp_path):
    """nn.TransformerEncoderLayer and nn.MultiheadAttention with a dynamic sequence length."""
    x = tg.Input(shape=(None, 32), name="tokens")
    h = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.1)(x)
    attn, _ = nn.MultiheadAttention(32, 4, batch_first=True)(h, h, h)
    model = tg.Model(x, attn + h)
    path = _export(model, tmp_path)
    assert _dims(path) == {"tokens": ["batch", "tokens_dim1", 32]}


def test_scaled_dot_product_attention_gpt_stack(tmp_path):
    """The GPT stack (causal F.scaled_dot_product_attention, view/transpose on x.shape) with dynamic seq."""
    model = tg.applications.gpt_stack(num_blocks=2, dim=32, heads=4, seq_len=None)
    path = _export(model, tmp_path)
    assert _dims(path) == {"tokens": ["batch", "tokens_dim1", 32]}


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_embedding_integer_ids_dynamic_seq(tmp_path, exporter):
    """Token ids feed an Embedding: random ids stay below num_embeddings; the sequence is dynamic."""
    ids = tg.Input(shape=("seq",), dtype=torch.long, name="ids")
    emb = nn.Embedding(7, 16)
    y = nn.Linear(16, 3)(emb(ids).mean(1))
    model = tg.Model(ids, {"logits": y})
    (spec,) = input_specs(model)
    assert spec.high == 7 and spec.dim_names == {0: "batch", 1: "seq"}
    path = _export(model, tmp_path, exporter=exporter)
    assert _dims(path) == {"ids": ["batch", "seq"]}
    xs = torch.randint(0, 7, (4, 11))
    np.testing.assert_allclose(_run(path, ids=xs)[0], model(xs)["logits"].detach().numpy(), atol=1e-5)


def test_integer_input_bound_through_nested_model_and_ops():
    """The id bound follows id-preserving ops and nested models; ids feeding no embedding get [0, 2)."""
    inner_ids = tg.Input(shape=("seq",), dtype=torch.long)
    inner = tg.Model(inner_ids, nn.Embedding(5, 4)(inner_ids))
    ids = tg.Input(shape=("seq",), dtype=torch.long, name="ids")
    mask = tg.Input(shape=("seq",), dtype=torch.long, name="mask")
    a = inner(ids)
    b = nn.Embedding(9, 4)(ids[:, :])
    model = tg.Model([ids, mask], a + b * mask.unsqueeze(-1))
    specs = {s.name: s for s in input_specs(model)}
    assert specs["ids"].high == 5 and specs["mask"].high == 2


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_lstm_gru(tmp_path, rnn):
    """LSTM/GRU layers (tuple outputs, getitem) with a dynamic batch and sequence length, exported
    twice in one process (torch's RNN decomposition cache made the second export fail)."""
    for num_layers in (1, 2):
        x = tg.Input(shape=(None, 6), name="seq")
        out, _ = rnn(6, 12, batch_first=True, num_layers=num_layers)(x)
        model = tg.Model(x, nn.Linear(12, 2)(out[:, -1]))
        path = _export(model, tmp_path, name=f"rnn{num_layers}.onnx")
        assert _dims(path) == {"seq": ["batch", "seq_dim1", 6]}
        assert rnn.__name__ in {n.op_type for n in onnx.load(path).graph.node}


def test_multi_input_multi_output_list(tmp_path):
    """Two inputs, two outputs (a list): names input order and output_0/output_1."""
    a = tg.Input(shape=(8,), name="a")
    b = tg.Input(shape=(None, 4), name="b")
    pooled = nn.Linear(4, 8)(b).mean(1)
    model = tg.Model([a, b], [nn.Linear(8, 3)(a + pooled), pooled])
    path = _export(model, tmp_path)
    assert _dims(path) == {"a": ["batch", 8], "b": ["batch", "b_dim1", 4]}
    assert list(_dims(path, "output")) == ["output_0", "output_1"]


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_dict_inputs_and_outputs(tmp_path, exporter):
    """Dict in, dict out: ONNX names are the keys, in order, and values line up with torch's."""
    a = tg.Input(shape=(8,), name="a")
    b = tg.Input(shape=(5,), name="b")
    y = nn.Linear(8, 2)(a)
    z = nn.Linear(5, 3)(b)
    model = tg.Model({"left": a, "right": b}, {"zeta": z, "alpha": y})
    path = _export(model, tmp_path, exporter=exporter)
    assert list(_dims(path)) == ["left", "right"]
    assert list(_dims(path, "output")) == ["zeta", "alpha"]
    xa, xb = torch.randn(3, 8), torch.randn(3, 5)
    got = _run(path, left=xa, right=xb)
    want = model(left=xa, right=xb)
    np.testing.assert_allclose(got[0], want["zeta"].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(got[1], want["alpha"].detach().numpy(), atol=1e-5)


def test_nested_model_and_shared_layer(tmp_path):
    """A tg.Model used as a layer (twice: shared weights) inside another model."""
    u = tg.Input(shape=(8,))
    encoder = tg.Model(u, F.relu(nn.Linear(8, 8)(u)), name="Encoder")
    shared = nn.Linear(8, 8)
    x1 = tg.Input(shape=(8,), name="x1")
    x2 = tg.Input(shape=(8,), name="x2")
    h1, h2 = shared(encoder(x1)), shared(encoder(x2))
    model = tg.Model([x1, x2], {"sim": (h1 * h2).sum(-1, keepdim=True)})
    assert sum(n.op == "call_module" for n in model.graph.nodes) == 4
    path = _export(model, tmp_path)
    assert _dims(path, "output") == {"sim": ["batch", 1]}


def test_dynamic_batch_false_fixes_batch_only(tmp_path):
    """dynamic_batch=False fixes the batch to 1; other None dims stay dynamic."""
    x = tg.Input(shape=(None, 4), name="x")
    model = tg.Model(x, nn.Linear(4, 2)(x))
    path = _export(model, tmp_path, dynamic_batch=False)
    assert _dims(path) == {"x": [1, "x_dim1", 4]}


def test_opset(tmp_path):
    """opset= selects the file's default-domain opset."""
    x = tg.Input(shape=(4,))
    path = _export(tg.Model(x, nn.Linear(4, 2)(x)), tmp_path, opset=18)
    opsets = {o.domain: o.version for o in onnx.load(path).opset_import}
    assert opsets[""] == 18


# ------------------------------------------------------------------------------------------ fused ops

@torch.library.custom_op("tgtest::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    """A stand-in for a fused C++ op: an opaque kernel ONNX knows nothing about."""
    return torch.tanh(x) * scale


@scaled_tanh.register_fake
def _(x, scale):
    return torch.empty_like(x)


def reference_scaled_tanh(x, scale):
    return torch.tanh(x) * scale


class FusedTanhLayer(nn.Module):
    """A layer whose forward calls the fused op (not visible as a graph node)."""

    def forward(self, x):
        return torch.ops.tgtest.scaled_tanh.default(x, 0.5)


@pytest.fixture
def inject_references(monkeypatch):
    """Add entries to torchgraph.ops.REFERENCES (creating the module if this checkout lacks it)."""
    def inject(mapping):
        try:
            ops = importlib.import_module("torchgraph.ops")
        except ModuleNotFoundError:
            ops = types.ModuleType("torchgraph.ops")
            monkeypatch.setitem(sys.modules, "torchgraph.ops", ops)
        merged = dict(getattr(ops, "REFERENCES", None) or {})
        merged.update(mapping)
        monkeypatch.setattr(ops, "REFERENCES", merged, raising=False)
    return inject


def _fused_model():
    x = tg.Input(shape=(6,), name="x")
    h = nn.Linear(6, 6)(x)
    y = torch.ops.tgtest.scaled_tanh(h, 2.0)
    model = tg.Model(x, FusedTanhLayer()(y))
    assert any(n.target is torch.ops.tgtest.scaled_tanh for n in model.graph.nodes)
    return model


def test_fused_op_without_reference_fails_naming_node(tmp_path):
    """With no reference, the fused op cannot be exported and the error names its node."""
    with pytest.raises(OnnxExportError, match=r"node 'scaled_tanh'.*cannot be expressed in ONNX"):
        _export(_fused_model(), tmp_path)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("key", ["packet", "overload", "name"])
def test_fused_op_swapped_to_reference(tmp_path, inject_references, key):
    """Fused nodes (and fused ops inside layers) export as standard ONNX ops via their references."""
    packet = torch.ops.tgtest.scaled_tanh
    inject_references({{"packet": packet, "overload": packet.default,
                        "name": "tgtest::scaled_tanh"}[key]: reference_scaled_tanh})
    model = _fused_model()
    path = _export(model, tmp_path)
    domains = {n.domain for n in onnx.load(path).graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    # The user's model still calls the fused op.
    assert any(n.target is packet for n in model.graph.nodes)


def test_reference_model_swaps_nested_and_leaves_original(inject_references):
    """reference_model rewrites nested graphs on a copy."""
    packet = torch.ops.tgtest.scaled_tanh
    u = tg.Input(shape=(3,))
    inner = tg.Model(u, packet(u, 3.0))
    x = tg.Input(shape=(3,))
    model = tg.Model(x, inner(x))
    copy = tg_export.reference_model(model, {packet: reference_scaled_tanh})
    inner_copy = copy.get_submodule(next(n.target for n in copy.graph.nodes if n.op == "call_module"))
    assert any(n.target is reference_scaled_tanh for n in inner_copy.graph.nodes)
    assert any(n.target is packet for n in inner.graph.nodes)
    xs = torch.randn(2, 3)
    torch.testing.assert_close(copy(xs), model(xs))


# ------------------------------------------------------------------------------------------ errors

class DataDependentGate(nn.Module):
    """Python control flow on tensor values: ONNX (a static graph) cannot express it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x


def test_data_dependent_layer_error_names_layer(tmp_path):
    """An exporter failure names the layer, keeps the exporter's reason, and writes nothing."""
    x = tg.Input(shape=(4,), name="x")
    h = nn.Linear(4, 4)(x)
    y = tg.name(DataDependentGate(), "gate")(h)
    model = tg.Model(x, y)
    (tmp_path / "model.onnx").write_bytes(b"previous")
    with pytest.raises(OnnxExportError, match=r"layer 'gate' \(DataDependentGate\) cannot be expressed"):
        _export(model, tmp_path)
    assert (tmp_path / "model.onnx").read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_error_names_layer_inside_nested_model(tmp_path):
    """A failing layer inside a nested model is named by its path."""
    u = tg.Input(shape=(4,))
    inner = tg.Model(u, tg.name(DataDependentGate(), "gate")(u))
    x = tg.Input(shape=(4,))
    model = tg.Model(x, tg.name(inner, "block")(x))
    with pytest.raises(OnnxExportError, match=r"layer 'block\.gate' \(DataDependentGate\)"):
        _export(model, tmp_path)


class CallCounter(nn.Module):
    """Adds how often it has been called: the exported file bakes in one count, torch moves on."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.calls


def test_verify_mismatch_reports_max_difference(tmp_path):
    """When onnxruntime and torch disagree, verify raises with the max abs difference; nothing written."""
    x = tg.Input(shape=(4,), name="x")
    model = tg.Model(x, CallCounter()(x))
    with pytest.raises(OnnxExportError, match=r"output 'output' differs .* max abs difference \d"):
        _export(model, tmp_path)
    assert not os.listdir(tmp_path)
    path = _export(model, tmp_path, verify=False)
    assert os.path.exists(path)


def test_bad_arguments():
    """Bad arguments get clear errors before any export work."""
    x = tg.Input(shape=(4,))
    model = tg.Model(x, nn.Linear(4, 2)(x))
    with pytest.raises(TypeError, match="expected a tg.Model; received Linear"):
        tg.export_onnx(nn.Linear(4, 2), "m.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tg.export_onnx(model, "/nonexistent_dir_tg/m.onnx")
    with pytest.raises(ValueError, match="opset must be an int"):
        tg.export_onnx(model, "m.onnx", opset="18")
    with pytest.raises(ValueError, match="exporter must be 'dynamo' or 'legacy'"):
        tg.export_onnx(model, "m.onnx", exporter="jit")
    with pytest.raises(TypeError, match="path must be a str"):
        tg.export_onnx(model, 3)


@pytest.mark.parametrize("module", ["onnx_export", "inputs", "references", "verify", "failures"])
def test_docstring_examples(module):
    """The examples in the docstrings of the torchgraph.export modules run."""
    import importlib

    result = doctest.testmod(importlib.import_module(f"torchgraph.export.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("page", ["docs/export.md"])
def test_docs_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    """The ```python blocks of the export docs run top to bottom (in a scratch directory)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / page).read_text()
    monkeypatch.chdir(tmp_path)
    for code in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(code, page, "exec"), {})  # each block on its own, as pasted into a fresh interpreter
    if page == "docs/export.md":
        out = capsys.readouterr().out
        assert "layer 'gate' (Gate) cannot be expressed in ONNX" in out
        assert "layer 'positions' (Embedding) fails in torch" in out


# ---------------------------------------------------------------------------------------------
# Output names, verification sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_dict_output_named_like_a_layer(tmp_path, exporter):
    """An output key equal to a node's name ("linear" for relu(linear(x))) used to give a file with two
    definitions of the name; the intermediate value is renamed, the output keeps its key."""
    x = tg.Input(shape=(4,), name="x")
    h = torch.relu(nn.Linear(4, 4)(x))
    model = tg.Model(x, {"linear": h, "relu": nn.Linear(4, 2)(h)})
    path = tg.export_onnx(model, tmp_path / "m.onnx", exporter=exporter)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == ["linear", "relu"]
    x0 = torch.randn(3, 4)
    got = session.run(None, {"x": x0.numpy()})
    expected = model(x0)
    assert all(torch.allclose(torch.from_numpy(g), expected[k], atol=1e-5) for g, k in zip(got, ["linear", "relu"]))


def test_output_named_like_an_input_is_a_clear_error(tmp_path):
    """ONNX cannot name an output like an input: refused up front, nothing written."""
    x = tg.Input(shape=(4,), name="x")
    model = tg.Model(x, {"x": nn.Linear(4, 4)(x)})
    with pytest.raises(OnnxExportError, match=r"output\(s\) \['x'\] have the name of an input"):
        tg.export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def _positions_model():
    """Learned positions (an nn.Embedding of 128) indexed by 0..T-1 of a named dynamic dim."""
    tokens = tg.Input(shape=("seq",), dtype=torch.long, name="tokens")
    positions = tokens.new_ones(tokens.shape).cumsum(1) - 1
    h = nn.Embedding(100, 8)(tokens) + tg.name(nn.Embedding(128, 8), "positions")(positions)
    return tg.Model(tokens, nn.Linear(8, 2)(h))


def test_verification_failing_in_torch_names_the_layer_and_the_fix(tmp_path):
    """A size the model rejects in torch (positions past the 128 of the table) is an export error that
    names the layer and says how to choose sizes (it used to be a raw IndexError)."""
    with pytest.raises(OnnxExportError, match=r"layer 'positions' \(Embedding\) fails in torch .*"
                                              r"IndexError.*verify_sizes=.*tg.Dim"):
        tg.export_onnx(_positions_model(), tmp_path / "m.onnx", verify_sizes={"seq": (20, 200)})
    assert not (tmp_path / "m.onnx").exists()


def test_verify_sizes_are_user_given_and_checked(tmp_path):
    """verify_sizes picks the sizes of each run by dim name; unknown names and bad sizes are refused."""
    path = tg.export_onnx(_positions_model(), tmp_path / "m.onnx", verify_sizes={"seq": (20, 40), "batch": 4})
    assert os.path.exists(path)
    from torchgraph.export.inputs import verification_plans

    specs = input_specs(_positions_model())
    assert verification_plans(specs, {"seq": (20, 40)}, {"seq": 8}) == [[{"batch": 3, "seq": 20},
                                                                         {"batch": 5, "seq": 40}]]
    for bad, error in (({"nope": 3}, ValueError), ({"seq": (0, 3)}, ValueError), ({"seq": "x"}, ValueError),
                       ([("seq", 3)], TypeError)):
        with pytest.raises(error, match="verify_sizes"):
            tg.export_onnx(_positions_model(), tmp_path / "bad.onnx", verify_sizes=bad)


def test_default_verification_sizes_are_ones_the_model_accepts(tmp_path):
    """Without verify_sizes, a table of 128 positions is verified at small sizes unlike the example's
    (16 and 24 for an example at 8) first; the build sizes (probes) are the last candidates."""
    from torchgraph.export.inputs import example_sizes, verification_plans

    model = _positions_model()
    specs = input_specs(model)
    example = example_sizes(model, specs, "cpu")
    assert example == {"seq": 8}
    plans = verification_plans(specs, None, example)
    assert plans[0] == [{"batch": 3, "seq": 16}, {"batch": 5, "seq": 24}]
    assert plans[1] == [{"batch": 3, "seq": 9}, {"batch": 5, "seq": 10}]
    spec = next(n for n in model.graph.nodes if n.op == "placeholder").meta["tg_spec"]
    build_sizes = sorted((spec.probes[0][1], spec.probes[1][1]))
    assert sorted((plans[-1][0]["seq"], plans[-1][1]["seq"])) == build_sizes  # the build sizes come last
    assert os.path.exists(tg.export_onnx(model, tmp_path / "m.onnx", exporter="legacy"))


def test_verification_falls_back_to_the_next_sizes_the_model_accepts(tmp_path):
    """A table of 20 positions rejects 16/24 (twice and three times the example's 8): 9/10 are used."""
    tokens = tg.Input(shape=("seq",), dtype=torch.long, name="tokens")
    positions = tokens.new_ones(tokens.shape).cumsum(1) - 1
    model = tg.Model(tokens, nn.Linear(8, 2)(nn.Embedding(100, 8)(tokens) + nn.Embedding(20, 8)(positions)))
    assert os.path.exists(tg.export_onnx(model, tmp_path / "m.onnx", exporter="legacy"))
    tight = tg.Model(tokens, nn.Linear(8, 2)(nn.Embedding(100, 8)(tokens) + nn.Embedding(9, 8)(positions)))
    with pytest.raises(OnnxExportError, match=r"fails in torch on the verification inputs tokens=\(3, \d+\) "
                                              r"\(also tried tokens=\(3, 16\); tokens=\(5, 10\)\).*verify_sizes="):
        tg.export_onnx(tight, tmp_path / "tight.onnx", exporter="legacy")


def test_masks_are_right_padded_and_keep_a_real_first_position():
    """Bool inputs and integer inputs that feed no embedding are masks: each row is real up to some
    length >= 1 (False / 1), padding after it (True / 0), so no attention row is fully masked."""
    from torchgraph.export.inputs import random_inputs

    ids = tg.Input(shape=("seq",), dtype=torch.long, name="ids")
    attention = tg.Input(shape=("seq",), dtype=torch.long, name="attention_mask")
    padding = tg.Input(shape=("seq",), dtype=torch.bool, name="padding")
    h = nn.Embedding(50, 4)(ids) * attention.unsqueeze(-1) * (~padding).unsqueeze(-1)
    specs = {s.name: s for s in input_specs(tg.Model([ids, attention, padding], h))}
    assert [specs[n].mask for n in ("ids", "attention_mask", "padding")] == [False, True, True]
    for seed in range(5):
        ids_, attention_, padding_ = random_inputs(list(specs.values()), 0, batch=16, seed=seed,
                                                   sizes={"seq": 12})
        assert ids_.max() < 50 and attention_.dtype == torch.long and padding_.dtype == torch.bool
        for real in (attention_.bool(), ~padding_):
            assert real[:, 0].all()  # the first position is real in every row
            lengths = real.sum(1)
            assert torch.equal(real, torch.arange(12) < lengths[:, None])  # a prefix, then padding
        assert len(set(lengths.tolist())) > 1


def test_bounded_dims_bound_export_and_verification(tmp_path):
    """Dims declared with tg.Dim(name, min=, max=) stay inside their bounds when verified, and the
    dynamo exporter is given the same range."""
    if not hasattr(tg, "Dim"):
        pytest.skip("tg.Dim (bounded dynamic dims) comes with the core's dims module")
    tokens = tg.Input(shape=(tg.Dim("seq", min=4, max=64),), dtype=torch.long, name="tokens")
    positions = tokens.new_ones(tokens.shape).cumsum(1) - 1
    model = tg.Model(tokens, nn.Embedding(100, 8)(tokens) + nn.Embedding(64, 8)(positions))
    from torchgraph.export.inputs import verification_plans

    specs = input_specs(model)
    for plan in verification_plans(specs, example={"seq": 8}):
        assert all(4 <= run["seq"] <= 64 for run in plan)
    assert os.path.exists(tg.export_onnx(model, tmp_path / "m.onnx"))
