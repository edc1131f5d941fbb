"""assert_round_trips(model, example_inputs): the "architecture as data" contract for one model.

A model either round-trips through everything that describes, stores and exports it, or fails at
``get_config`` with a clear message:

1. ``get_config`` is JSON; ``tg.Model.from_config`` rebuilds the same class, ``model.code`` and
   ``state_dict`` keys, and with the original's weights computes bit-identical outputs;
2. ``tg.save`` / ``tg.load`` give bit-identical outputs (eval mode, so Dropout and BatchNorm are
   deterministic);
3. ``tg.export_onnx`` with verification (onnxruntime against torch at two sizes of every dynamic dim).

Reusable by any test file: ``from roundtrip import assert_round_trips``.
"""

import json
import os
import tempfile

import torch

import torchgraph as tg
from torchgraph.layer_config import model_class


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return [out]


def _outputs(model, inputs):
    with torch.no_grad():
        if isinstance(inputs, dict):
            return _flatten(model(**inputs))
        if isinstance(inputs, (list, tuple)):
            return _flatten(model(*inputs))
        return _flatten(model(inputs))


def _assert_identical(got, expected, what: str) -> None:
    assert len(got) == len(expected), what
    for a, b in zip(got, expected):
        if isinstance(a, torch.Tensor):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), \
                f"{what}: max difference {(a.double() - b.double()).abs().max().item() if a.numel() else 0}"
        else:
            assert a == b, what


def assert_round_trips(model, example_inputs, *, onnx: bool = True, exporter: str = "dynamo",
                       verify_sizes: dict | None = None, folder: str | None = None):
    """Check the round trips of ``model`` (see the module docstring); return the get_config error when
    the model cannot be described (after checking that the message names what and how to fix it)."""
    try:
        config = model.get_config()
    except ValueError as error:
        text = str(error)
        assert "cannot" in text or "register" in text or "not" in text, text
        return error
    training = model.training
    model.eval()
    try:
        folder = folder or tempfile.mkdtemp(prefix="roundtrip_")
        expected = _outputs(model, example_inputs)

        rebuilt = tg.Model.from_config(json.loads(json.dumps(config)))
        assert model_class(rebuilt) is model_class(model), (model_class(rebuilt), model_class(model))
        assert rebuilt.code == model.code
        assert list(rebuilt.state_dict()) == list(model.state_dict())
        rebuilt.load_state_dict(model.state_dict())
        _assert_identical(_outputs(rebuilt.eval(), example_inputs), expected, "from_config")

        path = os.path.join(folder, "model.safetensors")
        tg.save(model, path)
        loaded = tg.load(path)
        assert model_class(loaded) is model_class(model) and loaded.code == model.code
        _assert_identical(_outputs(loaded, example_inputs), expected, "tg.save/tg.load")

        if onnx:
            tg.export_onnx(model, os.path.join(folder, "model.onnx"), exporter=exporter,
                           verify_sizes=verify_sizes)
    finally:
        model.train(training)
    return None
