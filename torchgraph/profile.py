"""Where a model's time goes, node by node: :func:`profile`."""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from .fused import attention as _attention
from .fused import key_padding as _key_padding
from .fused import conv as _conv
from .fused import conv_expand as _conv_expand
from .fused import linear as _linear

__all__ = ["ModelProfile", "NodeTime", "profile"]


@dataclass(frozen=True)
class NodeTime:
    """One node of a profiled graph.

    Attributes:
        name: The node's name in ``model.graph`` (what ``model.code`` calls its value).
        target: What the node calls: a function's or method's name, or a module's class.
        route: For a fused convolution, the kernel its plan runs (``"GEMM, 2048 rows"`` on oneDNN or MKL,
            ``"GEMM kernel, 2048 rows"`` on ``ops.gemm_act_inference``, ``"depthwise kernel"``,
            ``"Winograd kernel"``, ``"oneDNN convolution"``); otherwise ``""``.
        ms: Median milliseconds per call.
        macs: Multiply-adds per call (convolutions, linears, matrix products, attention); 0 where none
            are counted.
    """

    name: str
    target: str
    route: str
    ms: float
    macs: int

    @property
    def gflops(self) -> float:
        """Billions of floating-point operations per second (2 per multiply-add); 0 where none are counted."""
        return 2 * self.macs / self.ms / 1e6 if self.ms > 0 else 0.0


@dataclass(frozen=True)
class ModelProfile:
    """What :func:`profile` measured. ``str()`` gives the table, slowest node first.

    Attributes:
        nodes: Every node that computes, in graph order.
        forward_ms: Median milliseconds of a plain call of the model. It differs from the nodes' sum by
            the per-node timer's cost (a few microseconds a node) and by run-to-run noise, either way
            (ResNet-50: 56.0 ms summed, 58.1 a call; the GPT stack 55.1 and 59.4).
    """

    nodes: list[NodeTime]
    forward_ms: float

    @property
    def nodes_ms(self) -> float:
        """The nodes' times summed."""
        return sum(n.ms for n in self.nodes)

    def by_target(self) -> dict[str, float]:
        """Milliseconds per target (``"conv2d_act"``, ``"Linear"``, ...), largest first."""
        totals: dict[str, float] = {}
        for n in self.nodes:
            totals[n.target] = totals.get(n.target, 0.0) + n.ms
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    def table(self, top: int | None = 20) -> str:
        """The ``top`` slowest nodes (all with ``None``) as a text table."""
        rows = sorted(self.nodes, key=lambda n: -n.ms)[:top]
        total = self.nodes_ms or 1.0
        width = max([len(n.name) for n in rows] + [4])
        lines = [f"{'node':<{width}}  {'runs':<22} {'route':<22} {'ms':>8} {'share':>6} {'MMACs':>9} "
                 f"{'GFLOP/s':>8}"]
        for n in rows:
            macs = f"{n.macs / 1e6:9.1f}" if n.macs else f"{'-':>9}"
            rate = f"{n.gflops:8.1f}" if n.macs else f"{'-':>8}"
            lines.append(f"{n.name:<{width}}  {n.target[:22]:<22} {n.route[:22]:<22} {n.ms:8.3f} "
                         f"{n.ms / total:6.1%} {macs} {rate}")
        lines.append(f"{len(self.nodes)} nodes, {self.nodes_ms:.2f} ms timed one by one; a plain call "
                     f"{self.forward_ms:.2f} ms")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def profile(model: fx.GraphModule, *args, reps: int = 10, warmup: int = 2, **kwargs) -> ModelProfile:
    """Times each node of ``model`` (a ``tg.Model``, ``tg.optimize``'s result, any ``fx.GraphModule``).

    The graph runs ``warmup + reps`` times under ``torch.no_grad()``, one node at a time, each node's call
    timed alone (medians over the ``reps``), and ``reps`` plain calls give the whole forward's time. For
    a model from :func:`torchgraph.optimize` the table names what each fused convolution runs, so it
    shows where the time goes after the rewrites and which kernels they chose. Multiply-adds are counted
    from the shapes of fused ops and with ``torch.utils.flop_counter`` for the rest.

    Args:
        model: The graph to time; it is run, not changed.
        *args: Its inputs, as for a call (``**kwargs`` too).
        reps: Timed runs (medians).
        warmup: Untimed runs first (plans, caches).

    Returns:
        A :class:`ModelProfile`; ``print()`` it for the table.

    Raises:
        TypeError: If ``model`` is not an ``fx.GraphModule`` (bring a plain module in with
            ``tg.from_module`` first).

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(3, 32, 32))
        >>> h = nn.ReLU()(nn.BatchNorm2d(16)(nn.Conv2d(3, 16, 3, padding=1)(x)))
        >>> model = tg.Model(x, nn.Conv2d(16, 32, 1)(h).relu().mean(dim=(2, 3))).eval()
        >>> report = tg.profile(tg.optimize(model), torch.randn(2, 3, 32, 32), reps=3)
        >>> [(n.target, n.route) for n in report.nodes]  # doctest: +SKIP
        [('conv2d_act', 'oneDNN convolution'), ('conv2d_act', 'GEMM, 2048 rows'), ('mean', '')]
        >>> report.nodes[1].macs == 2 * 32 * 32 * 32 * 16  # batch x out x H x W x in
        True
        >>> print(report)  # doctest: +SKIP
        node           runs                   route                        ms  share     MMACs  GFLOP/s
        conv2d_relu    conv2d_act             oneDNN convolution        0.154  48.6%       0.9     11.5
        conv2d_1_relu  conv2d_act             GEMM, 2048 rows           0.120  38.1%       1.0     17.4
        mean           mean                                             0.042  13.2%         -        -
        3 nodes, 0.32 ms timed one by one; a plain call 0.29 ms
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"tg.profile: expected a tg.Model or another torch.fx.GraphModule; received "
                        f"{type(model).__name__}. Bring a plain module in first: "
                        f"tg.profile(tg.from_module(module, inputs), ...).")
    if reps < 1 or warmup < 0:
        raise ValueError(f"tg.profile: reps must be >= 1 and warmup >= 0; received reps={reps}, "
                         f"warmup={warmup}.")
    timer = _NodeTimer(model)
    with torch.no_grad():
        for _ in range(warmup):
            model(*args, **kwargs)
        timer.counting = True
        timer.run_with(args, kwargs)  # counts multiply-adds and finds routes (untimed)
        timer.counting = False
        timer.times.clear()
        for _ in range(reps):
            timer.run_with(args, kwargs)
        forward = []
        for _ in range(reps):
            start = time.perf_counter()
            model(*args, **kwargs)
            forward.append(time.perf_counter() - start)
    nodes = [NodeTime(n.name, _target_name(model, n), timer.routes.get(n.name, ""),
                      statistics.median(timer.times[n.name]) * 1e3, timer.macs.get(n.name, 0))
             for n in model.graph.nodes if n.name in timer.times]
    return ModelProfile(nodes, statistics.median(forward) * 1e3)


class _NodeTimer(fx.Interpreter):
    """Runs the graph node by node, timing each computing call (not fetching its arguments)."""

    def __init__(self, model: fx.GraphModule):
        super().__init__(model)
        self.times: dict[str, list[float]] = {}
        self.macs: dict[str, int] = {}
        self.routes: dict[str, str] = {}
        self.counting = False
        self._node: fx.Node | None = None

    def run_with(self, args, kwargs):
        # NOTE: fx.Interpreter.run takes positional inputs only: keyword inputs are bound to the
        # placeholders by the generated forward's signature, as a call would bind them (an unknown
        # name raises the call's TypeError).
        bound = inspect.signature(self.module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return self.run(*bound.arguments.values())

    def run_node(self, n: fx.Node):
        self._node = n
        return super().run_node(n)

    def _timed(self, call, target, args, kwargs):
        n = self._node
        if self.counting:
            with FlopCounterMode(display=False) as counter:
                result = call(target, args, kwargs)
            self.macs[n.name] = _fused_macs(n, target, args, result) or counter.get_total_flops() // 2
            route = _conv_route(target, args)
            if route:
                self.routes[n.name] = route
            return result
        start = time.perf_counter()
        result = call(target, args, kwargs)
        self.times.setdefault(n.name, []).append(time.perf_counter() - start)
        return result

    def call_function(self, target, args, kwargs):
        return self._timed(super().call_function, target, args, kwargs)

    def call_method(self, target, args, kwargs):
        return self._timed(super().call_method, target, args, kwargs)

    def call_module(self, target, args, kwargs):
        return self._timed(super().call_module, target, args, kwargs)


def _target_name(model: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(model.get_submodule(n.target)).__name__
    if n.op == "call_method":
        return n.target
    return getattr(n.target, "__name__", str(n.target))


def _fused_macs(n: fx.Node, target, args, result) -> int:
    """Multiply-adds of torchgraph's fused calls, whose kernels the flop counter does not know."""
    if not isinstance(result, torch.Tensor) or n.op != "call_function":
        return 0
    if target is _linear.linear_act:
        weight = args[1]
    elif target in (_conv.conv2d_act, _conv.conv2d_add_act):
        weight = _conv_weight(target, args)
    elif target is _conv_expand.conv2d_expand_depthwise:  # the expansion's GEMM and the depthwise filters
        x, expand_weight, weight = args[0], args[1], args[4]
        return x.shape[0] * x.shape[2] * x.shape[3] * expand_weight.numel() + result.numel() * weight[0].numel()
    elif target in (_attention.qkv_attention, _key_padding.qkv_attention_with_padding):
        batch, seq, width = args[0].shape
        return 2 * batch * seq * seq * (width // 3)  # Q K^T and P V over every head
    elif target is _key_padding.qkv_attention_on_rows:  # (N, 3E) rows of a (B, T) padding mask's tokens
        batch, seq = args[2].shape
        return 2 * batch * seq * seq * (args[0].shape[-1] // 3)
    elif target is _attention.scaled_dot_product_attention:
        query, key, value = args[:3]
        return query.shape[:-1].numel() * key.shape[-2] * (query.shape[-1] + value.shape[-1])
    else:
        return 0
    if not isinstance(weight, torch.Tensor):
        return 0
    per_output = weight[0].numel()  # (out, in / groups, kh, kw) or (out, in)
    return result.numel() * per_output


def _conv_weight(target, args):
    """The filters of a fused convolution call (conv2d_add_act takes the residual second), else None."""
    if target is _conv.conv2d_act:
        return args[1]
    return args[2] if target is _conv.conv2d_add_act else None


def _conv_route(target, args) -> str:
    if target is _conv_expand.conv2d_expand_depthwise:
        return _conv_expand._route(*args)
    weight = _conv_weight(target, args)
    return _conv._planned_route(weight) if isinstance(weight, torch.Tensor) else ""
