"""The torchgraph command line, run as a real subprocess (python -m torchgraph)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from torchgraph import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=None, extra_path=None):
    env = dict(os.environ)
    path = [ROOT] + ([extra_path] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env.pop("TORCHGRAPH_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "torchgraph", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    x = tg.Input(shape=(3, 16, 16), name="image")
    ids = tg.Input(shape=(None,), dtype=torch.long, name="tokens")
    h = nn.Conv2d(3, 8, 3)(x).mean(dim=(2, 3)) + nn.Embedding(50, 8)(ids).mean(1)
    model = tg.Model([x, ids], {"logits": nn.Linear(8, 4)(h), "features": h}, name="TwoInputs").eval()
    path = tmp_path_factory.mktemp("cli") / "two_inputs.safetensors"
    tg.save(model, path)
    return path


def test_info(model_file):
    """info prints the name, inputs, outputs with shapes and dtypes, layers, parameters, mode."""
    result = run("info", model_file)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    params = 3 * 8 * 9 + 8 + 50 * 8 + 8 * 4 + 4
    for fragment in ("Model:       TwoInputs", "image", "(None, 3, 16, 16)", "tokens", "(None, None)",
                     "int64", "logits", "(None, 4)", "features", "(None, 8)",
                     "Conv2d x1", "Embedding x1", "Linear x1", f"{params:,} ({params:,} trainable)",
                     "float32", "Mode:        eval"):
        assert fragment in out, (fragment, out)


@pytest.mark.parametrize("command", ["info", "summary", "plot", "export"])
def test_help_for_each_command(command):
    """--help works for every command and names its arguments."""
    result = run(command, "--help")
    assert result.returncode == 0 and "FILE" in result.stdout and "--register" in result.stdout


def test_top_level_help_and_usage_errors():
    """--help lists the commands; no command, or a missing -o, is a usage error (exit 2)."""
    result = run("--help")
    assert result.returncode == 0
    assert all(c in result.stdout for c in ("info", "summary", "plot", "export"))
    assert run().returncode == 2
    assert run("plot", "x.safetensors").returncode == 2


@pytest.mark.parametrize("command", ["info", "export"])
def test_missing_file(command, tmp_path):
    """A missing file is one line on stderr and exit status 1."""
    extra = {"plot": ["-o", tmp_path / "m.svg"], "export": ["-o", tmp_path / "m.onnx"]}.get(command, [])
    assert_one_line_error(run(command, tmp_path / "nope.safetensors", *extra), "no such file")


def test_corrupt_and_foreign_files(tmp_path):
    """Garbage, truncated files and torch.save files are one-line errors."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert_one_line_error(run("info", garbage), "not a valid torchgraph file", "invalid JSON")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert_one_line_error(run("summary", empty), "it is empty")
    pt = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    assert_one_line_error(run("info", pt), "torch.save")
    assert_one_line_error(run("info", tmp_path), "directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_fifos_are_refused_without_blocking(model_file, tmp_path):
    """A FIFO as the model file, or as the output, is a one-line error (opening it would block).
    Every command goes through the same check; info and plot stand for them."""
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    assert_one_line_error(run("info", fifo), "not a regular file")
    out = tmp_path / "out.svg"
    os.mkfifo(out)
    assert_one_line_error(run("plot", model_file, "-o", out), "not a regular file")


def test_wrong_output_extensions(model_file, tmp_path):
    """plot wants .png/.svg/.pdf and export wants .onnx, checked before loading."""
    assert_one_line_error(run("plot", model_file, "-o", tmp_path / "model.jpg"), ".png, .svg or .pdf")
    assert_one_line_error(run("export", model_file, "-o", tmp_path / "model.txt"), ".onnx")
    assert not (tmp_path / "model.jpg").exists() and not (tmp_path / "model.txt").exists()


def test_max_bytes_option(model_file):
    """--max-bytes refuses larger files."""
    assert_one_line_error(run("info", model_file, "--max-bytes", "100"), "max_bytes=100")


def test_register_option_loads_custom_layers(tmp_path):
    """--register MODULE imports the module that registers a custom layer; without it, a hint."""
    (tmp_path / "my_layers.py").write_text(textwrap.dedent("""
        import torch.nn as nn, torchgraph as tg

        @tg.register_layer(name="my_layers.Double")
        class Double(nn.Module):
            def __init__(self, scale=2.0):
                super().__init__()
                self.scale = scale
            def forward(self, x):
                return x * self.scale
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import my_layers
        x = tg.Input(shape=(4,))
        path = tmp_path / "custom.safetensors"
        tg.save(tg.Model(x, my_layers.Double(3.0)(x)), path)
    finally:
        sys.path.remove(str(tmp_path))
    assert_one_line_error(run("info", path), "unknown layer class 'my_layers.Double'", "import the module")
    result = run("info", path, "--register", "my_layers", extra_path=str(tmp_path))
    assert result.returncode == 0 and "Double x1" in result.stdout
    assert_one_line_error(run("info", path, "--register", "no_such_module_xyz"), "cannot import")


# ---------------------------------------------------------------------------------------------
# summary / plot / export: written in parallel; these run against the real functions
# ---------------------------------------------------------------------------------------------

def _require(obj, name):
    if getattr(obj, name, None) is None:
        pytest.skip(f"{name} is missing from this torchgraph (issue not merged yet): cannot test the "
                    f"'{name}' command against it")


def test_summary_command(model_file):
    """summary prints model.summary()'s table."""
    _require(tg.Model, "summary")
    result = run("summary", model_file)
    assert result.returncode == 0, result.stderr
    assert "conv2d" in result.stdout and "linear" in result.stdout


@pytest.mark.parametrize("suffix", [".svg", ".png", ".pdf"])
def test_plot_command(model_file, tmp_path, suffix):
    """plot writes the picture with tg.plot_model."""
    _require(tg, "plot_model")
    pytest.importorskip("graphviz", reason="tg.plot_model needs the graphviz package")
    out = tmp_path / f"model{suffix}"
    result = run("plot", model_file, "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0


def test_export_command(model_file, tmp_path):
    """export writes an ONNX file with tg.export_onnx."""
    _require(tg, "export_onnx")
    pytest.importorskip("onnx", reason="tg.export_onnx needs onnx")
    out = tmp_path / "model.onnx"
    result = run("export", model_file, "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0


@pytest.mark.parametrize("command, owner, name", [("summary", tg.Model, "summary"),
                                                  ("plot", tg, "plot_model"),
                                                  ("export", tg, "export_onnx")])
def test_missing_feature_is_a_clear_error(model_file, tmp_path, monkeypatch, capsys, command, owner, name):
    """Without the function behind a command, the command says so and exits 1 (run in-process)."""
    monkeypatch.delattr(owner, name, raising=False)
    extra = {"plot": ["-o", str(tmp_path / "m.svg")], "export": ["-o", str(tmp_path / "m.onnx")]}
    status = cli.main([command, str(model_file), *extra.get(command, [])])
    err = capsys.readouterr().err
    assert status == 1 and "not available in this version" in err and name in err
