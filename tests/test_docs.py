"""Every docstring example runs (doctests), and every code block of README.md and docs/*.md runs on
its own, as pasted into a fresh interpreter, and prints what the page says it prints.

What a page shows as output, the test compares (doctest's ``...`` wildcard, whitespace-insensitive):

* ``statement  # -> text``: the statement's printed output, or the repr of an expression's value.
  Comment lines right below continue ``text``.
* a ```` ```text```` block right after a ```` ```python```` block: the end of what the block prints.
* a transcript (``>>>`` lines, in a plain ```` ``` ```` block): each line's output or raised error
  (``ErrorType: message``).
"""

import ast
import contextlib
import doctest
import importlib
import io
import pathlib
import pkgutil
import re
import tokenize

import pytest

from torchgraph import layer_config

MODULES = ["torchgraph"] + sorted(  # every public module, in subpackages too (passes, fused, training, ...)
    m.name for m in pkgutil.walk_packages(importlib.import_module("torchgraph").__path__, "torchgraph.")
    if not any(part.startswith("_") for part in m.name.split(".")))
ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", flags=re.S | re.M)
_OUTPUT_MARK = "# ->"
_CHECKER = doctest.OutputChecker()
_OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _blocks():
    """(page, line, kind, code, shown output) of every python block and every >>> transcript."""
    found = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        fences = list(_FENCE.finditer(text))
        for i, fence in enumerate(fences):
            lang, body = fence.group(1), fence.group(2)
            line = text.count("\n", 0, fence.start()) + 1
            if lang == "python":
                after = fences[i + 1] if i + 1 < len(fences) else None
                shown = None
                if after is not None and after.group(1) == "text":
                    if not text[fence.end():after.start()].strip():  # right below: the block's output
                        shown = after.group(2)
                found.append(pytest.param(page, line, "python", body, shown, id=f"{page}:{line}"))
            elif lang == "" and body.lstrip().startswith(">>>"):
                found.append(pytest.param(page, line, "transcript", body, None, id=f"{page}:{line}"))
    return found


def _output_comments(code: str) -> dict[int, str]:
    """Line number of each ``# ->`` comment -> the text it shows (with its continuation lines)."""
    lines = code.splitlines()
    shown = {}
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        if token.type == tokenize.COMMENT and token.string.startswith(_OUTPUT_MARK):
            row = token.start[0]
            parts = [token.string[len(_OUTPUT_MARK):]]
            for following in lines[row:]:
                if not following.lstrip().startswith("#"):
                    break
                parts.append(following.lstrip()[1:])
            shown[row] = " ".join(parts)
    return shown


def _run_statement(statement: ast.stmt, namespace: dict, where: str) -> tuple[str, str]:
    """Runs one top-level statement: (what it printed, what it shows: that, else an expression's repr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if isinstance(statement, ast.Expr):
            value = eval(compile(ast.Expression(statement.value), where, "eval"), namespace)
        else:
            exec(compile(ast.Module([statement], type_ignores=[]), where, "exec"), namespace)
            value = None
    printed = out.getvalue()
    return printed, printed if printed or value is None else repr(value)


def _matches(shown: str, actual: str) -> bool:
    return _CHECKER.check_output(shown.strip() + "\n", actual.strip() + "\n", _OPTIONS)


def _run_python_block(page, line, code, shown_text):
    where = f"{page}:{line}"
    namespace = {"__name__": "__main__"}
    shown = _output_comments(code)
    printed = []
    for statement in ast.parse(code).body:
        output, actual = _run_statement(statement, namespace, where)
        printed.append(output)
        if statement.end_lineno in shown:
            want = shown[statement.end_lineno]
            assert _matches(want, actual), (f"{where}: line {line + statement.end_lineno} shows\n  "
                                            f"{want.strip()}\nbut printed\n  {actual.strip()}")
    if shown_text is not None:
        actual = "".join(printed)
        assert _matches("..." + shown_text, actual), (
            f"{where}: the ```text block after it shows\n{shown_text}\nbut the block printed\n{actual}")


def _run_transcript(page, line, body):
    """A >>> transcript: each input (with its ... continuation lines) and the output shown below it."""
    namespace = {"__name__": "__main__"}
    examples = doctest.DocTestParser().get_examples(body)
    assert examples, f"{page}:{line}: no >>> examples found"
    for example in examples:
        tree = ast.parse(example.source)
        try:
            actual = "".join(_run_statement(s, namespace, f"{page}:{line}")[1] for s in tree.body)
        except Exception as error:  # noqa: BLE001 - a transcript shows errors as `Type: message`
            actual = f"{type(error).__name__}: {error}"
        if example.want:
            assert _matches(example.want, actual), (
                f"{page}:{line}: `{example.source.strip()}` shows\n{example.want}\nbut gave\n{actual}")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    """doctest of each public module's docstrings."""
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"


@pytest.mark.parametrize("page, line, kind, code, shown", _blocks())
def test_docs_block_runs_standalone_and_prints_what_it_shows(page, line, kind, code, shown, tmp_path,
                                                               monkeypatch):
    """A docs code block runs in a fresh namespace (its own imports and data), files land in a temp dir."""
    monkeypatch.chdir(tmp_path)
    # Blocks register example layers (`Scale`): keep them out of the other tests' registry.
    monkeypatch.setattr(layer_config, "_REGISTRY", dict(layer_config._REGISTRY))
    monkeypatch.setattr(layer_config, "_KEYS", dict(layer_config._KEYS))
    if kind == "python":
        _run_python_block(page, line, code, shown)
    else:
        _run_transcript(page, line, code)


def test_every_page_is_checked():
    """The pages exist and hold blocks (a renamed folder must not silently empty the test)."""
    pages = {param.values[0] for param in _blocks()}
    assert {"README.md", "docs/core.md", "docs/training.md"} <= pages
