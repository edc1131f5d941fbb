"""Functional dropout that follows a module's mode (``F.dropout(x, p, training=self.training)``, attention
dropout) in ``tg.from_module``.

HuggingFace layers write ``nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)``
(OPT, BART; Falcon through a ``dropout_add(x, residual, prob, training)`` helper). Recorded once, the
``training`` argument is a constant: the graph would drop out in one mode only. ``tg.from_module``
records each looked-through forward in train and eval mode (NOTE: [Train and eval] in
``from_module.py``); a call of a functional dropout whose ``training`` equals its module's mode in
both recordings (so it differs between them) is recorded as the matching ``torch.nn`` dropout layer
instead, which follows the mode of the model and of its container. HuggingFace's eager attention
passes ``p=dropout`` too, which is ``0.0`` in eval mode: with ``training`` following the mode, the
eval recording's ``p`` changes nothing (a dropout that is not training returns its input, whatever
``p``), so the train recording's ``p`` defines the layer.

Attention dropout is written into the SDPA call (nanoGPT: ``dropout_p=self.dropout if
self.training else 0``; HuggingFace's ``sdpa_attention_forward``: ``dropout=0.0 if not
self.training else p``): an ``F.scaled_dot_product_attention`` call whose ``dropout_p`` is ``p > 0``
when its module trains and ``0`` when not, the same call otherwise, is recorded as a
``tg.layers.ScaledDotProductAttention(p)`` layer (NOTE: [Attention dropout as a layer]).

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

NOTE: [Attention dropout as a layer]
SDPA draws its dropout inside the call, so there is no ``F.dropout`` to turn into ``nn.Dropout``.
Options weighed:

- the attention written out (``softmax(q @ k.T * scale + mask)``, ``nn.Dropout``, ``@ v``): not
  bit-exact in either mode (it rounds differently from SDPA's kernels: up to 2e-7 on a small float32
  case here, where CPU SDPA happens to draw its dropout mask as ``F.dropout`` does; CUDA's fused
  kernels draw their own), slower, and it hides the attention from the attention passes.
- ``get_attr`` of the mode, or a function taking it: rejected as for dropout above.
- ``nn.MultiheadAttention``: it owns projections; not this computation.
- a stateless layer holding ``dropout_p`` whose forward is the very call eager makes,
  ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=p if self.training else 0.0,
  is_causal, scale, **enable_gqa)``: the same random numbers in train mode, plain SDPA in eval, and
  it follows ``model.eval()`` and its container's mode like ``nn.Dropout``. A torchgraph layer
  (``torchgraph/layers.py``), registered for configs under a fixed name, so saved files need no new
  kind of entry: chosen. ``tg.optimize(inference=True)`` turns it back into the SDPA call without
  dropout, which its attention passes know; the inliner keeps it a call (its forward reads the mode).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .emitting import RESERVED_NAMES
from .layers import ScaledDotProductAttention
from .naming import first_free_name, snake_case

__all__ = ["MODE_DROPOUTS", "SDPA_FUNCTIONS", "is_mode_dropout", "sdpa_arguments", "mode_parts",
           "follows_mode_in_both", "same_call", "record_as_layers"]

#: Functional dropouts and the ``torch.nn`` layer whose forward calls each with ``training=self.training``.
MODE_DROPOUTS = {F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
                 F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
                 F.feature_alpha_dropout: nn.FeatureAlphaDropout}

#: ``F.scaled_dot_product_attention`` as a recorded target may be (the same builtin, two names).
SDPA_FUNCTIONS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _probability(p) -> bool:
    return isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0


def is_mode_dropout(record) -> bool:
    """Whether ``record`` is a functional dropout call that a dropout layer can stand for: a plain
    ``training`` flag and probability, not in place (its kwargs are normalized by torch: ``input`` is
    the only positional argument)."""
    if record.op != "call_function" or record.target not in MODE_DROPOUTS:
        return False
    kwargs = record.kwargs
    return (len(record.args) == 1 and isinstance(kwargs.get("training", True), bool)
            and not kwargs.get("inplace", False) and _probability(kwargs.get("p", 0.5)))


def sdpa_arguments(record) -> dict | None:
    """The arguments of an ``F.scaled_dot_product_attention`` record by parameter name (those the
    call gave), when ``dropout_p`` is a plain probability and ``is_causal`` a plain bool; else None."""
    if record.op != "call_function" or record.target not in SDPA_FUNCTIONS \
            or len(record.args) > len(_SDPA_PARAMETERS) or set(record.kwargs) - set(_SDPA_PARAMETERS):
        return None
    bound = dict(zip(_SDPA_PARAMETERS, record.args))
    if set(bound) & set(record.kwargs) or len(bound) + len(record.kwargs) < 3:
        return None
    bound.update(record.kwargs)
    if not _probability(bound.get("dropout_p", 0.0)) or not isinstance(bound.get("is_causal", False), bool):
        return None
    return bound


def mode_parts(record, scope_mode: bool) -> tuple | None:
    """``(args, kwargs, mode entry)`` of a call whose mode-dependent part is set apart in its
    signature (``fidelity.signature``), or None for any other record. The mode entry of a dropout is
    ``("training", flag, flag == the scope's mode, p)``, of an SDPA call ``("dropout_p", p, the
    scope's mode)``."""
    if is_mode_dropout(record):
        kwargs = {k: v for k, v in record.kwargs.items() if k not in ("training", "p")}
        training = record.kwargs.get("training", True)
        return record.args, kwargs, ("training", training, training == scope_mode, record.kwargs.get("p", 0.5))
    bound = sdpa_arguments(record)
    if bound is None:
        return None
    kwargs = {k: v for k, v in bound.items() if k != "dropout_p"}
    return (), kwargs, ("dropout_p", bound.get("dropout_p", 0.0), scope_mode)


def follows_mode_in_both(first: tuple, second: tuple) -> bool:
    """Two signature entries of the same call in the two recordings that differ only as the mode:
    a dropout's ``training`` flag is the scope's mode each time (its ``p`` then only matters in
    train mode), or SDPA's ``dropout_p`` is > 0 where the scope trains and 0 where not."""
    if not _mode_pair(first, second):
        return False
    a, b = first[4], second[4]
    if a[0] == "training":
        return a[1] != b[1] and a[2] and b[2]
    if a[2] == b[2]:
        return False
    train, other = (a, b) if a[2] else (b, a)
    return train[1] > 0 and other[1] == 0


def same_call(first: tuple, second: tuple) -> bool:
    """Whether two signature entries record the same call, or a call that follows the mode."""
    if _mode_pair(first, second):
        a, b = first[4], second[4]
        same = a[1] == b[1] and (a[0] != "training" or a[3] == b[3])
        return same or follows_mode_in_both(first, second)
    return first == second


def _mode_pair(first: tuple, second: tuple) -> bool:
    return len(first) == len(second) == 5 and first[4][0] == second[4][0] and first[:4] == second[:4]


def _train_probability(first: tuple, second: tuple) -> float:
    """The dropout probability of the recording in which the call trained."""
    a, b = first[4], second[4]
    if a[0] == "training":
        return a[3] if a[1] else b[3]
    return a[1] if a[2] else b[1]


def record_as_layers(first: list, first_entries: dict, second_entries: dict, owners: dict[str, nn.Module],
                     modes: dict[str, bool], names: dict[int, str]) -> None:
    """Rewrite the calls of the ``first`` recording that follow the mode into layer calls.

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
            p = _train_probability(entry, others[i])
            if entry[4][0] == "training":
                layer, args, kwargs = MODE_DROPOUTS[record.target](p=p), record.args, {}
            else:
                bound = sdpa_arguments(record)
                layer = ScaledDotProductAttention(dropout_p=p)
                args = tuple(bound.pop(k) for k in _SDPA_PARAMETERS[:3])
                kwargs = {k: v for k, v in bound.items() if k != "dropout_p"}
            layer.train(modes.get(scope, True))
            if scope not in taken:
                owner = owners[scope]
                taken[scope] = {*owner._modules, *owner._parameters, *owner._buffers, *RESERVED_NAMES}
            used = taken[scope]
            name, _ = first_free_name(snake_case(type(layer).__name__), used.__contains__)
            used.add(name)
            names[id(layer)] = (scope + "." if scope else "") + name
            record.op, record.target, record.args, record.kwargs = "call_module", layer, args, kwargs


def _by_scope(records: list) -> dict[str, list]:
    """The records of each scope in order, as ``fidelity.signature`` lists their entries."""
    out: dict[str, list] = {}
    for r in records:
        if r.op != "placeholder":
            out.setdefault(r.scope, []).append(r)
    return out
