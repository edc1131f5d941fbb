"""Functional dropout that follows a module's mode (``F.dropout(x, p, training=self.training)``) in ``tg.from_module``.

HuggingFace layers write ``nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)``
(OPT, BART; Falcon through a ``dropout_add(x, residual, prob, training)`` helper). Recorded once, the
``training`` argument is a constant: the graph would drop out in one mode only. ``tg.from_module``
records each looked-through forward in train and eval mode (NOTE: [Train and eval] in
``from_module.py``); a call of a functional dropout whose ``training`` equals its module's mode in
both recordings (so it differs between them) is recorded as the matching ``torch.nn`` dropout layer
instead, which follows the mode of the model and of its container.

NOTE: [Mode-following dropout as a layer]
Options weighed for what such a call becomes in the graph:

- a ``get_attr`` of the scope's ``training`` flag passed to ``F.dropout``: fx copies the bool at
  build time and configs would need a new kind of node that reads an attribute path, which a
  crafted file could aim at any attribute (untrusted.py); summary, optimize and ONNX treat
  ``get_attr`` as a tensor.
- a torchgraph function taking the mode as an argument: the mode would still have to come from a
  module, the same problem.
- a ``call_module`` of a stateless layer: ``nn.Dropout(p)`` (``nn.Dropout1d/2d/3d``,
  ``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``) *is* that layer. Its forward is the same
  ``F.dropout(x, self.p, self.training, self.inplace)`` call (the same random numbers under the same
  seed), it follows ``model.train()/eval()`` and ``model.layers[0].eval()`` because it sits in the
  scope's container, and configs, files, summary, plot, ``tg.optimize`` (dropout vanishes in eval) and
  ONNX export already support it. Nothing new in saved files: chosen.

It is named after its class inside the module that called it (``layers.0.dropout``, then
``dropout_1``...), never over one of that module's own submodules, parameters or buffers. A dropout
whose ``training`` does not follow the mode (``training=True``, Monte Carlo dropout) records the same
in both modes and stays a function call as recorded.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .emitting import RESERVED_NAMES
from .naming import first_free_name, snake_case

__all__ = ["MODE_DROPOUTS", "is_mode_dropout", "mode_entry", "follows_mode_in_both", "same_call",
           "record_as_layers"]

#: Functional dropouts and the ``torch.nn`` layer whose forward calls each with ``training=self.training``.
MODE_DROPOUTS = {F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
                 F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
                 F.feature_alpha_dropout: nn.FeatureAlphaDropout}


def is_mode_dropout(record) -> bool:
    """Whether ``record`` is a functional dropout call that a dropout layer can stand for: a plain
    ``training`` flag and probability, not in place (its kwargs are normalized by torch: ``input`` is
    the only positional argument)."""
    if record.op != "call_function" or record.target not in MODE_DROPOUTS:
        return False
    kwargs = record.kwargs
    p = kwargs.get("p", 0.5)
    return (len(record.args) == 1 and isinstance(kwargs.get("training", True), bool)
            and not kwargs.get("inplace", False) and isinstance(p, (int, float)) and not isinstance(p, bool)
            and 0.0 <= p <= 1.0)


def mode_entry(record, scope_mode: bool) -> tuple:
    """The part of a dropout record's signature that may differ between train and eval recordings:
    ``("training", value, whether it equals the mode of the scope module in that recording)``."""
    training = record.kwargs.get("training", True)
    return ("training", training, training == scope_mode)


def follows_mode_in_both(first: tuple, second: tuple) -> bool:
    """Two signature entries of the same call in the two recordings that differ only in a ``training``
    flag equal to the scope's mode each time: the call follows the mode."""
    return _dropout_pair(first, second) and first[4][1] != second[4][1] and first[4][2] and second[4][2]


def same_call(first: tuple, second: tuple) -> bool:
    """Whether two signature entries record the same call, or a dropout that follows the mode."""
    if _dropout_pair(first, second):
        return first[4][1] == second[4][1] or follows_mode_in_both(first, second)
    return first == second


def _dropout_pair(first: tuple, second: tuple) -> bool:
    return (len(first) == len(second) == 5 and first[4][0] == second[4][0] == "training"
            and first[:4] == second[:4])


def record_as_layers(first: list, first_entries: dict, second_entries: dict, owners: dict[str, nn.Module],
                     modes: dict[str, bool], names: dict[int, str]) -> None:
    """Rewrite the dropout calls of the ``first`` recording that follow the mode into layer calls.

    ``first`` holds the records of the recording kept, in order, ``*_entries`` the signatures
    (``fidelity.signature``) of both recordings, ``owners`` the looked-through module at each path, ``modes``
    each path's mode to leave the new layers in, and ``names`` gets ``id(layer) -> module path``.
    """
    records = _by_scope(first)
    taken: dict[str, set] = {}
    for scope, entries in first_entries.items():
        others = second_entries.get(scope, [])
        for i, entry in enumerate(entries):
            if i >= len(others) or not follows_mode_in_both(entry, others[i]):
                continue
            record = records[scope][i]
            layer_type = MODE_DROPOUTS[record.target]
            layer = layer_type(p=record.kwargs.get("p", 0.5))
            layer.train(modes.get(scope, True))
            if scope not in taken:
                owner = owners[scope]
                taken[scope] = {*owner._modules, *owner._parameters, *owner._buffers, *RESERVED_NAMES}
            used = taken[scope]
            name, _ = first_free_name(snake_case(layer_type.__name__), used.__contains__)
            used.add(name)
            names[id(layer)] = (scope + "." if scope else "") + name
            record.op, record.target, record.kwargs = "call_module", layer, {}


def _by_scope(records: list) -> dict[str, list]:
    """The records of each scope in order, as ``fidelity.signature`` lists their entries."""
    out: dict[str, list] = {}
    for r in records:
        if r.op != "placeholder":
            out.setdefault(r.scope, []).append(r)
    return out
