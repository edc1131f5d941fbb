"""Every docstring example runs (einops-style doctests) and the docs' code blocks run."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

MODULES = ["torchgraph"] + sorted(
    f"torchgraph.{m.name}" for m in pkgutil.iter_modules(importlib.import_module("torchgraph").__path__)
    if not m.name.startswith("_"))
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    """doctest of each public module's docstrings."""
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"


@pytest.mark.parametrize("page", ["docs/core.md"])
def test_python_blocks_in_docs_run(page):
    """The ```python blocks of the core docs page run top to bottom."""
    text = (ROOT / page).read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
    exec(compile(code, page, "exec"), {})


def test_readme_quick_start_runs():
    """The README's first ```python block (the quick start) runs."""
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    exec(compile(code, "README.md", "exec"), {})
