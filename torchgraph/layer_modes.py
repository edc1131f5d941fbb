"""The training mode of each layer, as a config stores it: where a layer's mode differs from its parent's.

NOTE: [Layer modes] ``tg.Model(x, hf_model.eval()(x))`` is itself in training mode (a new nn.Module is)
while the layer inside it runs in eval mode. A config that kept only the model's own mode would load that
layer in training mode: its dropout on, its outputs different from the saved model's, and nothing said.
So the config lists, under ``"layer_modes"``, every module whose mode differs from its parent's (the
roots of the subtrees in the other mode: one entry for a whole HF model, not one per submodule), and
loading sets the model's mode, then these, parents first.

Example:
    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5)).eval())
    >>> layer_modes(net)
    [['1', False]]
    >>> other = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5)))
    >>> apply_layer_modes(other, layer_modes(net), "example")
    >>> [m.training for m in other.modules()]
    [True, True, False, False, False]
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .hierarchy import _require, check_path

__all__ = ["MAX_LAYER_MODES", "apply_layer_modes", "layer_modes"]

#: Most entries a config's "layer_modes" may hold (a file from a stranger cannot ask for more work).
MAX_LAYER_MODES = 10_000


def layer_modes(model: nn.Module) -> list[list]:
    """``[[path, training], ...]`` for every submodule of ``model`` whose mode differs from its parent's,
    parents before children (``named_modules`` walks the tree top-down)."""
    modes = []
    for path, module in model.named_modules():
        for name, child in module.named_children():
            if child.training != module.training:
                modes.append([f"{path}.{name}" if path else name, bool(child.training)])
    return modes


def apply_layer_modes(model: nn.Module, modes: Any, where: str) -> None:
    """Set the modes :func:`layer_modes` described, on a model already in its own mode."""
    _require(isinstance(modes, list) and len(modes) <= MAX_LAYER_MODES,
             f"{where}: 'layer_modes' must be a list of at most {MAX_LAYER_MODES} [path, bool] pairs.")
    checked = []
    for i, entry in enumerate(modes):
        _require(isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], bool),
                 f"{where}: layer_modes[{i}] must be a [path, bool] pair; received {entry!r:.80}.")
        path = check_path(entry[0], f"{where}: layer_modes[{i}]")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{where}: layer_modes[{i}] names '{path:.80}', which is not a layer of the model. "
                             "Expected the path of a submodule (the config was changed by hand, or is "
                             "corrupt).") from None
        checked.append((path.count("."), module, entry[1]))
    for _, module, training in sorted(checked, key=lambda item: item[0]):
        module.train(training)
