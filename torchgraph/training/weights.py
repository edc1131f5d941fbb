"""``model.save_weights`` / ``model.load_weights``: weights alone, as a safetensors file.

``load_weights`` reads any of torchgraph's three files: plain weights (``save_weights``,
``ModelCheckpoint(save_weights_only=True)``), a whole model (``tg.save``, ``model.save``) or a
training checkpoint (``BackupAndRestore``, ``save_checkpoint``); it takes only the weights.
"""

from __future__ import annotations

import os

from ..saving import require_safetensors

__all__ = ["save_weights", "load_weights", "check_fits"]


def check_fits(model, shapes: dict, path: str, who: str) -> None:
    """Raise before anything is copied when tensors of ``shapes`` (key -> shape) do not fit ``model``.

    (``load_state_dict`` copies what fits before it reports what does not.) Keys missing from the
    file are fine when they share their tensor with a key that is there (tied weights stored once).
    """
    expected = model.state_dict()
    stored = {expected[k].data_ptr() for k in shapes if k in expected}
    unexpected = sorted(k for k in shapes if k not in expected)
    missing = sorted(k for k, t in expected.items() if k not in shapes and t.data_ptr() not in stored)
    wrong = [f"{k}: {tuple(shapes[k])} vs {tuple(expected[k].shape)}" for k in shapes
             if k in expected and tuple(shapes[k]) != tuple(expected[k].shape)]
    if unexpected or missing or wrong:
        parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                 f"shapes differ (file vs model) {wrong}" if wrong else ""]
        raise ValueError(f"{who}: the weights in '{path}' do not fit this model ({'; '.join(p for p in parts if p)}). "
                         "Expected the keys and shapes of model.state_dict(); the model is unchanged.")


def save_weights(model, filepath, overwrite: bool = True) -> None:
    """Write ``model.state_dict()`` to ``filepath`` as safetensors, atomically (tied weights once)."""
    safetensors = require_safetensors("save_weights")
    path = os.fspath(filepath)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"save_weights: '{path}' exists and overwrite=False. Pass overwrite=True or "
                              "another path.")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"save_weights: the directory '{directory}' does not exist. Create it first.")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        safetensors.torch.save_model(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_weights(model, filepath) -> None:
    """Load the weights in ``filepath`` into ``model``; keys and shapes must match exactly."""
    safetensors = require_safetensors("load_weights")
    path = os.fspath(filepath)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_weights: no file at '{path}'.")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception as e:  # safetensors raises its own error types for files that are not safetensors
        raise ValueError(f"load_weights: '{path}' is not a safetensors file ({e}). Expected a file written by "
                         "save_weights, tg.save or a torchgraph checkpoint.") from None
    from ..saving import FORMAT_NAME as MODEL_FORMAT
    from .checkpoint import FORMAT_NAME as CHECKPOINT_FORMAT
    from .checkpoint import load_checkpoint

    if fmt == CHECKPOINT_FORMAT:
        from .state import state_of

        st = state_of(model)
        saved = (st.config, st.loop)
        st.config, st.loop = None, None  # weights only: leave optimizer, callbacks and RNG alone
        try:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                load_checkpoint(model, path, callbacks=[], restore_rng=False)
        finally:
            st.config, st.loop = saved
        return
    if fmt == MODEL_FORMAT:
        from ..saving import load

        state = load(path).state_dict()
        check_fits(model, {k: t.shape for k, t in state.items()}, path, "load_weights")
        model.load_state_dict(state)
        return
    with safetensors.safe_open(path, framework="pt") as f:
        check_fits(model, {k: f.get_slice(k).get_shape() for k in f.keys()}, path, "load_weights")
    safetensors.torch.load_model(model, path, strict=True)
