"""``clone_model``: the same architecture with new layers (fresh weights by default), as in Keras."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .replay import Ref, get_attr as _get_attr, replay
from .layer_config import layer_from_config, layer_to_config
from .naming import name as set_name

__all__ = ["clone_model"]


def clone_model(model, clone_function: Callable[[nn.Module], nn.Module] | None = None):
    """A new model with the architecture of ``model``, rebuilt through the symbolic API.

    Args:
        model (tg.Model): the model to clone.
        clone_function: called once per layer (a shared layer once); returns the module to use in its
            place. Returning the layer itself shares it (and its weights) with ``model``. By default
            each layer is rebuilt from its config (fresh weights; nested models are cloned the same
            way), which needs every layer to be describable by ``get_config``; with a
            ``clone_function`` any layer works.

    Returns:
        tg.Model: same ``model.code``, same state_dict keys; constants are copied.

    Raises:
        ValueError: the default clone meets a layer get_config cannot describe (pass a clone_function,
            e.g. ``copy.deepcopy``), or a replacement does not fit (shape errors name the layer).

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(8,))
        >>> model = tg.Model(x, nn.Linear(8, 2)(nn.Dropout(0.5)(x)))
        >>> fresh = tg.clone_model(model)
        >>> torch.equal(fresh.linear.weight, model.linear.weight)
        False
        >>> lighter = tg.clone_model(
        ...     model, lambda layer: nn.Dropout(0.1) if isinstance(layer, nn.Dropout) else layer)
        >>> lighter.linear is model.linear, lighter.dropout.p
        (True, 0.1)
    """
    from .model import Model

    if not isinstance(model, Model):
        raise TypeError(f"tg.clone_model: expected a tg.Model; received {type(model).__name__}.")
    name = type(model).__name__
    layers: dict[str, nn.Module] = {}
    nodes: list[tuple] = []
    inputs: list[tuple] = []
    copied: dict[str, torch.Tensor] = {}
    outputs: Any = None

    def ref(a):
        if isinstance(a, fx.Node):
            return Ref(a.target if a.op == "placeholder" else a.name)
        return a

    from .trees import plain_containers, tree_map

    for node in model.graph.nodes:
        if node.op == "placeholder":
            spec = node.meta["tg_spec"]
            inputs.append((node.target, tuple(spec.shape[1:]), spec.dtype))
        elif node.op == "output":
            outputs = tree_map(ref, plain_containers(node.args[0]))
        elif node.op == "get_attr":
            if node.target not in copied:
                copied[node.target] = set_name(_copy_tensor(_get_attr(model, node.target)), node.target)
            nodes.append(("get_attr", node.name, copied[node.target], (), {}))
        else:
            target = node.target
            if node.op == "call_module":
                if target not in layers:
                    layers[target] = _replacement(model.get_submodule(target), clone_function,
                                                  f"tg.clone_model: layer '{target}'")
                target = layers[target]
            args = tree_map(ref, plain_containers(tuple(node.args)))
            kwargs = tree_map(ref, plain_containers(dict(node.kwargs)))
            nodes.append((node.op, node.name, target, args, kwargs))
    # New layers get the original names; a layer returned as-is keeps whatever name it has.
    fresh = {n: m for n, m in layers.items() if m is not model.get_submodule(n)}
    clone = replay(inputs, model.meta["torchgraph"]["input_kind"], nodes, outputs, name, fresh)
    clone.train(model.training)
    return clone




def _copy_tensor(t: torch.Tensor) -> torch.Tensor:
    copy = t.detach().clone()
    return nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copy


def _replacement(layer: nn.Module, clone_function, where: str) -> nn.Module:
    from .model import Model

    if clone_function is None:
        if isinstance(layer, Model):
            return clone_model(layer)
        try:
            config = layer_to_config(layer, where)
        except ValueError as exc:
            raise ValueError(f"{exc} Or pass clone_function (for example copy.deepcopy) to "
                             "tg.clone_model.") from None
        return layer_from_config(config, where)
    new = clone_function(layer)
    if not isinstance(new, nn.Module):
        raise TypeError(f"{where}: clone_function must return an nn.Module; it returned "
                        f"{type(new).__name__}.")
    return new
