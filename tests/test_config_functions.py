"""What recording accepts, a config can store: functions, tensor methods, and what untrusted configs
may not do (uninitialised memory, superlinear operand counts)."""

import inspect
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from torchgraph import config_functions
from torchgraph.config_functions import (METHOD_DENYLIST, check_method_name, function_name,
                                         resolve_function)


class _Reached(Exception):
    pass


class _Probe(torch.Tensor):
    """A tensor subclass that reports which function torch hands to __torch_function__ (a 0-d int64
    one stands for a SymbolicInt: a dynamic size given to a factory)."""

    @staticmethod
    def __new__(cls, shape=(2, 2), dtype=torch.float32):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device="meta")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise _Reached(func)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("not reached through __torch_function__")


_CALLS = (("t",), (1,), ("t", 1), ("t", "t"), (["t", "t"],), ((2, 3), "t"), ("i",), (("i", 2),),
          (("i", 2), (2, 1)), (2, ("i", 2)), ("i", "i"))


def _dispatches_itself(fn) -> bool:
    """Whether calling ``fn`` on probe tensors (or a probe size) reaches __torch_function__ with ``fn``
    itself: what torchgraph records for a symbolic tensor."""
    probes = {"t": _Probe(), "i": _Probe((), torch.int64)}

    def arg(a):
        if isinstance(a, (list, tuple)):
            return type(a)(arg(b) for b in a)
        return probes.get(a, a) if isinstance(a, str) else a

    for pattern in _CALLS:
        args = [arg(a) for a in pattern]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn(*args)
        except _Reached as reached:
            return reached.args[0] is fn
        except Exception:  # noqa: BLE001 - the wrong arguments for this function: try the next pattern
            continue
    return False


def _public_functions():
    for ns_name, ns in config_functions._NAMESPACES:
        for attr in sorted(dir(ns)):
            obj = getattr(ns, attr, None)
            if attr.startswith("_") or obj is None or not callable(obj) or inspect.isclass(obj) or \
                    inspect.ismodule(obj):
                continue
            yield f"{ns_name}.{attr}", obj


def test_every_recordable_function_is_storable():
    """Walk torch, torch.nn.functional, torch.linalg, torch.fft and torch.special: every function that
    records on a symbolic tensor has a config name that resolves back to it (F.hardswish was missing)."""
    reached, missing = [], []
    for name, fn in _public_functions():
        if not _dispatches_itself(fn):
            continue
        reached.append(name)
        try:
            stored = function_name(fn, "walk")
        except ValueError:
            missing.append(name)
            continue
        assert resolve_function(stored, "walk") is fn, name
    assert not missing, f"recorded but not storable: {missing}"
    assert len(reached) > 600  # the walk really reached the surface (678 functions with torch 2.13)
    unlisted = [f"{ns}.{n}" for ns, names in config_functions._RECORDED_BUT_UNLISTED.items() for n in names]
    stale = [n for n in unlisted if n not in reached and n.rpartition(".")[2] in dir(
        dict(config_functions._NAMESPACES)[n.rpartition(".")[0]])]
    assert not stale, f"listed as recorded, but they do not dispatch: {stale}"


def test_every_recordable_tensor_method_is_storable_or_refused_up_front():
    """Tensor methods that record are allowed in configs, except a short denylist whose members
    either fail to record or fail get_config with a message naming them."""
    probe = _Probe()
    refused = []
    for name in sorted(dir(torch.Tensor)):
        method = getattr(torch.Tensor, name, None)
        if name.startswith("_") or not callable(method):
            continue
        try:
            method(probe)
        except _Reached:
            pass
        except Exception:  # noqa: BLE001 - wrong arguments: this walk only needs the dispatch
            pass
        if name in METHOD_DENYLIST:
            refused.append(name)
            with pytest.raises(ValueError, match="not an allowed tensor method"):
                check_method_name(name, "walk")
        else:
            assert check_method_name(name, "walk") == name
    assert set(refused) == {n for n in METHOD_DENYLIST if callable(getattr(torch.Tensor, n, None))}
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
