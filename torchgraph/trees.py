"""Trees of arguments and outputs: tuples, lists, dicts, namedtuples and slices, with paths.

torch's pytree does not descend into slices (``x[:, :n]`` with a dynamic ``n``), and the paths here are
what fx ``getitem`` nodes index with, so torchgraph keeps its own small version.
"""

from __future__ import annotations

import torch

__all__ = ["map_with_paths", "plain_containers", "tree_leaves", "tree_map"]



def tree_map(fn, obj):
    t = type(obj)
    if t is tuple or t is list:
        return t(tree_map(fn, o) for o in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return t(*(tree_map(fn, o) for o in obj))
    if isinstance(obj, tuple) and t.__module__ == "torch.return_types":  # x.max(dim) -> .values/.indices
        return t([tree_map(fn, o) for o in obj])
    if isinstance(obj, (tuple, list)) and not isinstance(obj, torch.Size):
        return tuple(tree_map(fn, o) for o in obj)
    if isinstance(obj, dict):
        return t((k, tree_map(fn, v)) for k, v in obj.items()) if t is not dict else {
            k: tree_map(fn, v) for k, v in obj.items()}
    if t is slice:
        return slice(tree_map(fn, obj.start), tree_map(fn, obj.stop), tree_map(fn, obj.step))
    return fn(obj)


def plain_containers(obj):
    """fx's immutable_list/immutable_dict (and other list/dict subclasses) as plain lists/dicts."""
    if isinstance(obj, list):
        return [plain_containers(o) for o in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(plain_containers(o) for o in obj)
    if isinstance(obj, dict):
        return {k: plain_containers(v) for k, v in obj.items()}
    return obj


def tree_leaves(obj, path=()):
    """Yield ``(path, leaf)``; paths index tuples/lists by position and dicts by key."""
    if isinstance(obj, (tuple, list)) and not isinstance(obj, torch.Size):
        for i, o in enumerate(obj):
            yield from tree_leaves(o, path + (i,))
    elif isinstance(obj, dict):
        for k, o in obj.items():
            yield from tree_leaves(o, path + (k,))
    elif type(obj) is slice:
        for o in (obj.start, obj.stop, obj.step):
            yield from tree_leaves(o, path)
    else:
        yield path, obj


def map_with_paths(fn, obj, path=()):
    if isinstance(obj, (tuple, list)) and not isinstance(obj, torch.Size):
        items = [map_with_paths(fn, o, path + (i,)) for i, o in enumerate(obj)]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {k: map_with_paths(fn, o, path + (k,)) for k, o in obj.items()}
    return fn(path, obj)
