"""How the compiled kernels are found, built, cached and loaded (torchgraph/_extension.py).

The cache tests compile a one-op library (a few seconds) in fresh subprocesses, with their own
cache folder, so they neither touch nor depend on the real kernels' cache.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from torchgraph import _extension

ROOT = pathlib.Path(__file__).resolve().parent.parent

TINY_LIBRARY = """
#include <ATen/ops/mul.h>
#include <torch/library.h>
TORCH_LIBRARY(tg_cache_test, m) { m.def("twice(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(tg_cache_test, CPU, m) {
  m.impl("twice", [](const at::Tensor& x) { return at::mul(x, 2); });
}
"""

# Builds and loads the kernels of SOURCES (not the real ones), then calls the op.
BUILD_SCRIPT = textwrap.dedent("""
    import pathlib, sys, warnings
    import torch
    from torchgraph import _extension
    _extension._source_dir = lambda: pathlib.Path(sys.argv[1])
    retry = len(sys.argv) > 2
    try:
        path = _extension.build_kernels(retry_failed=retry)
    except _extension.KernelsUnavailable as error:
        print("UNAVAILABLE:", error)
    else:
        print("LOADED:", path, torch.ops.tg_cache_test.twice(torch.ones(2)).tolist())
""")


def _has_toolchain() -> bool:
    with _extension._ninja_on_path():
        compiler, ninja = shutil.which(os.environ.get("CXX", "c++")), shutil.which("ninja")
    return compiler is not None and ninja is not None


needs_toolchain = pytest.mark.skipif(not _has_toolchain(), reason="needs a C++ compiler and ninja")


def _sources(folder: pathlib.Path, code: str = TINY_LIBRARY) -> pathlib.Path:
    (folder / "cpu").mkdir(parents=True, exist_ok=True)
    (folder / "torchgraph.cpp").write_text(code)
    return folder


def _start(sources, cache, *extra_args, **env):
    # TORCHGRAPH_DISABLE_C_OPS keeps `import torchgraph` from loading the real kernels first.
    environment = {**os.environ, "PYTHONPATH": str(ROOT), _extension.CACHE_ENV_VAR: str(cache),
                   _extension.DISABLE_ENV_VAR: "1", **env}
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(sources), *extra_args],
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return out, err


def test_kernels_are_loaded_wherever_they_can_be_built():
    """With a compiler and ninja present, the import compiled or found the kernels: no silent fallback."""
    if os.environ.get(_extension.DISABLE_ENV_VAR) == "1":
        assert not _extension.HAS_C_OPS
    elif _has_toolchain():
        assert _extension.HAS_C_OPS, _extension.LOAD_ERROR
        assert _extension.LIBRARY_PATH.is_file()
    else:
        assert not _extension.HAS_C_OPS and "was not found" in _extension.LOAD_ERROR


@pytest.mark.skipif(not _extension.HAS_C_OPS, reason="the kernels could not be built here")
def test_optimize_runs_the_compiled_kernels():
    """tg.optimize's result calls torchgraph::* kernels (the profiler sees them run)."""
    torch.manual_seed(0)
    x = tg.Input(shape=(8, 6, 6))
    h = nn.Conv2d(8, 8, 3, padding=1)(x)
    y = nn.MaxPool2d(2)(torch.relu(nn.Conv2d(8, 8, 3, padding=1)(h) + h))  # the residual runs in the conv
    model = tg.Model(x, nn.Linear(8, 4)(y.mean(dim=(2, 3)))).eval()
    fast = tg.optimize(model)
    data = torch.randn(2, 8, 6, 6)
    with torch.no_grad(), torch.autograd.profiler.profile() as profile:
        out = fast(data)
    torch.testing.assert_close(out, model(data), atol=1e-4, rtol=1e-4)
    assert any(event.name.startswith("torchgraph::") for event in profile.function_events)


@needs_toolchain
def test_concurrent_first_imports_compile_once_and_later_ones_load_the_cache(tmp_path):
    """Two processes on a cold cache: one compiles, the other waits and loads; a third never compiles."""
    sources = _sources(tmp_path / "src")
    cache = tmp_path / "cache"
    first, second = _start(sources, cache), _start(sources, cache)
    results = [_finish(first), _finish(second)]
    for out, _ in results:
        assert out.startswith("LOADED:") and out.rstrip().endswith("[2.0, 2.0]"), out
    messages = [err for _, err in results if "compiling its C++ kernels" in err]
    assert len(messages) == 1, [err for _, err in results]
    assert " done (" in messages[0]
    # Nothing left behind but the build and its lock.
    entries = sorted(cache.iterdir())
    assert len(entries) == 2 and entries[0].is_dir() and entries[1].name == entries[0].name + ".lock"
    # A compiler that does not exist proves the third process does not try to build.
    out, err = _finish(_start(sources, cache, CXX="/nonexistent/c++"))
    assert out.startswith("LOADED:") and err == ""


@needs_toolchain
def test_failed_build_warns_once_logs_and_is_not_retried_until_asked(tmp_path):
    """A compile error: a RuntimeWarning with the log's path; later imports skip it; a retry rebuilds."""
    sources = _sources(tmp_path / "src", "#error torchgraph test: deliberately broken\n")
    cache = tmp_path / "cache"
    out, err = _finish(_start(sources, cache))
    assert out.startswith("UNAVAILABLE: compiling them failed") and "deliberately broken" in out, out
    log = pathlib.Path(out.split("output is in ")[1].split(". Run")[0])
    assert "deliberately broken" in log.read_text()
    out, err = _finish(_start(sources, cache))
    assert "failed before" in out and "compiling" not in err
    out, err = _finish(_start(sources, cache, "--retry"))
    assert "compiling its C++ kernels" in err and "compiling them failed" in out


def test_missing_compiler_is_one_clear_message_and_not_recorded(tmp_path, monkeypatch):
    """No compiler: a message that says what to install; nothing recorded, so installing one is enough."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv(_extension.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(_extension, "_source_dir", lambda: _sources(tmp_path / "src"))
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler was found .*apt-get install g\+\+.*"
                                            r"torchgraph build-kernels.*pure-PyTorch references"):
        loaded, reason, path = _extension._load_c_ops()
    assert not loaded and path is None and "no C++ compiler" in reason
    assert not any(tmp_path.rglob("FAILED"))


def test_missing_sources_say_to_reinstall(monkeypatch):
    """An installation without the kernel sources names the package to reinstall."""
    monkeypatch.setattr(_extension, "_source_dir", lambda: None)
    with pytest.raises(_extension.KernelsUnavailable, match="reinstall torchgraph-fx|Reinstall torchgraph-fx"):
        _extension.kernel_build()


def test_cache_key_follows_sources_and_cpu_capability(tmp_path, monkeypatch):
    """Editing a source or running on another CPU level gives another build folder (never a stale binary)."""
    monkeypatch.setenv(_extension.CACHE_ENV_VAR, str(tmp_path))
    sources = _sources(tmp_path / "src")
    monkeypatch.setattr(_extension, "_source_dir", lambda: sources)
    first = _extension.kernel_build(with_cuda=False).directory
    assert _extension.kernel_build(with_cuda=False).directory == first
    (sources / "cpu" / "vec_utils.h").write_text("// a header edit counts too\n")
    second = _extension.kernel_build(with_cuda=False).directory
    assert second != first and second.parent == tmp_path
    other = "AVX512" if torch.backends.cpu.get_cpu_capability() == "AVX2" else "AVX2"  # this machine's is first's
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    third = _extension.kernel_build(with_cuda=False)
    assert third.directory not in (first, second) and f"-{other.lower()}-" in third.directory.name
    if other == "AVX2":
        assert "-mavx2" in third.cflags and not any(f.startswith("-mavx512") for f in third.cflags)
    else:
        assert "-mavx512f" in third.cflags


def test_cuda_build_without_a_visible_gpu_names_the_architectures(monkeypatch):
    """No GPU and no TORCH_CUDA_ARCH_LIST: -gencode flags for torch's own architectures (no IndexError)."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90", "sm_100", "sm_90a", "compute_100"])
    assert _extension._cuda_arch_flags() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_100,code=sm_100",
    ]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _extension._cuda_arch_flags() == []  # torch reads the variable itself


def test_cuda_kernels_are_opt_in(monkeypatch):
    """Without TORCHGRAPH_USE_CUDA=1 the build is CPU-only, even with a CUDA torch."""
    monkeypatch.delenv(_extension.CUDA_ENV_VAR, raising=False)
    build = _extension.kernel_build()
    assert not build.with_cuda and not any(s.endswith(".cu") for s in build.sources)


def test_failed_cuda_build_falls_back_to_the_cpu_kernels(monkeypatch, tmp_path):
    """TORCHGRAPH_USE_CUDA=1 whose CUDA build fails: one warning, and the CPU-only build is used."""
    calls = []

    def build_kernels(with_cuda=None, **_):
        calls.append(with_cuda)
        if with_cuda is None:
            raise _extension.KernelsUnavailable("compiling them failed (nvcc: error: boom)")
        return tmp_path / "cpu.so"

    monkeypatch.delenv(_extension.DISABLE_ENV_VAR, raising=False)
    monkeypatch.setattr(_extension, "_wants_cuda", lambda: True)
    monkeypatch.setattr(_extension, "build_kernels", build_kernels)
    with pytest.warns(RuntimeWarning, match=r"CUDA kernels are not available: compiling them failed .*boom.*"
                                            r"CPU kernels are loaded"):
        assert _extension._load_c_ops() == (True, None, tmp_path / "cpu.so")
    assert calls == [None, False]


def test_cuda_toolkit_without_its_runtime_is_refused_before_compiling(monkeypatch, tmp_path):
    """A CUDA_HOME without lib64/libcudart.so (torch's guess from a wrapper nvcc on PATH) fails at once, with
    the fix, instead of after minutes of nvcc at the link (NOTE: [CUDA_HOME from a wrapper])."""
    import dataclasses
    import types

    build = dataclasses.replace(_extension.kernel_build(with_cuda=False), with_cuda=True)
    monkeypatch.setattr(_extension, "_cpp_extension", lambda: types.SimpleNamespace(CUDA_HOME=str(tmp_path)))
    with pytest.raises(_extension.KernelsUnavailable, match=r"has no lib64/libcudart.so .*Set CUDA_HOME"):
        _extension._check_toolchain(build)
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libcudart.so").touch()
    _extension._check_toolchain(build)  # the toolkit is complete: no complaint


def test_build_kernels_command_retries_a_failed_cuda_build(monkeypatch, tmp_path, capsys):
    """After the import fell back to the CPU kernels, `torchgraph build-kernels` forgets the failed CUDA build
    and has a fresh process compile it (NOTE: [Retrying the CUDA build]), or says why it could not."""
    import dataclasses

    from torchgraph import cli

    wanted = dataclasses.replace(_extension.kernel_build(with_cuda=False), with_cuda=True,
                                 description="torch x, AVX2, CPU + CUDA", directory=tmp_path / "cuda-build")
    wanted.directory.mkdir()
    failed = wanted.directory / "FAILED"
    children = []

    def child(argv, check):  # the fresh process: its import builds the library when it sees no failure
        children.append(argv)
        if not failed.exists():
            wanted.library.write_bytes(b"")

    monkeypatch.setattr(_extension, "kernel_build", lambda with_cuda=None: wanted)
    monkeypatch.setattr(_extension, "LIBRARY_PATH", tmp_path / "cpu" / "torchgraph_kernels.so")
    monkeypatch.setattr(subprocess, "run", child)
    failed.write_text("RuntimeError\n")
    cli._build_kernels()
    assert children == [[sys.executable, "-c", "import torchgraph"]] and not failed.exists()
    assert capsys.readouterr().out.strip().endswith(str(wanted.library))

    wanted.library.unlink()
    monkeypatch.setattr(subprocess, "run", lambda argv, check: failed.write_text("RuntimeError\n"))
    with pytest.raises(cli.CommandError, match="the CUDA kernels could not be built .*CPU kernels .* stay in use"):
        cli._build_kernels()


def test_build_kernels_command_reports_the_library():
    """`torchgraph build-kernels` (here `python -m torchgraph`) prints where the kernels are."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(_extension.DISABLE_ENV_VAR, None)
    result = subprocess.run([sys.executable, "-m", "torchgraph", "build-kernels"], env=env, capture_output=True,
                            text=True, timeout=900)
    if _has_toolchain():
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("torchgraph kernels (torch ") and "torchgraph_kernels.so" in result.stdout
    else:
        assert result.returncode == 1 and "was not found" in result.stderr


@pytest.mark.skipif(not _extension.HAS_C_OPS, reason="the kernels could not be built here")
def test_import_is_silent_once_built():
    """With the kernels cached, `import torchgraph` prints and warns nothing (warnings are errors here)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(_extension.DISABLE_ENV_VAR, None)
    code = "import torchgraph, torchgraph._extension as e; print(e.HAS_C_OPS)"
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.strip() == str(_extension.HAS_C_OPS)
