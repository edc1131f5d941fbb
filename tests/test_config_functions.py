"""What recording accepts, a config can store: functions, tensor methods, and what untrusted configs
may not do (uninitialised memory, superlinear operand counts)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import config_functions
from torchgraph.config_functions import METHOD_DENYLIST


# NOTE: the walks call every public torch function on probe tensors; some of them set global state
# (torch.set_printoptions(probe) makes every later tensor repr fail). So they run in a subprocess.
_WALK = r"""
import inspect, json, sys, warnings
import torch
from torchgraph import config_functions
from torchgraph.config_functions import METHOD_DENYLIST, check_method_name, function_name, resolve_function


class Reached(Exception):
    pass


class Probe(torch.Tensor):
    @staticmethod
    def __new__(cls, shape=(2, 2), dtype=torch.float32):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device="meta")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise Reached(func)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("not reached through __torch_function__")


# Argument patterns: "t" a probe tensor, "i" a 0-d int64 probe (a SymbolicInt: a dynamic size).
CALLS = (("t",), (1,), ("t", 1), ("t", "t"), (["t", "t"],), ((2, 3), "t"), ("i",), (("i", 2),),
         (("i", 2), (2, 1)), (2, ("i", 2)), ("i", "i"))


def dispatches_itself(fn):
    probes = {"t": Probe(), "i": Probe((), torch.int64)}

    def arg(a):
        if isinstance(a, (list, tuple)):
            return type(a)(arg(b) for b in a)
        return probes.get(a, a) if isinstance(a, str) else a

    for pattern in CALLS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn(*[arg(a) for a in pattern])
        except Reached as reached:
            return reached.args[0] is fn
        except Exception:
            continue
    return False


reached, missing, wrong = [], [], []
for ns_name, ns in config_functions._NAMESPACES:
    for attr in sorted(dir(ns)):
        fn = getattr(ns, attr, None)
        if attr.startswith("_") or fn is None or not callable(fn) or inspect.isclass(fn) or inspect.ismodule(fn):
            continue
        if not dispatches_itself(fn):
            continue
        reached.append(f"{ns_name}.{attr}")
        try:
            if resolve_function(function_name(fn, "walk"), "walk") is not fn:
                wrong.append(f"{ns_name}.{attr}")
        except ValueError:
            missing.append(f"{ns_name}.{attr}")

methods_allowed, methods_refused = [], []
for name in sorted(dir(torch.Tensor)):
    if name.startswith("_") or not callable(getattr(torch.Tensor, name, None)):
        continue
    try:
        check_method_name(name, "walk")
        methods_allowed.append(name)
    except ValueError:
        methods_refused.append(name)
json.dump({"reached": reached, "missing": missing, "wrong": wrong, "methods_refused": methods_refused,
           "methods_allowed": methods_allowed}, sys.stdout)
"""


@pytest.fixture(scope="module")
def walk():
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", _WALK], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_every_recordable_function_is_storable(walk):
    """Walk torch, torch.nn.functional, torch.linalg, torch.fft and torch.special: every function that
    records on a symbolic tensor has a config name that resolves back to it (F.hardswish was missing)."""
    assert not walk["missing"], f"recorded but not storable: {walk['missing']}"
    assert not walk["wrong"], walk["wrong"]
    assert len(walk["reached"]) > 600  # the walk really reached the surface (678 functions with torch 2.13)
    unlisted = [f"{ns}.{n}" for ns, names in config_functions._RECORDED_BUT_UNLISTED.items() for n in names
                if callable(getattr(dict(config_functions._NAMESPACES)[ns], n, None))]
    stale = [n for n in unlisted if n not in walk["reached"]]
    assert not stale, f"listed as recorded, but they do not dispatch: {stale}"


def test_every_recordable_tensor_method_is_storable_or_refused_up_front(walk):
    """Tensor methods are allowed in configs, except a short denylist (they need data, hand out memory
    or register Python code): exactly those are refused, with a message naming them."""
    denied = {n for n in METHOD_DENYLIST if callable(getattr(torch.Tensor, n, None))}
    assert set(walk["methods_refused"]) == denied
    assert "view" in walk["methods_allowed"] and "expand" in walk["methods_allowed"]
    x = tg.Input(shape=(4,))
    with pytest.raises(ValueError, match="'storage' is not an allowed tensor method"):
        _config_of_method(x, "storage")


def _config_of_method(x, name):
    config = tg.Model(x, x.relu()).get_config()
    next(n for n in config["nodes"] if n["target"] == "relu")["target"] = name
    return tg.Model.from_config(config)


def _se_block_model():
    """MobileNetV3's squeeze-excitation block, written with F.hardswish and F.hardsigmoid."""
    x = tg.Input(shape=(8, 6, 6), name="image")
    h = F.hardswish(nn.Conv2d(8, 16, 1)(x))
    s = h.mean(dim=(2, 3), keepdim=True)
    s = F.hardsigmoid(nn.Conv2d(4, 16, 1)(F.relu(nn.Conv2d(16, 4, 1)(s))))
    return tg.Model(x, h * s, name="SEBlock").eval()


def test_hardswish_and_hardsigmoid_models_save_and_load(tmp_path):
    """A MobileNetV3 SE block records, stores and reloads with bit-identical outputs."""
    model = _se_block_model()
    assert tg.Model.from_config(model.get_config()).code == model.code
    tg.save(model, tmp_path / "se.safetensors")
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(tg.load(tmp_path / "se.safetensors")(x), model(x))


def test_uninitialised_memory_never_comes_back_from_a_config(tmp_path):
    """torch.empty_like / x.new_empty rebuild as zeros_like / new_zeros; functions without a
    zero-filling twin are refused by get_config, before anything is written."""
    x = tg.Input(shape=(4,))
    model = tg.Model(x, x + torch.empty_like(x) + x.new_empty((4,)))
    rebuilt = tg.Model.from_config(model.get_config())
    assert "zeros_like" in rebuilt.code and "new_zeros" in rebuilt.code and "empty" not in rebuilt.code
    x0 = torch.randn(3, 4)
    assert torch.equal(rebuilt(x0), x0)
    for make in (lambda t: t + torch.empty_strided((t.shape[0], 4), (4, 1)),
                 lambda t: t + t.new_empty_strided((4,), (1,))):
        with pytest.raises(ValueError, match="uninitialised memory"):
            tg.save(tg.Model(x, make(x)), tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_superlinear_functions_take_a_bounded_number_of_operands():
    """torch.linalg.multi_dot orders its product in cubic time: a config gives it at most 64 operands."""
    x = tg.Input(shape=(3, 3))
    h = x[0]
    config = tg.Model(x, torch.linalg.multi_dot([h, h, h])).get_config()
    node = next(n for n in config["nodes"] if n["target"] == "torch.linalg.multi_dot")
    node["args"][0] = [node["args"][0][0]] * 65
    with pytest.raises(ValueError, match="at most 64"):
        tg.Model.from_config(config)
