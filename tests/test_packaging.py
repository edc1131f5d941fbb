"""What `pip install torchgraph-fx` gets: the distribution's name and metadata, and an sdist and a
wheel (built the way `python -m build` builds them: the wheel from the sdist) that carry every
kernel source and no binary."""

import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import torchgraph

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIST_NAME = "torchgraph-fx"
KERNEL_SOURCES = sorted(p.relative_to(ROOT / "csrc").as_posix() for p in (ROOT / "csrc").rglob("*")
                        if p.suffix in (".cpp", ".h", ".cu", ".cuh"))
# `pip install torchgraph...` that is not `torchgraph-fx`: the PyPI name `torchgraph` is someone else's.
_WRONG_HINT = re.compile(r"pip install\s+['\"]?torchgraph(?![-\w])")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_install_hints_name_the_distribution():
    """Every `pip install` hint in the code and the docs installs torchgraph-fx, not PyPI's torchgraph."""
    files = [*(ROOT / "torchgraph").rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    wrong = [f"{path.relative_to(ROOT)}:{text[:match.start()].count(chr(10)) + 1}"
             for path in files for text in [path.read_text()] for match in _WRONG_HINT.finditer(text)]
    assert not wrong, f"install hints naming PyPI's `torchgraph` (use {DIST_NAME}): {wrong}"
    assert _pyproject()["project"]["name"] == DIST_NAME


def test_metadata_states_license_and_an_uncapped_torch():
    """SPDX license with its file, classifiers, and a torch requirement that never downgrades torch."""
    project = _pyproject()["project"]
    assert project["license"] == "BSD-3-Clause" and (ROOT / project["license-files"][0]).is_file()
    assert any(c.startswith("Programming Language :: Python :: 3") for c in project["classifiers"])
    torch_requirement = next(r for r in project["dependencies"] if r.startswith("torch"))
    assert ">=" in torch_requirement and "<" not in torch_requirement.replace("<=", "")
    assert "torch" not in " ".join(_pyproject()["build-system"]["requires"])  # nothing compiled at install


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """sdist and wheel of a copy of the checkout, with `python -m build --no-isolation`."""
    pytest.importorskip("build", reason="requirements-dev.txt installs `build`")
    tmp = tmp_path_factory.mktemp("dist")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "*.so"))
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"),
                             str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    sdist, = (tmp / "dist").glob("*.tar.gz")
    wheel, = (tmp / "dist").glob("*.whl")
    return sdist, wheel, result.stdout + result.stderr


def test_wheel_is_pure_python_and_carries_every_kernel_source(built):
    """py3-none-any, no compiled file, csrc/ as torchgraph/_csrc/, the CLI, and the metadata."""
    _, wheel, _ = built
    version = torchgraph.__version__
    assert wheel.name == f"torchgraph_fx-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"torchgraph_fx-{version}.dist-info/METADATA").decode()
        entry_points = archive.read(f"torchgraph_fx-{version}.dist-info/entry_points.txt").decode()
    assert {f"torchgraph/_csrc/{s}" for s in KERNEL_SOURCES} <= names
    assert "torchgraph/_csrc/common.h" in names and "torchgraph/_csrc/cpu/vec_utils.h" in names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".dll", ".o"))]
    assert "License-Expression: BSD-3-Clause" in metadata and "Requires-Dist: torch>=2.11" in metadata
    assert "torchgraph = torchgraph.cli:main" in entry_points


def test_sdist_carries_what_the_wheel_is_built_from(built):
    """The sdist holds csrc/ (headers and CUDA files included), the license and the tests."""
    sdist, _, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {f"csrc/{s}" for s in KERNEL_SOURCES} <= names
    assert {"LICENSE", "setup.py", "pyproject.toml", "tests/test_ops.py"} <= names
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def test_build_has_no_deprecation_warning(built):
    """No setuptools deprecation or configuration warning (license table, package data, ...)."""
    *_, log = built
    found = re.findall(r".*(?:Deprecat|SetuptoolsWarning|UserWarning|InformationOnly).*", log)
    assert not found, "\n".join(found)
