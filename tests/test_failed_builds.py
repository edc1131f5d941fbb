"""A failed build leaves nothing behind (torchgraph/builds.py, NOTE: [End of a build]).

Each failed build of the battery (a shape mismatch in a layer call, user code raising inside a forward
or between layers, a failing tg.Model, a failing tg.from_module, a tg.Input never turned into a model,
a tg.Input with a bad shape, a refused operation on a finished model's value) must leave the process as
it found it once its values are gone, and the next build must give exactly the model a fresh process
gives: same code, same layer names, same probe sizes.
"""

import gc
import json
import os
import pathlib
import random
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.modules.module as module_hooks
from community_models.drop_path import DropPath
from community_models.hf import tiny_bert

import torchgraph as tg
from torchgraph import naming, returned_inputs, type_info
from torchgraph.scope_replay import STATE
from torchgraph.untrusted import guarded

ROOT = pathlib.Path(__file__).resolve().parent.parent


def collect_garbage() -> None:
    """Collect until nothing is left: a finalizer run by one collection may free more for the next."""
    while gc.collect():
        pass


def process_state() -> dict:
    """What a build may change in the process, as plain comparable values (garbage collected first)."""
    collect_garbage()
    function_modes = [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]
    return {
        "torch function modes": [type(m).__name__ for m in function_modes],
        "torch dispatch modes": torch._C._len_torch_dispatch_stack(),
        "torch function enabled": torch._C._is_torch_function_enabled(),
        "torch module class": type(torch).__name__,
        "torch.finfo is torch's": torch.finfo is type_info._REAL["finfo"],
        "torch.iinfo is torch's": torch.iinfo is type_info._REAL["iinfo"],
        "build hold": (type_info.building(), type_info._COUNT),
        "global module hooks": (len(module_hooks._global_forward_hooks),
                                len(getattr(module_hooks, "_global_forward_hooks_with_kwargs", {})),
                                len(module_hooks._global_forward_pre_hooks),
                                len(module_hooks._global_backward_hooks)),
        "returned-inputs hook": returned_inputs._WATCH is not None,
        "open module scopes": (len(STATE.scopes), STATE.run is not None),
        "torch rng": torch.get_rng_state().tolist(),
        "numpy rng": repr(np.random.get_state()),
        "python rng": repr(random.getstate()),
        "grad mode": (torch.is_grad_enabled(), torch.is_inference_mode_enabled()),
        "default dtype": torch.get_default_dtype(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "trace and profile": (sys.gettrace(), sys.getprofile(), threading._trace_hook, threading._profile_hook),
        "warnings filters": list(warnings.filters),
        "build-local settings": (getattr(naming._FIXED, "paths", None), returned_inputs._RECORDING.from_module,
                                 guarded()),
        "layer and tensor names": (len(naming._USER_NAMES), len(naming._GIVEN_NAMES), len(naming._TENSOR_NAMES),
                                   len(naming._VARIABLE_NAMES)),
    }


def _input(shape, **kwargs):
    """A helper making tg.Inputs, as user code often has: every Input it makes comes from one line."""
    return tg.Input(shape=shape, **kwargs)


class _Block(nn.Module):
    """A residual block with a drop path (which returns its input in eval mode) and an HF-style mask."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop_path = DropPath(0.1).eval()

    def forward(self, x, mask):
        h = self.fc(x).masked_fill(mask[..., None, None] == 0, torch.finfo(x.dtype).min)
        return x + self.drop_path(h.softmax(dim=1))


torch.manual_seed(0)
_BLOCK = _Block()


def reference_build():
    """The same hand-written build each time: dims, layers, a drop path, torch.finfo at the top level."""
    x = _input(("seq", None, 8))
    mask = _input(("seq",), dtype=torch.long)
    h = _BLOCK(x, mask)
    h = h.masked_fill(mask[..., None, None] == 0, torch.finfo(h.dtype).min)
    return tg.Model([x, mask], nn.Identity()(h) * 2)


def describe(model) -> dict:
    """What must not depend on process history: the code, the layer names, the inputs' probe sizes."""
    return {"code": model.code,
            "layers": [name for name, _ in model.named_children()],
            "probes": [[list(d.probes) if hasattr(d, "probes") else d for d in x._tg_value.dims]
                       for x in model.inputs]}


class _Raises(nn.Module):
    """User code raising inside a forward, after operations on its input and a tensor made from sizes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)  # in train mode: the shadow runs update its running statistics

    def forward(self, x):
        h = self.bn(self.fc(x).transpose(1, 2)).transpose(1, 2) + torch.arange(4.0)
        if h.shape[-1] == 4:
            raise RuntimeError("a bug in the user's forward")
        return h


_LINEAR_4_4 = nn.Linear(4, 4)
_LINEAR_5_3 = nn.Linear(5, 3)
_RAISES = _Raises()


# The failing builds make their tg.Inputs with a dynamic dim through the same helper as
# reference_build: a failed build that counted its Inputs into the next one would shift its probe sizes.
def _shape_mismatch():
    x = _input((None, 4))
    _LINEAR_5_3(_LINEAR_4_4(x))


def _error_in_forward():
    x = _input((None, 4))
    _RAISES(x)


def _error_between_layers():
    x = _input((None, 4))
    h = _LINEAR_4_4(x)
    if h.shape[-1] == 4:
        raise RuntimeError("a bug in the user's building code")


def _disconnected_model():
    x, y = _input((None, 4)), _input((None, 4))
    tg.Model(x, _LINEAR_4_4(y))


def _bad_outputs():
    x = _input((None, 4))
    tg.Model(x, [_LINEAR_4_4(x), "not a tensor"])


def _from_module_fails():
    tg.from_module(_RAISES, _input((None, 4)))


def _bad_input_shape():
    _input((None, -1))


def _refused_use_of_a_finished_value():
    x = _input((None, 4))
    h = nn.ReLU()(x)  # a layer made here (and no parameters to initialize): its given name goes with it
    tg.Model(x, h)
    h.item()


FAILED_BUILDS = {
    "shape mismatch": (_shape_mismatch, tg.GraphBuildError),
    "error in a forward": (_error_in_forward, tg.GraphBuildError),
    "error between layers": (_error_between_layers, RuntimeError),
    "disconnected model": (_disconnected_model, tg.GraphBuildError),
    "bad outputs": (_bad_outputs, tg.GraphBuildError),
    "from_module fails": (_from_module_fails, tg.GraphBuildError),
    "bad input shape": (_bad_input_shape, tg.GraphBuildError),
    "refused use of a finished value": (_refused_use_of_a_finished_value, tg.GraphBuildError),
}


def _abandoned_input():
    x = _input((None, 4))
    _LINEAR_4_4(x)
    return x


def buffer_values(module: nn.Module) -> dict:
    """``module``'s buffers (BatchNorm's running statistics and counter) as plain lists."""
    return {name: b.tolist() for name, b in module.named_buffers()}


def fail(build, error) -> None:
    """Run a build that must fail; nothing of it (its exception, its traceback's frames) is kept."""
    try:
        build()
    except error:
        pass
    else:
        raise AssertionError(f"{build.__name__} did not fail")
    collect_garbage()


# What a thread that is not building has, whatever it built before.
NOT_BUILDING = {"torch function modes": [], "torch dispatch modes": 0, "torch module class": "module",
                "torch.finfo is torch's": True, "torch.iinfo is torch's": True, "build hold": (False, 0),
                "global module hooks": (0, 0, 0, 0), "returned-inputs hook": False, "open module scopes": (0, False),
                "build-local settings": (None, False, False)}


def assert_unchanged(before: dict) -> None:
    """The process state is ``before``, and that of a thread that is not building."""
    after = process_state()
    # Names live in weak dictionaries: a build may release a module an earlier test left in a cache
    # (fewer names, not a leak); only names the failed build added would be one.
    names = "layer and tensor names"
    assert all(a <= b for a, b in zip(after[names], before[names])), (before[names], after[names])
    assert {k: v for k, v in after.items() if k != names and before[k] != v} == {}
    assert {k: after[k] for k in NOT_BUILDING if after[k] != NOT_BUILDING[k]} == {}


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """Imports made by the first build (sympy adds a warnings filter when imported) are not leaks."""
    reference_build()
    collect_garbage()


@pytest.mark.parametrize("case", FAILED_BUILDS)
def test_a_failed_build_leaves_the_process_as_it_was(case):
    """After the failed build, every piece of process state is what it was before."""
    buffers = buffer_values(_RAISES)
    before = process_state()
    fail(*FAILED_BUILDS[case])
    assert_unchanged(before)
    assert buffer_values(_RAISES) == buffers


def test_an_abandoned_input_leaves_nothing_once_collected():
    """A tg.Input never turned into a model holds the build only while it lives."""
    before = process_state()
    x = _abandoned_input()
    assert type_info.building() and torch.finfo is not type_info._REAL["finfo"]  # its build is in progress
    del x
    assert_unchanged(before)


def test_a_build_continues_after_a_caught_layer_error():
    """Catching a layer's GraphBuildError and going on builds the model, with its drop path kept as a layer."""
    x = _input((8,))
    try:
        _LINEAR_5_3(x)
    except tg.GraphBuildError:
        pass
    gc.collect()
    drop = DropPath(0.5).eval()
    model = tg.Model(x, drop(x) + x)
    assert "drop_path" in [name for name, _ in model.named_children()]
    model.train()
    torch.manual_seed(0)
    out = model(torch.ones(64, 8))
    assert (out == 1).any() and (out == 3).any()  # in train mode the drop path drops some rows, as eager does


@pytest.mark.parametrize("case", [*FAILED_BUILDS, "abandoned input"])
def test_the_next_build_is_the_same_whatever_failed_before(case):
    """Two identical builds in a row give the same code, layer names and probe sizes around any failure."""
    first = describe(reference_build())
    if case == "abandoned input":
        _abandoned_input()
        gc.collect()
    else:
        fail(*FAILED_BUILDS[case])
    assert describe(reference_build()) == first


def test_builds_after_failures_match_a_fresh_process():
    """After every failed build of the battery, the reference build is the one a fresh process makes."""
    for build, error in FAILED_BUILDS.values():
        fail(build, error)
    _abandoned_input()
    gc.collect()
    here = describe(reference_build())
    code = "import json, test_failed_builds as t; print(json.dumps(t.describe(t.reference_build())))"
    path = os.pathsep.join([str(pathlib.Path(tg.__file__).parent.parent), str(ROOT / "tests")])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(here))


def test_torch_compile_of_finfo_code_works_after_failed_builds():
    """torch.compile of a function calling torch.finfo (as HuggingFace models do) compiles after failures."""
    for build, error in FAILED_BUILDS.values():
        fail(build, error)
    _abandoned_input()
    gc.collect()

    def masked(t):
        return t.masked_fill(t > 0, torch.finfo(t.dtype).min)

    t = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    compiled = torch.compile(masked, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(t), masked(t), rtol=0, atol=0)


def test_torch_compile_of_finfo_code_works_during_a_build():
    """A build in progress (a notebook's tg.Input still in a variable) does not break torch.compile of
    code calling torch.finfo in that thread: torch._dynamo's guards see torch's own finfo."""
    x = _input((None, 4))

    def masked(t):
        return t.masked_fill(t > 0, torch.finfo(t.dtype).min)

    t = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    assert type_info.building()
    compiled = torch.compile(masked, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(t), masked(t), rtol=0, atol=0)
    model = tg.Model(x, masked(x))  # and the build still records torch.finfo(x.dtype)
    assert "finfo_value" in model.code


def test_finfo_in_model_code_of_a_python_c_script_is_recorded():
    """Code run with ``python -c`` is also ``<string>``: a forward defined there still records torch.finfo
    (only a string that torch._dynamo evaluates counts as torch's)."""
    code = ("import torch, torch.nn as nn, torchgraph as tg\n"
            "class M(nn.Module):\n"
            "    def forward(self, x):\n"
            "        return x.masked_fill(x > 0, torch.finfo(x.dtype).min)\n"
            "assert 'finfo_value' in tg.from_module(M(), (4,)).code\n"
            "x = tg.Input(shape=(4,))\n"
            "assert 'finfo_value' in tg.Model(x, M()(x) + torch.finfo(x.dtype).tiny).code\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(pathlib.Path(tg.__file__).parent.parent)})
    assert result.returncode == 0, result.stderr[-2000:]


def _bert():
    """A random-init transformers BERT (eager attention: masks from torch.finfo(dtype).min) and a call of it
    on a batch with padding: ``run(bert)`` gives the last hidden state."""
    torch.manual_seed(0)
    bert = tiny_bert(attn_implementation="eager").eval()
    ids = torch.randint(0, 512, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0

    def run(model):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using `torch.compile\\(module\\)` when there are global hooks")
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    return bert, run


def test_torch_compile_of_a_huggingface_model_during_a_build():
    """transformers builds its masks with torch.finfo(dtype).min: a random-init BERT compiles (fullgraph)
    and gives eager's outputs while the thread has a build in progress."""
    bert, run = _bert()
    expected = run(bert)
    x = _input((None, 4))
    assert type_info.building()
    assert torch.equal(run(torch.compile(bert, backend="eager", fullgraph=True)), expected)
    del x


def test_an_eager_huggingface_model_runs_as_before_failed_builds():
    """A random-init transformers BERT gives bit-identical outputs before and after the failures."""
    bert, run = _bert()
    before = run(bert)
    for build, error in FAILED_BUILDS.values():
        fail(build, error)
    assert torch.equal(run(bert), before)
    assert torch.finfo is type_info._REAL["finfo"]


def test_a_failed_replay_kept_by_its_traceback_is_closed_by_the_next_build():
    """A forward that raises in its recorded call (not in its shadow runs): while the exception's traceback
    keeps the call's frame (sys.last_traceback in a REPL), the next build entry closes its scope."""

    class ThirdCallFails(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.bn = nn.BatchNorm1d(4)  # in train mode: its running statistics change in every run

        def forward(self, x):
            h = self.bn(x) * 2 + torch.arange(4.0)  # a tensor made from sizes: replayed under a ScopeMode
            self.calls += 1
            if self.calls == 3:  # shadow runs 1 and 2 pass, the original call raises
                raise RuntimeError("third call")
            return h

    layer = ThirdCallFails()
    buffers = buffer_values(layer)
    before = process_state()
    x = _input((4,))
    with pytest.raises(RuntimeError, match="third call") as kept:
        layer(x)
    del x
    _LINEAR_4_4(_input((4,)))  # the next build step
    gc.collect()
    assert process_state()["torch function modes"] == before["torch function modes"]
    assert process_state()["open module scopes"] == before["open module scopes"]
    assert buffer_values(layer) == buffers  # what the build changed is put back
    del kept
    assert_unchanged(before)
