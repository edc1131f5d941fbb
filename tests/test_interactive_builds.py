"""A build that failed at an interactive prompt (sys.last_value keeps its traceback, so its values, alive).

NOTE: [End of a build] in torchgraph/builds.py: the next tg.Input starts a fresh build, so a dim
re-declared with other bounds is no conflict and the new model is the one a fresh session gives.
"""

import code
import sys

import pytest
import torch

from torchgraph import type_info


@pytest.fixture
def console():
    """A Python REPL in this process (it sets sys.last_value/last_traceback as `python -i` does)."""
    session = code.InteractiveConsole()
    errors: list[str] = []
    session.write = errors.append
    session.errors = errors
    session.run = lambda text: [session.push(line) for line in text.strip("\n").split("\n")]
    session.run("import gc, torch, torch.nn as nn, torchgraph as tg")
    yield session
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)


def test_next_input_after_a_failed_step_starts_a_fresh_build(console):
    """tg.Dim("seq", max=64) after a failed build that declared max=8: a new build, equal to a fresh one."""
    console.run('''
x = tg.Input(shape=(tg.Dim("seq", max=8), 4))
y = nn.Linear(5, 3)(x)
''')
    assert "Expected the last dim to be in_features=5" in "".join(console.errors)
    console.errors.clear()
    console.run('''
del x; _ = gc.collect()
a = tg.Input(shape=(tg.Dim("seq", max=64), 4))
model = tg.Model(a, nn.Linear(4, 2)(a))
''')
    assert console.errors == []
    model = console.locals["model"]
    assert model(torch.randn(2, 40, 4)).shape == (2, 40, 2)
    assert not type_info.building()  # tg.Model ended it; nothing is left of the failed build


def test_values_of_the_failed_build_stay_usable(console):
    """The user's own `x` from before the error joins the new model (values of a finished build do)."""
    console.run('''
x = tg.Input(shape=(4,))
y = nn.Linear(5, 3)(x)
w = tg.Input(shape=(4,))
model = tg.Model([x, w], nn.Linear(4, 3)(x) + w.sum(-1, keepdim=True))
''')
    assert "".join(console.errors).count("Traceback (most recent call last)") == 1  # the failed layer call only
    model = console.locals["model"]
    assert model(torch.randn(2, 4), torch.randn(2, 4)).shape == (2, 3)


def test_finfo_and_compile_work_while_the_failed_build_is_kept(console):
    """Before the next build, the failed one is still in progress: torch.finfo and torch.compile work."""
    console.run('''
x = tg.Input(shape=(4,))
y = nn.Linear(5, 3)(x)
''')
    console.errors.clear()
    console.run('''
big = torch.finfo(torch.float16).max
compiled = torch.compile(nn.Linear(4, 4), backend="eager")
out = compiled(torch.ones(2, 4))
''')
    assert [e for e in console.errors if "Error" in e] == []
    assert console.locals["big"] == 65504.0 and console.locals["out"].shape == (2, 4)
