"""model.summary(): the table of layers, shapes and parameter counts (real models, exact text)."""

import copy
import doctest
import pickle
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from shared_models import multi_io_model
import torchgraph.describe
import torchgraph.summary
from torchgraph.summary import format_summary


MULTI_IO_SUMMARY = """\
Model: "Multi"
Inputs:  img (None, 3, 32, 32) float32; tokens (None, 8) int64
Outputs: logits = linear_1 (None, 10) float32; feat = linear (None, 16) float32
=============================================================================================================
Layer (type)                      Output Shape                      Param #  Connected to           Trainable
=============================================================================================================
img (Input)                       (None, 3, 32, 32)                       0  -                      -
tokens (Input)                    (None, 8)                               0  -                      -
conv2d (Conv2d)                   (None, 16, 30, 30)                    448  img                    Y
relu (F.relu)                     (None, 16, 30, 30)                      0  conv2d                 -
mean (Tensor.mean)                (None, 16)                              0  relu                   -
embedding (Embedding)             (None, 8, 16)                       1,600  tokens                 Y
lstm (LSTM)                       [(None, 8, 16),                     2,176  embedding              Y
                                   [(1, None, 16), (1, None, 16)]]
linear (Linear, shared: 2 calls)  (None, 16)                            272  mean                   Y
  linear_call_1 (call 2 of 2)     (None, 16)                                 getitem_1
getitem (x[...])                  (None, 8, 16)                           0  lstm                   -
getitem_1 (x[...])                (None, 16)                              0  getitem                -
cat (torch.cat)                   (None, 32)                              0  linear, linear_call_1  -
linear_1 (Linear)                 (None, 10)                            330  cat                    Y
=============================================================================================================
Total params: 4,826 (18.85 KiB)
Trainable params: 4,826 (18.85 KiB)
Non-trainable params: 0 (0 B)"""


def summary_text(model, **kwargs) -> str:
    got = []
    model.summary(print_fn=got.append, **kwargs)
    assert len(got) == 1, "print_fn receives the whole text once"
    return got[0]


def test_multi_io_shared_layer_exact_text():
    """Input/output names, one row per node, the shared layer once with its second call site."""
    assert summary_text(multi_io_model()) == MULTI_IO_SUMMARY


def test_resnet50_totals_and_rows():
    """ResNet-50 (torchvision layout): 25,557,032 parameters, every node a row, branches connected."""
    model = tg.applications.resnet50()
    text = summary_text(model)
    lines = text.splitlines()
    assert "Total params: 25,557,032 (97.49 MiB)" in lines
    assert "Trainable params: 25,557,032 (97.49 MiB)" in lines
    assert "Non-trainable params: 0 (0 B)" in lines
    assert any(line.startswith("Buffers (not parameters") and "53,173" in line for line in lines)
    header = next(line for line in lines if line.startswith("Layer (type)"))
    assert "Connected to" in header and "Trainable" in header
    rules = [k for k, line in enumerate(lines) if line and set(line) == {"="}]
    rows = lines[rules[1] + 1:rules[2]]
    num_nodes = sum(1 for n in model.graph.nodes if n.op != "output")
    assert len(rows) == num_nodes == 176
    fc = next(line for line in rows if line.startswith("fc (Linear)"))
    assert "(None, 1000)" in fc and "2,049,000" in fc and "flatten" in fc
    add = next(line for line in rows if line.startswith("add (Tensor.add)"))
    assert "layer1_0_bn3, layer1_0_downsample_1" in add
    assert sum(r.split()[0] == "image" for r in rows) == 1
    # The rows' parameter counts add up to the total (no shared layers here).
    end = header.index("Param #") + len("Param #")  # the column is right-aligned
    assert sum(int(r[:end].split()[-1].replace(",", "")) for r in rows) == 25_557_032


def test_sequential_chain_has_no_connected_column():
    """A plain chain (Keras' Sequential look) omits "Connected to"."""
    text = summary_text(tg.applications.mlp(depth=2, width=8, num_classes=3))
    assert "Connected to" not in text
    assert "linear_2 (Linear)  (None, 3)" in text
    assert "relu_1 (F.relu)" in text


def test_expand_nested_indents_inner_rows():
    """A nested model is one row, or its rows indented below it with expand_nested=True."""
    x = tg.Input(shape=(3, 16, 16), name="img")
    encoder = tg.Model(x, F.relu(nn.Conv2d(3, 4, 3)(x)).mean(dim=(2, 3)), name="Encoder")
    inp = tg.Input(shape=(3, 16, 16))
    model = tg.Model(inp, nn.Linear(4, 2)(encoder(inp)), name="Outer")
    flat = summary_text(model)
    assert "encoder (Encoder)" in flat and "conv2d" not in flat
    expanded = summary_text(model, expand_nested=True)
    lines = expanded.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("encoder (Encoder)"))
    assert lines[i + 1].startswith("| img (Input)")
    assert lines[i + 2].startswith("| conv2d (Conv2d)") and "(None, 4, 14, 14)" in lines[i + 2]
    assert "Total params: 122 (488 B)" in lines  # not double counted


def test_frozen_params_and_trainable_column():
    """Frozen parameters are non-trainable in the footer and N / partial in the column."""
    x = tg.Input(shape=(4,))
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    a.requires_grad_(False)
    b.bias.requires_grad_(False)
    text = summary_text(tg.Model(x, b(a(x))))
    assert "linear (Linear)    (None, 4)          20  N" in text
    assert "linear_1 (Linear)  (None, 2)          10  partial" in text
    assert "Trainable params: 8 (32 B)" in text
    assert "Non-trainable params: 22 (88 B)" in text


def test_constants_and_dynamic_sizes_are_rows():
    """get_attr parameters/constants and x.size(0) arithmetic appear as rows with their shapes."""
    x = tg.Input(shape=(6,))
    scale = nn.Parameter(torch.ones(6))
    y = (x * scale).view(x.size(0), 2, 3)
    text = summary_text(tg.Model(x, y))
    assert "(Parameter)" in text and "(6,)" in text
    assert "size (Tensor.size)" in text and " int " in text
    assert "(None, 2, 3)" in text
    assert "Total params: 6 (24 B)" in text


def test_line_length_sets_width_and_wraps():
    """line_length fixes the table width; long cells wrap instead of overflowing."""
    text = summary_text(multi_io_model(), line_length=80)
    table = [line for line in text.splitlines() if line.startswith("=")]
    assert all(len(line) == 80 for line in table)
    body = text.split("=" * 80)[2]
    assert all(len(line) <= 80 for line in body.splitlines())
    assert "linear_call_1" in text
    with pytest.raises(ValueError, match="line_length=20 is too small"):
        summary_text(multi_io_model(), line_length=20)
    with pytest.raises(TypeError, match="line_length must be an int"):
        summary_text(multi_io_model(), line_length="wide")


def test_output_does_not_depend_on_terminal_width(monkeypatch):
    """The same text whatever the terminal says its width is (COLUMNS drives shutil/rich/etc.)."""
    outs = []
    for cols in ("40", "300"):
        monkeypatch.setenv("COLUMNS", cols)
        outs.append(summary_text(multi_io_model()))
    assert outs[0] == outs[1] == MULTI_IO_SUMMARY


def test_survives_copy_and_pickle():
    """A copied or unpickled model prints the same summary."""
    model = multi_io_model()
    assert summary_text(copy.deepcopy(model)) == MULTI_IO_SUMMARY
    assert summary_text(pickle.loads(pickle.dumps(model))) == MULTI_IO_SUMMARY


def test_default_print_fn_prints(capsys):
    """Without print_fn the text goes to stdout; summary returns None."""
    assert tg.applications.mlp(depth=1, width=4).summary() is None
    assert 'Model: "MLP"' in capsys.readouterr().out


def test_bad_arguments():
    """Clear errors for a non-model, a non-callable print_fn, an unbuilt Sequential."""
    with pytest.raises(TypeError, match="expected a tg.Model"):
        format_summary(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="print_fn must be callable"):
        tg.applications.mlp(depth=1, width=4).summary(print_fn="stdout")
    with pytest.raises(ValueError, match="no inputs yet"):
        tg.Sequential([nn.Linear(2, 2)]).summary()


def test_docstring_examples():
    """The Example sections of summary.py and describe.py run."""
    for module in (sys.modules["torchgraph.summary"], torchgraph.describe):  # tg.summary is the function
        assert doctest.testmod(module).failed == 0


def test_named_dynamic_dims_are_shown_by_name():
    """A named dynamic dim prints as its name, the batch as None."""
    x = tg.Input(shape=("seq", 4), name="frames")
    text = summary_text(tg.Model(x, nn.Linear(4, 2)(x)))
    assert "frames (Input)   (None, seq, 4)" in text
    assert "linear (Linear)  (None, seq, 2)" in text


def test_plain_fx_graph_module_uses_fx_shapes():
    """Any GraphModule works: shapes from fx's ShapeProp metadata, '?' when there are none."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    assert "0 (Linear)       ?                   9  Y" in format_summary(gm)  # named by module path
    ShapeProp(gm).propagate(torch.randn(5, 2))
    text = format_summary(gm)
    assert "0 (Linear)       (5, 3)              9  Y" in text
    assert "Inputs:  input_1 (5, 2) float32" in text


def _scoped_model():
    x = tg.Input(shape=(16,), name="features")
    with tg.scope("encoder"):
        h = nn.Linear(16, 32)(x).relu()
        for i in range(2):
            with tg.scope(f"block{i}"):
                h = h + nn.Linear(32, 32)(h).relu()
    return tg.Model(x, nn.Linear(32, 3)(h), name="Scoped")


SCOPED_DEPTH_2 = """\
Model: "Scoped"
Inputs:  features (None, 16) float32
Outputs: output = linear (None, 3) float32
Depth: 2 of 3 (deeper nodes are collapsed into their submodule's row; depth=None lists all 10 nodes)
===========================================================================
Layer (type)               Output Shape  Param #  Connected to    Trainable
===========================================================================
features (Input)           (None, 16)          0  -               -
encoder (scope)            (None, 32)      2,656  features        Y
| encoder.linear (Linear)  (None, 32)        544  features        Y
| relu (Tensor.relu)       (None, 32)          0  encoder.linear  -
| encoder.block0 (scope)   (None, 32)      1,056  relu            Y
| encoder.block1 (scope)   (None, 32)      1,056  encoder.block0  Y
linear (Linear)            (None, 3)          99  encoder.block1  Y
===========================================================================
Total params: 2,755 (10.76 KiB)
Trainable params: 2,755 (10.76 KiB)
Non-trainable params: 0 (0 B)"""


def test_depth_collapses_scopes_into_rows():
    """depth=N: nodes down to level N, one row per scope at level N, header rows above (exact text)."""
    model = _scoped_model()
    assert summary_text(model, depth=2) == SCOPED_DEPTH_2
    top = summary_text(model, depth=1)
    assert "encoder (scope)   (None, 32)      2,656  features      Y" in top and "block0" not in top
    full = summary_text(model)
    assert "Depth:" not in full and "| | encoder.block0.linear (Linear)" in full
    assert summary_text(model, depth=3) == full  # the deepest level: everything


def test_depth_counts_nested_models_as_levels():
    """A nested tg.Model opens up when depth reaches below it, like expand_nested."""
    x = tg.Input(shape=(3, 16, 16), name="img")
    encoder = tg.Model(x, F.relu(nn.Conv2d(3, 4, 3)(x)).mean(dim=(2, 3)), name="Encoder")
    inp = tg.Input(shape=(3, 16, 16))
    model = tg.Model(inp, nn.Linear(4, 2)(encoder(inp)), name="Outer")
    assert "conv2d" not in summary_text(model, depth=1)
    assert "| conv2d (Conv2d)" in summary_text(model, depth=2)


def test_tg_summary_takes_modules_and_models():
    """tg.summary records an nn.Module on its inputs first; a tg.Model is shown as it is."""
    net = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 2))
    lines = []
    tg.summary(net, (8,), depth=1, print_fn=lines.append)
    assert "0 (Sequential)   (None, 16)        144  Y" in lines[0] and "1 (Linear)" in lines[0]
    model = tg.from_module(net, (8,))
    tg.summary(model, print_fn=lines.append)
    assert "| 0.0 (Linear)" in lines[1]
    with pytest.raises(TypeError, match="received Sequential without inputs"):
        tg.summary(net)
    with pytest.raises(TypeError, match="Drop the inputs"):
        tg.summary(model, (8,))
    with pytest.raises(ValueError, match="depth must be None .* or an int >= 1"):
        tg.summary(model, depth=0)
