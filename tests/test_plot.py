"""tg.plot_model / tg.model_to_dot: real renders with Graphviz `dot` (PNG, SVG, PDF) and their content."""

import doctest
import os
import re
import struct
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from shared_models import multi_io_model
import torchgraph.plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def nested_model():
    x = tg.Input(shape=(3, 16, 16), name="img")
    encoder = tg.Model(x, F.relu(nn.Conv2d(3, 4, 3)(x)).mean(dim=(2, 3)), name="Encoder")
    inp = tg.Input(shape=(3, 16, 16), name="picture")
    return tg.Model(inp, nn.Linear(4, 2)(encoder(inp)), name="Outer")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def svg_texts(svg: str) -> list[str]:
    """The visible text of an SVG written by dot (node ids live in <title>, not in <text>)."""
    return [t.replace("&#160;", " ") for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)]


def test_png_is_a_real_picture(tmp_path):
    """PNG: signature, plausible pixel size, returned graphviz object with the DOT text."""
    path = tmp_path / "multi.png"
    dot = tg.plot_model(multi_io_model(), to_file=str(path))
    data = path.read_bytes()
    width, height = png_size(data)
    assert 400 < width < 3000 and 500 < height < 5000
    assert len(data) > 20_000
    assert type(dot).__name__ == "Digraph" and "linear_call_1" in dot.source
    assert [p.name for p in tmp_path.iterdir()] == ["multi.png"]  # no temporary file left


def test_svg_shows_names_types_shapes_params(tmp_path):
    """SVG text: every node's name and type, dynamic dims as None, params, inputs and outputs."""
    path = tmp_path / "multi.svg"
    tg.plot_model(multi_io_model(), to_file=path)
    svg = path.read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    text = " ".join(svg_texts(svg))
    for name in ("img", "tokens", "conv2d", "relu", "mean", "embedding", "lstm", "linear",
                 "linear_call_1", "getitem_1", "cat", "linear_1", "logits", "feat"):
        assert re.search(rf"(^| ){name}( |$)", text), name
    for label in ("Conv2d", "F.relu", "Tensor.mean", "torch.cat", "Embedding", "LSTM", "Input", "Output"):
        assert label in text, label
    for shape in ("(None, 3, 32, 32)", "(None, 8)", "(None, 16, 30, 30)", "(None, 8, 16)",
                  "(None, 32)", "(None, 10)"):
        assert shape in text, shape
    assert "448" in text and "1,600" in text and "2,176" in text and "330" in text
    assert "int64" in text  # input dtypes are always shown
    assert "shared, call 2 of 2" in text and "shared" in text
    assert "Multi" in text and "4,826 params" in text


def test_pdf_render(tmp_path):
    """PDF is chosen by the extension."""
    path = tmp_path / "model.pdf"
    tg.plot_model(tg.applications.mlp(depth=2, width=8, num_classes=3), to_file=path)
    data = path.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 2_000


def test_dot_extension_writes_source_without_rendering(tmp_path):
    """.dot/.gv write the DOT text itself (no `dot` program needed)."""
    path = tmp_path / "model.gv"
    dot = tg.plot_model(multi_io_model(), to_file=path)
    assert path.read_text() == dot.source
    assert dot.source.startswith("digraph Multi {")


def test_inputs_outputs_and_kinds_are_visibly_distinct():
    """Inputs green+rounded, outputs red+rounded, layers blue, functions grey; only 6-digit colours."""
    source = tg.model_to_dot(multi_io_model()).source
    node_lines = {m.group(1): m.group(2) for m in re.finditer(r'^\s*"?([\w/]+)"? \[label=<(.*)>\]$',
                                                               source, flags=re.M)}
    assert 'BGCOLOR="#2E7D32"' in node_lines["img"] and 'STYLE="ROUNDED"' in node_lines["img"]
    assert 'BGCOLOR="#C62828"' in node_lines["__output__/logits"]
    assert 'STYLE="ROUNDED"' in node_lines["__output__/feat"]
    assert 'BGCOLOR="#1565C0"' in node_lines["conv2d"]
    assert 'BGCOLOR="#546E7A"' in node_lines["cat"]
    assert 'STYLE="DASHED"' in node_lines["linear_call_1"]  # a shared layer's later call
    colours = re.findall(r"#[0-9A-Fa-f]+\b", source)
    assert colours and all(len(c) == 7 for c in colours)
    assert "linear_1 -> \"__output__/logits\"" in source and "linear -> \"__output__/feat\"" in source


def test_options_change_the_labels(tmp_path):
    """show_shapes, show_dtype, show_layer_names and rankdir do what they say."""
    model = multi_io_model()
    plain = tg.model_to_dot(model, show_shapes=False).source
    assert "(None, 16, 30, 30)" not in plain and "448" in plain
    with_dtype = tg.model_to_dot(model, show_dtype=True).source
    assert with_dtype.count("float32") > tg.model_to_dot(model).source.count("float32")
    no_names = tg.plot_model(model, to_file=tmp_path / "n.svg", show_layer_names=False)
    text = " ".join(svg_texts((tmp_path / "n.svg").read_text()))
    assert "Conv2d" in text and "conv2d" not in text and "linear_call_1" not in text
    assert "rankdir=TB" in no_names.source
    assert "rankdir=LR" in tg.model_to_dot(model, rankdir="LR").source


def test_dpi_scales_png(tmp_path):
    """dpi sets the PNG resolution."""
    model = tg.applications.mlp(depth=2, width=8, num_classes=3)
    tg.plot_model(model, to_file=tmp_path / "a.png", dpi=48)
    tg.plot_model(model, to_file=tmp_path / "b.png", dpi=96)
    wa, ha = png_size((tmp_path / "a.png").read_bytes())
    wb, hb = png_size((tmp_path / "b.png").read_bytes())
    assert abs(wb / wa - 2) < 0.1 and abs(hb / ha - 2) < 0.1


def test_expand_nested_draws_a_cluster(tmp_path):
    """A nested model is one purple node, or a cluster of its own nodes wired to the outer graph."""
    model = nested_model()
    flat = tg.model_to_dot(model).source
    assert "cluster" not in flat and "encoder" in flat and "#6A1B9A" in flat
    dot = tg.plot_model(model, to_file=tmp_path / "nested.svg", expand_nested=True)
    source = dot.source
    cluster = source[source.index("subgraph"):source.index("}", source.index("subgraph"))]
    assert '"encoder/conv2d"' in cluster and '"encoder/img"' in cluster
    assert "picture" not in cluster  # the outer input stays outside the cluster
    assert 'picture -> "encoder/img"' in source
    assert '"encoder/mean" -> linear' in source
    svg = (tmp_path / "nested.svg").read_text()
    assert 'class="cluster"' in svg and "Encoder" in " ".join(svg_texts(svg))


def test_expand_nested_multi_output_wires_each_output():
    """getitem on an expanded nested model connects to the inner node producing that output."""
    x = tg.Input(shape=(4,), name="x")
    inner = tg.Model(x, {"a": nn.Linear(4, 3)(x), "b": nn.Linear(4, 5)(x)}, name="Heads")
    inp = tg.Input(shape=(4,), name="features")
    out = inner(inp)
    model = tg.Model(inp, torch.cat([out["a"], out["b"]], dim=1))
    source = tg.model_to_dot(model, expand_nested=True).source
    assert '"heads/linear" -> getitem' in source and '"heads/linear_1" -> getitem_1' in source
    assert '"heads/linear" -> getitem_1' not in source


def test_resnet50_renders_in_seconds(tmp_path):
    """ResNet-50: a legible PNG (no downscaling by dot) within a few seconds."""
    model = tg.applications.resnet50()
    start = time.perf_counter()
    tg.plot_model(model, to_file=tmp_path / "resnet50.png")
    elapsed = time.perf_counter() - start
    width, height = png_size((tmp_path / "resnet50.png").read_bytes())
    assert elapsed < 15, elapsed
    assert height < 32_767 and width > 600  # under cairo's limit: dot did not shrink the text
    tg.plot_model(model, to_file=tmp_path / "resnet50.svg")
    text = " ".join(svg_texts((tmp_path / "resnet50.svg").read_text()))
    assert "layer4_2_conv3" in text and "(None, 2048, 7, 7)" in text and "25,557,032 params" in text


def test_jupyter_display():
    """A model displays itself in Jupyter as SVG (with a text fallback)."""
    bundle = multi_io_model()._repr_mimebundle_()
    assert "<svg" in bundle["image/svg+xml"] and "linear_call_1" in bundle["image/svg+xml"]
    assert bundle["text/plain"].startswith("Multi(")
    assert "<svg" in multi_io_model()._repr_svg_()


def test_missing_dot_program_gives_install_hint(tmp_path, monkeypatch):
    """Without `dot` on PATH: a clear error naming the fix, while the DOT text still works."""
    monkeypatch.setenv("PATH", str(tmp_path))  # a real PATH without Graphviz
    model = multi_io_model()
    with pytest.raises(RuntimeError, match=r"`dot` program was not found.*apt-get install graphviz"):
        tg.plot_model(model, to_file=tmp_path / "model.png")
    assert not (tmp_path / "model.png").exists()
    assert "linear_call_1" in tg.model_to_dot(model).source
    tg.plot_model(model, to_file=tmp_path / "model.dot")  # the DOT file needs no dot program
    assert (tmp_path / "model.dot").read_text().startswith("digraph")
    assert set(model._repr_mimebundle_()) == {"text/plain"}  # Jupyter falls back to text


def test_without_graphviz_package_import_still_works():
    """`import torchgraph` works without the graphviz package; plotting then says how to install it."""
    code = ("import sys; sys.modules['graphviz'] = None\n"
            "import torchgraph as tg, torch.nn as nn\n"
            "x = tg.Input(shape=(2,)); m = tg.Model(x, nn.Linear(2, 2)(x))\n"
            "try:\n    tg.plot_model(m, to_file='never.png')\n"
            "except ImportError as e:\n    print('HINT', e)\n"
            "print(sorted(m._repr_mimebundle_()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert "HINT" in out.stdout and "pip install 'torchgraph-fx[plot]'" in out.stdout
    assert "['text/plain']" in out.stdout


def test_overwrites_atomically(tmp_path):
    """An existing file is replaced in one step; no temporary files remain."""
    path = tmp_path / "m.svg"
    path.write_text("old")
    tg.plot_model(tg.applications.mlp(depth=1, width=4), to_file=path)
    assert path.read_text().lstrip().startswith("<?xml")
    assert [p.name for p in tmp_path.iterdir()] == ["m.svg"]


def test_bad_arguments(tmp_path):
    """Clear errors for a bad extension, a missing folder, bad options, a non-model, an unbuilt model."""
    model = tg.applications.mlp(depth=1, width=4)
    with pytest.raises(ValueError, match=r"Expected one of \.png, \.svg, \.pdf.*received '\.jpeg'"):
        tg.plot_model(model, to_file=tmp_path / "m.jpeg")
    with pytest.raises(ValueError, match="received 'no extension'"):
        tg.plot_model(model, to_file=tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tg.plot_model(model, to_file=tmp_path / "missing" / "m.png")
    with pytest.raises(ValueError, match="rankdir must be"):
        tg.plot_model(model, to_file=tmp_path / "m.png", rankdir="UP")
    with pytest.raises(ValueError, match="dpi must be a positive number"):
        tg.plot_model(model, to_file=tmp_path / "m.png", dpi=0)
    with pytest.raises(TypeError, match="expected a tg.Model"):
        tg.model_to_dot(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no inputs yet"):
        tg.model_to_dot(tg.Sequential([nn.Linear(2, 2)]))


def test_docstring_examples(tmp_path, monkeypatch):
    """The Example sections of plot.py run."""
    monkeypatch.chdir(tmp_path)
    assert doctest.testmod(torchgraph.plot).failed == 0


def test_visualization_doc_blocks_run(tmp_path, monkeypatch, capsys):
    """docs/visualization.md: its python blocks run, and its summary text is the real output."""
    page = os.path.join(os.path.dirname(__file__), "..", "docs", "visualization.md")
    with open(page) as f:
        text = f.read()
    monkeypatch.chdir(tmp_path)
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
    exec(compile(code, "visualization.md", "exec"), {})
    printed = capsys.readouterr().out
    shown = re.search(r"```text\n(.*?)```", text, flags=re.S).group(1)
    assert shown in printed
    assert "digraph Multi" in printed
    images = os.path.join(os.path.dirname(page), "images")
    for name in ("digitnet.png", "siamese.png"):  # the committed pictures the page shows
        with open(os.path.join(images, name), "rb") as f:
            data = f.read()
        assert png_size(data)[0] > 500 and len(data) > 50_000


def scoped_model():
    x = tg.Input(shape=(16,), name="features")
    with tg.scope("encoder"):
        h = nn.Linear(16, 32)(x).relu()
        for i in range(2):
            with tg.scope(f"block{i}"):
                h = h + nn.Linear(32, 32)(h).relu()
    return tg.Model(x, nn.Linear(32, 3)(h), name="Scoped")


def test_depth_draws_clusters_and_one_box_per_scope(tmp_path):
    """Scopes above the depth are dashed clusters; each scope at the depth is one box with its shapes."""
    model = scoped_model()
    dot = tg.plot_model(model, to_file=tmp_path / "scoped.png", depth=2)
    source = dot.source
    assert 'subgraph "cluster_@encoder"' in source and "@encoder.block0" in source
    assert "encoder.block0.linear" not in source and "depth 2 of 3" in source
    assert '"@encoder.block0" -> "@encoder.block1"' in source  # edges between collapsed boxes
    assert png_size((tmp_path / "scoped.png").read_bytes())[0] > 200
    svg = tg.plot_model(model, to_file=tmp_path / "scoped.svg", depth=2)
    text = " ".join(svg_texts((tmp_path / "scoped.svg").read_text()))
    assert "encoder.block1" in text and "1,056" in text and "(None, 32)" in text
    whole = tg.model_to_dot(model).source  # small enough: every node, scopes as clusters
    assert "encoder.block0.linear" in whole and 'cluster_@encoder.block0' in whole


def _twelve_scoped_stages(name=None):
    """12 tg.scope stages of 3 Linear+relu each (73 nodes with the input): past max_nodes, with levels."""
    x = tg.Input(shape=(8,))
    h = x
    for i in range(12):
        with tg.scope(f"stage{i}"):
            for _ in range(3):
                h = nn.Linear(8, 8)(h).relu()
    return tg.Model(x, h, name=name)


def test_big_models_collapse_by_default_and_say_so():
    """Past max_nodes, a model with levels is drawn at the deepest level that fits; the title says so."""
    model = _twelve_scoped_stages()
    source = tg.model_to_dot(model).source
    assert "73 nodes, collapsed to depth 1 of 2; depth=2 draws every node" in source
    assert "@stage11" in source and "stage11.linear" not in source
    assert "stage11.linear_2" in tg.model_to_dot(model, max_nodes=None).source
    with pytest.raises(ValueError, match="max_nodes must be a positive int or None"):
        tg.model_to_dot(model, max_nodes=0)
    with pytest.raises(ValueError, match="depth must be None"):
        tg.model_to_dot(model, depth=-1)


def test_huge_flat_graph_uses_fast_layout_settings():
    """A model without levels past 200 boxes gets dot's cheaper settings, and the title says so."""
    x = tg.Input(shape=(4,))
    h = x
    for _ in range(105):
        h = (h * 2).relu()
    source = tg.model_to_dot(tg.Model(x, h)).source
    assert "fast layout" in source and "nslimit=1" in source and "splines=line" in source
    assert "fast layout" not in tg.model_to_dot(multi_io_model()).source


def test_plot_model_takes_a_module_with_inputs(tmp_path):
    """An nn.Module with inputs= goes through tg.from_module: its module tree becomes the picture."""
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    dot = tg.plot_model(net, to_file=tmp_path / "net.svg", inputs=(3, 8, 8), depth=1)
    assert '"@0"' in dot.source and "Sequential" in dot.source
    text = " ".join(svg_texts((tmp_path / "net.svg").read_text()))
    assert "(None, 8, 6, 6)" in text and "Sequential" in text
    assert "(None, 2)" in tg.model_to_dot(net, inputs=[tg.Input(shape=(3, 8, 8))]).source


def test_jupyter_display_is_compact_for_big_models():
    """Big models with levels show their collapsed picture; big flat ones a few lines of text."""
    bundle = _twelve_scoped_stages(name="Deep")._repr_mimebundle_()
    assert "<svg" in bundle["image/svg+xml"] and len(bundle["image/svg+xml"]) < 60_000
    assert bundle["text/plain"].startswith("Deep (tg.Model): 73 nodes, 2,592 params")
    flat = tg.applications.resnet50()
    bundle = flat._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}
    assert "176 nodes, 25,557,032 params" in bundle["text/plain"] and "model.summary()" in bundle["text/plain"]
