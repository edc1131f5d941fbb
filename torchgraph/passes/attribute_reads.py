"""Read each submodule once per forward: generated code that shares the walks of attribute paths.

fx writes a ``get_attr`` node (and a ``call_module`` node's module) as the whole attribute path from ``self``
(``getattr(getattr(self.net.features, "1").conv, "0").weight``), and each step below ``self`` goes
through ``nn.Module.__getattr__`` (a missed attribute lookup, then three dict probes: ~1 us). An
optimized convolution stack reads a weight and a bias per layer, each from the top.
:class:`SharedWalkCodeGen` writes the same reads, in the same order and with the same
``getattr`` semantics, but binds every module on the way to a local the first time it is reached,
so later reads start from the deepest module already read:

    features_1_conv_0_weight = getattr(getattr(self.net.features, "1").conv, "0").weight
    features_1_conv_0_bias = getattr(getattr(self.net.features, "1").conv, "0").bias

becomes (each on its one line, so fx's line-to-node map still holds)

    _net = self.net; _net_features = _net.features; ...; features_1_conv_0_weight = _net_features_1_conv_0.weight
    features_1_conv_0_bias = _net_features_1_conv_0.bias

Nothing is cached across calls: a layer or parameter replaced between two calls is read as
before, so ``state_dict``, ``load_state_dict(assign=True)`` and the module hierarchy behave exactly
as they do for fx's own code.

Example:
    >>> import torch, torch.nn as nn, torch.fx as fx
    >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    >>> graph = fx.Graph()
    >>> x = graph.placeholder("x")
    >>> w, b = graph.get_attr("0.0.weight"), graph.get_attr("0.0.bias")
    >>> _ = graph.output(graph.call_function(torch.nn.functional.linear, (x, w, b)))
    >>> share_attribute_walks(graph)
    2
    >>> gm = fx.GraphModule(net, graph)
    >>> "_0_0.bias" in gm.code
    True
    >>> torch.equal(gm(torch.ones(1, 2)), net(torch.ones(1, 2)))
    True
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from torch.fx.graph import CodeGen, _format_target

__all__ = ["SharedWalkCodeGen", "share_attribute_walks"]


class SharedWalkCodeGen(CodeGen):
    """fx's code generator, with ``get_attr`` reads that share their module walks (module docstring)."""

    def _gen_python_code(self, nodes, root_module: str, namespace, **kwargs):
        # the lines fx writes for them: "name = <path>" (get_attr), "name = <path>(args)" (call_module)
        reads = {node.name: (node, _format_target(root_module, node.target)) for node in nodes
                 if node.op in ("get_attr", "call_module") and "." in node.target}
        previous = self._body_transformer
        module_class = namespace.create_name("nn_Module", nn.Module)  # a global of the generated code

        def transform(body: list) -> list:
            body = previous(body) if previous is not None else body
            bound: dict[str, str] = {}  # module path -> local name
            out = []
            for line in body:
                name, _, rest = line.partition(" = ")
                node, path = reads.get(name, (None, None))
                if node is not None and (rest == path if node.op == "get_attr" else rest.startswith(path + "(")):
                    line = _shared_read(node, root_module, namespace, bound, module_class) + rest[len(path):]
                out.append(line)
            return out

        self._body_transformer = transform
        try:
            code = super()._gen_python_code(nodes, root_module, namespace, **kwargs)
        finally:
            self._body_transformer = previous
        code.globals[module_class] = nn.Module
        return code


def _shared_read(node: fx.Node, root_module: str, namespace, bound: dict, module_class: str) -> str:
    """``node``'s read (``name = <expression>``) as one line: bind the modules on its path not bound
    yet, then read from the deepest. ``namespace`` (fx's, holding every node's name by now) keeps
    the locals unique; ``bound`` maps a module path to its local and the module it names now."""
    *path, attr = node.target.split(".")
    statements = []
    base, parent = root_module, node.graph.owning_module
    for depth in range(1, len(path) + 1):
        prefix = ".".join(path[:depth])
        found = bound.get(prefix)
        if found is None:
            local = namespace.create_name("_" + prefix.replace(".", "_"), None)
            child = getattr(parent, path[depth - 1], None) if parent is not None else None
            statements.append(f"{local} = {_child(base, parent, path[depth - 1])}")
            found = bound[prefix] = (local, child)
        base, parent = found
    name = node.name  # the line fx wrote starts with this name, created in the same namespace
    read = _format_target(base, attr)
    if node.op == "get_attr" and type(parent) is nn.Module and attr in parent._parameters:
        read = f"({base}._parameters[{attr!r}] if type({base}) is {module_class} and {attr!r} in {base}._parameters else {read})"
    statements.append(f"{name} = {read}")
    return "; ".join(statements)


# NOTE: [Reading submodules from _modules] A step from a module to its child, written
# `parent.child`, misses the instance dict and runs nn.Module.__getattr__ (~1 us); on a plain
# nn.Module (the holders fx builds for a GraphModule's hierarchy are exactly that) the answer is
# always `parent._modules["child"]`: nn.Module has no class attribute a child could be named
# after (register_module refuses names that exist) and __setattr__/__delattr__ keep `_modules`
# the only place a child lives. The same holds for a parameter while it is in `_parameters` and
# the holder is still a plain nn.Module, which the generated line checks on every call (a
# parametrization added later swaps the holder's class for one with a property, and moves the
# tensor out of `_parameters`: the line then reads the attribute, as fx's code does). Other
# module types keep getattr. Measured on MobileNetV2's optimized forward (b8, 1 thread, the walk
# lines alone, 106 of them): ~560 us a call with fx's code, 262 us with shared walks by
# attribute, 14 us through `_modules`, and the parameters through `_parameters` save ~1 us
# each again (below).
def _child(base: str, parent, name: str) -> str:
    if type(parent) is nn.Module and name in parent._modules:
        return f"{base}._modules[{name!r}]"
    return _format_target(base, name)


def share_attribute_walks(graph: fx.Graph) -> int:
    """Make ``graph`` generate :class:`SharedWalkCodeGen`'s code; returns how many ``get_attr`` and
    ``call_module`` nodes read below a submodule. Only a graph with fx's default code generator is changed
    (another one, e.g. pytree inputs, keeps its own)."""
    if type(graph._codegen) is CodeGen:
        graph.set_codegen(SharedWalkCodeGen())
    return sum(1 for node in graph.nodes if node.op in ("get_attr", "call_module") and "." in node.target)
