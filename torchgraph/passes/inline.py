"""Inline nested modules (``nn.Sequential``, ``tg.Model``, subclassed blocks) so passes see one graph.

``tg.Model(x, torchvision_resnet(x))`` records the whole network as one ``call_module``; a
torchvision block hides its conv -> BatchNorm -> ReLU inside ``forward``. Fusion passes match
patterns across node boundaries, so they need the layers themselves in the graph. This pass replaces
each call of a container or custom module by the graph of its ``forward``, down to torch's own layers
(``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU``, ...):

* a ``tg.Model`` (or any ``fx.GraphModule``) brings its graph;
* anything else is traced with ``torch.fx`` (``_InliningTracer``), with the arguments the call does
  not pass as graph values baked in (``targets=None``) and ``assert`` s kept as ``torch._assert``.
  A submodule whose forward cannot be traced (data-dependent control flow, ``math.sqrt`` of a
  traced size, ...) stays one opaque ``call_module``, exactly as before;
* a module whose own forward fx cannot trace (HuggingFace's ``BertModel``) is recorded by
  ``tg.from_module`` instead (NOTE: [Recorded inlining] in ``inline_recorded.py``), and stays one
  opaque call if that fails too; so is a module whose trace left a submodule opaque, where the
  recording succeeds (NOTE: [Parents of untraceable modules]).

Every inlined node gets a ``tg_spec`` by running the inlined graph on the two meta probes of the
call's inputs (:class:`ProbeInterpreter`); the result must have the probe shapes the call had, or the
module is left as it was. Parameters keep their owners: an inlined node reads ``block.conv1`` through
the dotted path, so ``state_dict`` keys do not change.
"""

from __future__ import annotations

import bisect
import dis
import inspect
import operator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call

from .. import generator_states
from ..dims import DynamicDim
from ..drop_paths import is_drop_path
from ..layers import ScaledDotProductAttention
from ..model import ValueSpec
from ..probing import probe_generator, to_meta
from ..restoring import attribute_snapshot
from ..symbolic import dim_for_probes
from .inline_recorded import record_for_inlining

__all__ = ["ProbeInterpreter", "inline_modules", "is_torch_layer"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Layers whose output is shaped like their one input (what the probe interpreter needs to know).
_SHAPE_PRESERVING = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish,
                     nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.LayerNorm)


def is_torch_layer(module: nn.Module) -> bool:
    """A layer from ``torch.nn`` itself (not a container), or one of ``torchgraph.layers``: passes
    know it by type, so it stays a ``call_module``. ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` are among them, and so are drop paths (``tg.layers.DropPath``, and
    timm's ``DropPath`` and the like, recognised by running them: ``drop_paths.py``). (Tracing
    ``ScaledDotProductAttention`` or a drop path would also freeze its ``self.training`` into the graph.)"""
    cls = type(module)
    return (cls.__module__.startswith("torch.nn.") and not isinstance(module, _CONTAINERS)
            and not isinstance(module, fx.GraphModule)) or isinstance(module, ScaledDotProductAttention) \
        or is_drop_path(module)


# NOTE: [Augmented assignment in fx traces] fx's Proxy has no `__iadd__`, so Python runs `x += y` as
# `x = x + y` and the trace records an out-of-place add: the tensor `x` named (a block's input, a
# value the caller reads again) is no longer changed, silently. The inlining tracer's proxies
# record `operator.iadd(x, y)` instead, which changes a tensor in place at run time as the forward
# did (and adds numbers, for sizes); passes.canonicalize turns it out-of-place where nobody else
# sees the tensor (torchvision's `out += identity`).
class _AugmentedProxy(fx.Proxy):
    pass


for _name, _op in (("__iadd__", operator.iadd), ("__isub__", operator.isub), ("__imul__", operator.imul),
                   ("__itruediv__", operator.itruediv), ("__ifloordiv__", operator.ifloordiv),
                   ("__imod__", operator.imod), ("__ipow__", operator.ipow), ("__iand__", operator.iand),
                   ("__ior__", operator.ior), ("__ixor__", operator.ixor), ("__ilshift__", operator.ilshift),
                   ("__irshift__", operator.irshift), ("__imatmul__", operator.imatmul)):
    setattr(_AugmentedProxy, _name,
            lambda self, other, _op=_op: self.tracer.create_proxy("call_function", _op, (self, other), {}))


class _InliningTracer(fx.Tracer):
    """Traces through every module except torch's layers; a submodule it cannot trace stays a leaf."""

    def __init__(self):
        super().__init__()
        self.opaque: set[int] = set()

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AugmentedProxy(node, self)  # NOTE: [Augmented assignment in fx traces]

    def to_bool(self, obj: fx.Proxy) -> bool:
        """``assert cond`` on a traced value becomes a ``torch._assert`` node, checked at run time,
        instead of a trace failure (nanoGPT's ``GPT.forward`` asserts the sequence length). fx's own
        ``trace_asserts`` does this for Python <= 3.10 bytecode only."""
        frame = inspect.currentframe().f_back.f_back  # the code whose condition this is
        instructions = list(dis.get_instructions(frame.f_code))
        at = bisect.bisect_left(instructions, frame.f_lasti, key=lambda i: i.offset)
        if at + 1 < len(instructions) and "IF_TRUE" in instructions[at].opname and \
                instructions[at + 1].opname == "LOAD_ASSERTION_ERROR":
            self.create_proxy("call_function", torch._assert,
                              (obj, f"assertion in {frame.f_code.co_name}() failed"), {})
            return True
        return super().to_bool(obj)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_torch_layer(m) or id(m) in self.opaque

    def call_module(self, m, forward, args, kwargs):
        if self.is_leaf_module(m, ""):
            return super().call_module(m, forward, args, kwargs)
        # roll back to here if m's forward cannot be traced: the graph, and fx's module stack and
        # call counts (Tracer.call_module does not pop its entry when the forward raises)
        last = self.graph._root.prev
        stack, calls = self.module_stack.copy(), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:  # noqa: BLE001 - any failure inside the forward: keep the call opaque
            while self.graph._root.prev is not last:
                self.graph.erase_node(self.graph._root.prev)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            self.opaque.add(id(m))
            return super().call_module(m, forward, args, kwargs)


def _trace(module: nn.Module, args: tuple = ()) -> fx.GraphModule | None:
    """``module``'s forward as a graph, for a call with positional ``args``: arguments that are not
    graph values (constants, and the defaults of parameters the call leaves out) are baked in, so
    ``if targets is not None`` takes the branch the call takes. None when fx cannot trace it, or
    when the module is in train mode and its forward differs between modes (NOTE: [Traced in both
    modes])."""
    if isinstance(module, fx.GraphModule):
        return module
    try:
        bound = inspect.signature(module.forward).bind(*args)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    concrete = {k: v for k, v in bound.arguments.items() if not isinstance(v, fx.Node)}
    traced = _trace_once(module, concrete)
    if traced is None or not module.training:
        return traced
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        in_eval = _trace_once(module, concrete)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return traced if in_eval is not None and in_eval.code == traced.code else None


# NOTE: [Traced in both modes] torch.fx runs the forward once, so `if self.training:` and
# `F.dropout(x, p, self.training)` are answered for the mode the module is in and baked into the
# graph. tg.optimize(inference=True) wants the eval graph (it puts the copy in eval first), but
# with inference=False the optimized model is trained and then evaluated: a graph traced in train
# mode would keep scaling, dropping or skipping after model.eval(), silently. So a module in train
# mode is traced in eval mode too, and inlined only when both graphs are the same code; otherwise
# tg.from_module's recording takes over (it records both modes and follows them: NOTE: [Recorded
# inlining]), or the module stays one call, which follows the mode by itself.
def _trace_once(module: nn.Module, concrete: dict) -> fx.GraphModule | None:
    tracer = _InliningTracer()
    before = attribute_snapshot(module)  # torch.nn's own layers are leaves of the trace: their forwards do not run
    try:
        graph = tracer.trace(module, concrete_args=concrete or None)
    except Exception:  # noqa: BLE001 - the module's own forward is not traceable: leave it opaque
        return None
    finally:
        _restore_attributes(before)
    traced = fx.GraphModule(tracer.root, graph)
    traced.meta["tg_left_opaque"] = bool(tracer.opaque)  # NOTE: [Parents of untraceable modules]
    return traced


# NOTE: [Attributes a trace sets] torch.fx runs the forward with Proxies, so a forward that re-binds an
# attribute (Meta's reference LLaMA: `self.freqs_cis = self.freqs_cis.to(h.device)`) left a Proxy on the
# module. When the trace then failed (the same forward iterates `*xq.shape[:-1]`), the module stayed one
# call of the optimized model, and that call read the Proxy: the optimized model raised fx's TraceError
# at run time. Every attribute the trace re-bound is put back, and new ones holding Proxies removed.
def _restore_attributes(before: list) -> None:
    for m, attributes in before:
        for key, value in list(m.__dict__.items()):
            if key not in attributes:
                if isinstance(value, fx.Proxy):
                    del m.__dict__[key]
            elif value is not attributes[key]:
                m.__dict__[key] = attributes[key]


# NOTE: [Probe interpretation] Specs of inlined nodes come from running the inlined graph on meta
# tensors shaped like the call's two probes (the batch sizes tg.Model's probes use), with every
# parameter and buffer swapped for a meta copy (torch.func.functional_call): nothing real is
# computed or changed, and a dim that differs between the probes is dynamic in the spec.
class ProbeInterpreter(fx.Interpreter):
    """Runs a graph of ``module`` on meta tensors; records each node's output in ``self.values``."""

    def __init__(self, module: nn.Module):
        super().__init__(module, garbage_collect_values=False)
        self.values: dict[fx.Node, object] = {}
        self._metas: dict[int, dict] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.values[n] = out
        return out

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return to_meta(value) if isinstance(value, torch.Tensor) else value

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, _SHAPE_PRESERVING) and len(args) == 1 and not kwargs:
            return torch.empty_like(args[0])  # BatchNorm's meta kernel alone costs ~8 ms
        if isinstance(module, nn.RNNBase) and not kwargs and isinstance(args[0], torch.Tensor) \
                and args[0].device.type == "meta":
            return _rnn_shapes(module, *args)  # the meta kernels unroll the sequence in Python
        metas = self._metas.get(id(module))
        if metas is None:
            state = dict(module.named_parameters(remove_duplicate=False))
            state.update(module.named_buffers(remove_duplicate=False))
            metas = self._metas[id(module)] = {k: to_meta(v) for k, v in state.items() if v is not None}
        try:
            return functional_call(module, metas, tuple(args), dict(kwargs))
        except Exception:  # noqa: BLE001 - e.g. nn.TransformerEncoder's nested-tensor path
            return _run_on_real_data(module, args, kwargs)


def _rnn_shapes(rnn: nn.RNNBase, x: torch.Tensor, hx=None):
    """Meta outputs of an ``nn.RNN``/``GRU``/``LSTM`` call, from the shapes alone."""
    directions = 2 if rnn.bidirectional else 1
    batched = x.dim() == 3
    batch = (x.shape[0] if rnn.batch_first else x.shape[1]) if batched else None
    out_size = directions * (rnn.proj_size or rnn.hidden_size)
    out = x.new_empty(*x.shape[:-1], out_size)
    lead = (rnn.num_layers * directions,) + ((batch,) if batched else ())
    h = x.new_empty(*lead, rnn.proj_size or rnn.hidden_size)
    if isinstance(rnn, nn.LSTM):
        return out, (h, x.new_empty(*lead, rnn.hidden_size))
    return out, h


def _real(t):
    if not isinstance(t, torch.Tensor):
        return t
    if t.dtype.is_floating_point:  # NOTE: [Probe data draws from its own generator] in probing.py
        return torch.randn(t.shape, dtype=t.dtype, generator=probe_generator())
    return torch.zeros(t.shape, dtype=t.dtype)


def _run_on_real_data(module: nn.Module, args, kwargs):
    """A module whose forward cannot run on meta tensors (data-dependent control flow, nested
    tensors): run it on random data of the probe shapes, leaving its state, and the random
    generators its forward may draw from, as they were (tg.optimize draws nothing of the user's)."""
    state = {k: v.clone() for k, v in module.state_dict().items()}
    generators = generator_states.snapshot_for(module)
    try:
        with torch.no_grad():
            out = module(*fx.node.map_aggregate(args, _real), **fx.node.map_aggregate(kwargs, _real))
    finally:
        module.load_state_dict(state)
        generator_states.restore(generators)
    return fx.node.map_aggregate(out, lambda t: to_meta(t) if isinstance(t, torch.Tensor) else t)


def _meta_of(spec, k: int):
    if isinstance(spec, ValueSpec):
        if spec.dtype is None:
            return spec.probes[k]
        return torch.empty(spec.probes[k], dtype=spec.dtype, device="meta")
    return None


def _spec_of(p0, p1, dims: list) -> ValueSpec | None:
    """The ``tg_spec`` of a value seen as ``p0`` and ``p1`` at the two probes (a dynamic dim found
    among ``dims``, the call's input dims, keeps its name and bounds)."""
    if isinstance(p0, torch.Tensor) and isinstance(p1, torch.Tensor):
        shape = tuple(dim_for_probes(a, b, dims) for a, b in zip(p0.shape, p1.shape))
        return ValueSpec(shape, p0.dtype, (tuple(p0.shape), tuple(p1.shape)))
    if isinstance(p0, int) and isinstance(p1, int) and not isinstance(p0, bool):
        return ValueSpec(None, None, (p0, p1))
    return None


def _probe_specs(sub: fx.GraphModule, inputs: list) -> dict[fx.Node, ValueSpec | None] | None:
    """``tg_spec`` of every node of ``sub`` run on ``inputs`` (one spec or constant per placeholder)."""
    runs = []
    for k in range(2):
        args = [_meta_of(s, k) if isinstance(s, ValueSpec) else s for s in inputs]
        interpreter = ProbeInterpreter(sub)
        try:
            with torch.no_grad():
                interpreter.run(*args)
        except Exception:  # noqa: BLE001 - the graph cannot run on meta: keep the module opaque
            return None
        runs.append(interpreter.values)
    dims = [d for s in inputs if isinstance(s, ValueSpec) for d in (s.dims or s.shape or ())
            if isinstance(d, DynamicDim)]
    return {n: _spec_of(runs[0][n], runs[1][n], dims) for n in sub.graph.nodes}


def _arguments(node: fx.Node, sub: fx.GraphModule) -> list | None:
    """The call's arguments in the order of ``sub``'s placeholders (positional only)."""
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if node.kwargs or len(node.args) > len(placeholders):
        return None
    args = list(node.args)
    for p in placeholders[len(args):]:
        if not p.args:  # no default value
            return None
        args.append(p.args[0])
    return args


def _splice(root: nn.Module, graph: fx.Graph, node: fx.Node, sub: fx.GraphModule, args: list,
            specs: dict) -> None:
    prefix = node.target
    env: dict[fx.Node, object] = {}
    placeholders = iter(args)
    with graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(placeholders)
                continue
            if n.op == "output":
                result = fx.node.map_arg(n.args[0], lambda a: env[a])
                break
            target = f"{prefix}.{n.target}" if n.op in ("call_module", "get_attr") else n.target
            new = graph.create_node(n.op, target, fx.node.map_arg(n.args, lambda a: env[a]),
                                    fx.node.map_arg(n.kwargs, lambda a: env[a]), name=f"{node.name}_{n.name}")
            if specs.get(n) is not None:
                new.meta["tg_spec"] = specs[n]
            env[n] = new
    if isinstance(result, fx.Node):
        node.replace_all_uses_with(result)
    else:  # a tuple/list/dict result: its getitem users read the inlined values directly
        for user in list(node.users):
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
    graph.erase_node(node)


def _structured_users_ok(node: fx.Node, sub: fx.GraphModule) -> bool:
    out = next(n for n in reversed(sub.graph.nodes) if n.op == "output").args[0]
    if isinstance(out, fx.Node):
        return True
    for user in node.users:
        if not (user.op == "call_function" and getattr(user.target, "__name__", "") == "getitem"
                and len(user.args) == 2 and isinstance(user.args[1], (int, str))):
            return False
        key = user.args[1]
        if isinstance(out, dict) and key not in out:  # (a recorded ModelOutput is read by field name)
            return False
        if not isinstance(out, dict) and (not isinstance(key, int) or not -len(out) <= key < len(out)):
            return False
    return True


def inline_modules(root: nn.Module, graph: fx.Graph) -> int:
    """Replace calls of containers, ``tg.Model`` s and custom modules by their traced graphs (down
    to ``torch.nn`` layers). Returns how many calls were inlined.

    A spliced graph may bring calls of its own (a submodule fx left opaque inside a traced parent,
    a nested ``tg.Model``): they are tried in turn, until no new call is left."""
    count = 0
    tried: set[fx.Node] = set()
    while True:
        pending = [n for n in graph.nodes if n.op == "call_module" and n not in tried]
        if not pending:
            return count
        for node in pending:
            tried.add(node)
            count += _inline_call(root, graph, node)


# NOTE: [Parents of untraceable modules] When fx traces a module but leaves one of its submodules
# opaque (torchtitan's LLaMA: the transformer traces, its attention iterates `*xq.shape[:-1]`), that
# submodule is tried on its own next, with the arguments the parent's trace gives it. Those may be
# values a recording cannot take as inputs: the attention gets the rotary table, a buffer without a
# batch dim (`self.freqs_cis`), so it stayed one call, its SDPA and norms out of every pass's reach
# (torchtitan's LLaMA 3 at d256: 1.51x eager instead of 1.88x). A recording of the parent reads such
# buffers where they live, so the parent is recorded instead, and its fx trace kept only where the
# recording fails. (A recording costs more optimize time than a trace: only these parents pay it.)
def _inline_call(root: nn.Module, graph: fx.Graph, node: fx.Node) -> bool:
    """Inline one ``call_module`` node if its module can be traced or recorded and checks out."""
    module = root.get_submodule(node.target)
    if is_torch_layer(module):
        return False
    sub = None if node.kwargs else _trace(module, node.args)
    recorded = None
    if (sub is None or sub.meta.get("tg_left_opaque")) and not isinstance(module, fx.GraphModule):
        recorded = record_for_inlining(module, node)  # NOTE: [Recorded inlining]
    if recorded is not None:
        sub, args = recorded
    elif sub is None:
        return False
    else:
        args = _arguments(node, sub)
    if args is None or not _structured_users_ok(node, sub):
        return False
    inputs = [a.meta.get("tg_spec") if isinstance(a, fx.Node) else a for a in args]
    if any(isinstance(a, fx.Node) and not isinstance(s, ValueSpec) for a, s in zip(args, inputs)):
        return False
    specs = _probe_specs(sub, inputs)
    if specs is None or not _same_output(node, sub, specs):
        return False
    if recorded is not None:  # the recording takes the module's place, with the same submodules
        root.set_submodule(node.target, sub)
    _splice(root, graph, node, sub, args, specs)
    return True


def _same_output(node: fx.Node, sub: fx.GraphModule, specs: dict) -> bool:
    """Whether the inlined graph's output has the probe shapes recorded for the call."""
    out = next(n for n in reversed(sub.graph.nodes) if n.op == "output").args[0]
    recorded = node.meta.get("tg_spec")
    if isinstance(out, fx.Node):
        spec = specs.get(out)
        return isinstance(recorded, ValueSpec) and spec is not None and spec.probes == recorded.probes \
            and spec.dtype == recorded.dtype
    for user in node.users:  # structured outputs: each item as its getitem user recorded it
        item, recorded = out[user.args[1]], user.meta.get("tg_spec")
        if isinstance(item, fx.Node) and isinstance(recorded, ValueSpec):
            spec = specs.get(item)
            if spec is None or spec.probes != recorded.probes or spec.dtype != recorded.dtype:
                return False
    return True
