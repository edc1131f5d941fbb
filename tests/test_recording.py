"""Recording layer calls and torch functions: what gets recorded, and that it runs like eager code."""

import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg


def _eager_check(model, inputs_fn, reference_fn, batches=(1, 2, 7)):
    for b in batches:
        inputs = inputs_fn(b)
        torch.testing.assert_close(model(*inputs), reference_fn(*inputs))


def test_module_call_records_one_call_module_node():
    """A built-in layer becomes one call_module node named after its class."""
    x = tg.Input(shape=(8,))
    model = tg.Model(x, nn.Linear(8, 4)(x))
    ops = [(n.op, n.target) for n in model.graph.nodes]
    assert ops == [("placeholder", "input_1"), ("call_module", "linear"), ("output", "output")]


def test_torch_functions_operators_and_methods():
    """The functions, operators and methods listed in the core issue record and run at any batch."""
    x = tg.Input(shape=(4, 8))
    w = torch.randn(8, 5)
    outs = [
        torch.cat([x, x], dim=1), torch.stack([x, x]), F.relu(x), F.scaled_dot_product_attention(x, x, x),
        x + x, 2 * x, 1.0 - x, x @ w, x[:, :3], x[..., 0], x.view(x.size(0), -1), x.flatten(1),
        x.permute(0, 2, 1), x.mean(dim=(1, 2)), x.chunk(2, dim=-1)[1], x.split(3, dim=-1)[2], x ** 2,
        torch.where(x > 0, x, 0.0), x.reshape(x.shape[0], 32), x.new_zeros(x.size(0), 3), x.mT,
    ]
    model = tg.Model(x, outs)

    def reference(t):
        return [
            torch.cat([t, t], dim=1), torch.stack([t, t]), F.relu(t), F.scaled_dot_product_attention(t, t, t),
            t + t, 2 * t, 1.0 - t, t @ w, t[:, :3], t[..., 0], t.view(t.size(0), -1), t.flatten(1),
            t.permute(0, 2, 1), t.mean(dim=(1, 2)), t.chunk(2, dim=-1)[1], t.split(3, dim=-1)[2], t ** 2,
            torch.where(t > 0, t, 0.0), t.reshape(t.shape[0], 32), t.new_zeros(t.size(0), 3), t.mT,
        ]

    _eager_check(model, lambda b: (torch.randn(b, 4, 8),), reference)
    for sym, real in zip(outs, reference(torch.randn(7, 4, 8))):
        predicted = sym.static_shape
        assert len(predicted) == real.dim()
        assert all(p is None or p == r for p, r in zip(predicted, real.shape))


def test_tuple_returning_functions_and_modules():
    """chunk/split and modules returning tuples (GRU, MultiheadAttention, LSTM) unpack into tensors."""
    x = tg.Input(shape=(5, 8))
    a, b = x.chunk(2, dim=-1)
    out, h = nn.GRU(4, 6, batch_first=True)(a)
    att, weights = nn.MultiheadAttention(4, 2, batch_first=True)(b, b, b)
    seq, (h2, c2) = nn.LSTM(6, 3, batch_first=True)(out)
    assert h.static_shape == (1, None, 6) and weights.static_shape == (None, 5, 5)
    assert seq.static_shape == (None, 5, 3) and c2.static_shape == (1, None, 3)
    model = tg.Model(x, [h, att, seq, c2])
    for batch in (1, 3):
        results = model(torch.randn(batch, 5, 8))
        assert [tuple(r.shape) for r in results] == [(1, batch, 6), (batch, 5, 4), (batch, 5, 3), (1, batch, 3)]


def test_subclassed_module_is_one_layer():
    """A user's nn.Module subclass is recorded as one layer, not as its insides."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x, *, scale=1.0, skip=None):
            return F.gelu(self.fc(x)) * scale + skip

    block = Block()
    x = tg.Input(shape=(6,))
    model = tg.Model(x, block(x, scale=2.0, skip=x))
    assert [n.op for n in model.graph.nodes] == ["placeholder", "call_module", "output"]
    inp = torch.randn(3, 6)
    torch.testing.assert_close(model(inp), block(inp, scale=2.0, skip=inp))


def test_multi_tensor_module_and_kwargs():
    """Modules taking several tensors (positional and keyword) record all of them as inputs."""
    class Mix(nn.Module):
        def forward(self, a, b, gate=None):
            return a * torch.sigmoid(gate) + b

    a, b, g = tg.Input(shape=(3,)), tg.Input(shape=(3,)), tg.Input(shape=(3,))
    model = tg.Model([a, b, g], Mix()(a, b, gate=g))
    ins = [torch.randn(2, 3) for _ in range(3)]
    torch.testing.assert_close(model(*ins), ins[0] * torch.sigmoid(ins[2]) + ins[1])


def test_lazy_modules_are_materialised_at_build():
    """torch.nn.Lazy* layers get real parameters while the model is built."""
    x = tg.Input(shape=(3, 16, 16))
    conv = nn.LazyConv2d(8, 3)
    lin = nn.LazyLinear(5)
    y = lin(conv(x).flatten(1))
    model = tg.Model(x, y)
    assert conv.weight.shape == (8, 3, 3, 3) and lin.weight.shape == (5, 8 * 14 * 14)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_third_party_style_module_with_isinstance_checks():
    """Modules that check isinstance(x, Tensor) and read x.shape/x.device work unchanged."""
    class ThirdParty(nn.Module):
        def forward(self, x):
            assert isinstance(x, torch.Tensor)
            b, c = x.shape
            pos = torch.arange(c, device=x.device, dtype=x.dtype)
            return x + pos.expand(b, c)

    x = tg.Input(shape=(4,))
    model = tg.Model(x, ThirdParty()(x))
    torch.testing.assert_close(model(torch.zeros(3, 4)), torch.arange(4.0).expand(3, 4))


def test_building_does_not_change_parameters_or_buffers():
    """Probing never changes BatchNorm running stats, its counter, or any parameter."""
    bn, lin = nn.BatchNorm1d(8), nn.Linear(8, 8)
    block = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    before = {k: v.clone() for m in (bn, lin, block) for k, v in m.state_dict(prefix=f"{id(m)}.").items()}
    x = tg.Input(shape=(8,))
    y = block(bn(lin(bn(x))))
    after_calls = {k: v.clone() for m in (bn, lin, block) for k, v in m.state_dict(prefix=f"{id(m)}.").items()}
    tg.Model(x, y)
    for k, v in before.items():
        assert torch.equal(v, after_calls[k]), k
    assert bn.num_batches_tracked.item() == 0 and bn.training


def test_building_allocates_no_activations():
    """A model whose activations would take gigabytes builds without allocating them (meta probes)."""
    import resource

    x = tg.Input(shape=(64, 4096, 4096))  # 4 GiB per sample at float32
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    y = F.relu(x * 2 + 1).sum(dim=(2, 3))
    model = tg.Model(x, y)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert model.meta["torchgraph"]["input_names"] == ["input_1"]
    assert (rss_after - rss_before) * 1024 < 200 * 2**20


def test_no_global_patching():
    """torchgraph changes no class and registers no global hook."""
    import torch.nn.modules.module as module_mod

    call_before = nn.Module.__call__
    hooks_before = (dict(module_mod._global_forward_pre_hooks), dict(module_mod._global_forward_hooks))
    x = tg.Input(shape=(4,))
    tg.Model(x, nn.Linear(4, 4)(x))
    assert nn.Module.__call__ is call_before
    assert (dict(module_mod._global_forward_pre_hooks), dict(module_mod._global_forward_hooks)) == hooks_before
    assert not torch.overrides._get_current_function_mode_stack()
    trace_before = sys.gettrace()
    tg.Model(x, nn.ReLU()(x))
    assert sys.gettrace() is trace_before


def test_data_dependent_module_falls_back_to_a_real_probe():
    """A module using .item() or numpy cannot run on meta tensors: it is probed with small real data."""
    class DataDependent(nn.Module):
        def forward(self, x):
            sign = 1.0 if x.sum().item() >= 0 else -1.0
            return x * sign + float(x.detach().numpy().shape[1])

    x = tg.Input(shape=(5,))
    layer = DataDependent()
    y = layer(x)
    assert y.static_shape == (None, 5)
    model = tg.Model(x, y)
    inp = torch.rand(4, 5)
    torch.testing.assert_close(model(inp), layer(inp))


def test_inplace_ops_at_top_level_keep_program_order():
    """x.relu_() at the top level mutates like eager code: later uses see the mutation."""
    x = tg.Input(shape=(4,))
    h = x * 1.0
    before = h + 0
    h.relu_()
    after = h + 0
    model = tg.Model(x, [before, after])
    inp = torch.tensor([[-1.0, 2.0, -3.0, 4.0]])
    b, a = model(inp)
    torch.testing.assert_close(b, inp)
    torch.testing.assert_close(a, inp.relu())


def test_nondeterministic_module_forward_is_reported():
    """A forward that takes a different path on each call cannot be recorded: clear error."""
    class Flaky(nn.Module):
        calls = 0

        def forward(self, x):
            Flaky.calls += 1
            return torch.relu(x) if Flaky.calls % 2 else torch.sigmoid(x)

    x = tg.Input(shape=(3,))
    with pytest.raises(tg.GraphBuildError, match="Flaky"):
        Flaky()(x)


def test_internal_value_escaping_a_module_is_reported():
    """A tensor stored on a module attribute during forward cannot be used outside it."""
    class Leaky(nn.Module):
        def forward(self, x):
            self.saved = x * 2
            return x + 1

    x = tg.Input(shape=(3,))
    layer = Leaky()
    layer(x)
    with pytest.raises(tg.GraphBuildError, match="inside a module"):
        tg.Model(x, layer.saved + 1)


def test_named_tuple_returns_keep_their_fields_on_repeated_calls():
    """x.max(dim).values works every time (memoised probes keep torch's return types)."""
    x = tg.Input(shape=(4, 5))
    first, second = x.max(dim=1).values, x.max(dim=1).values
    indices = x.max(dim=1).indices
    model = tg.Model(x, [first, second, indices])
    inp = torch.randn(3, 4, 5)
    for out, ref in zip(model(inp), [inp.max(dim=1).values, inp.max(dim=1).values, inp.max(dim=1).indices]):
        torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------ issue 11: silent wrong results

class _Scale(nn.Module):
    """Reads a dynamic size before any tensor op and builds a tensor from it (issue 11's example)."""

    def forward(self, x):
        return torch.full((1,), 1.0 / x.size(1))


def test_module_reading_a_dynamic_size_first_is_recorded_not_baked():
    """A forward that only reads x.size(1) and builds a tensor from it is one layer, not a constant."""
    x = tg.Input(shape=(None,))
    scale = _Scale()
    model = tg.Model(x, x * scale(x))
    assert [n.op for n in model.graph.nodes].count("get_attr") == 0
    for t in (1, 4, 48, 200):
        inp = torch.ones(2, t)
        torch.testing.assert_close(model(inp), inp * scale(inp))


def test_module_outputs_made_from_sizes_follow_the_input():
    """arange/zeros/expand of a parameter made from sizes inside forward are the layer's outputs."""
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 1, 4))

        def forward(self, x):
            b, t, _ = x.shape
            pos = torch.arange(t, device=x.device).float()
            return self.cls.expand(b, -1, -1), pos, torch.zeros(b, t)

    layer = Positions()
    x = tg.Input(shape=(None, 4))
    cls, pos, zeros = layer(x)
    assert cls.static_shape == (None, 1, 4) and pos.static_shape == (None,) and zeros.static_shape == (None, None)
    model = tg.Model(x, [cls, pos, zeros])
    for b, t in ((1, 1), (3, 5), (2, 130)):
        inp = torch.randn(b, t, 4)
        for out, ref in zip(model(inp), layer(inp)):
            torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("kind", ["iadd", "add_", "relu_", "identity", "setitem"])
def test_inplace_ops_on_model_inputs_are_kept(kind):
    """y += x (and add_, relu_, after an nn.Identity, item assignment) changes the result like eager."""
    def program(x, y):
        if kind == "iadd":
            y += x
        elif kind == "add_":
            y.add_(x)
        elif kind == "relu_":
            y.relu_()
        elif kind == "identity":
            h = nn.Identity()(y)
            h += x
        else:
            y[:, 0] = x[:, 1]
        return y * 1

    x, y = tg.Input((3,)), tg.Input((3,))
    with warnings.catch_warnings():
        if kind != "relu_":  # x is used (relu_ really leaves it unused, and says so)
            warnings.simplefilter("error")
        else:
            warnings.simplefilter("ignore")
        model = tg.Model((x, y), program(x, y))
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    eager_a, eager_b = a.clone(), b.clone()
    expected = program(eager_a, eager_b)
    got_a, got_b = a.clone(), b.clone()
    torch.testing.assert_close(model(got_a, got_b), expected)
    torch.testing.assert_close(got_b, eager_b)  # the caller's tensor is mutated as in eager code


def test_inplace_op_on_an_input_is_kept_even_when_no_output_reads_it():
    """x.mul_(2) on an input mutates the caller's tensor like eager code, even if outputs ignore it."""
    x, y = tg.Input((3,)), tg.Input((3,))
    x.mul_(2)
    model = tg.Model([x, y], y + 1)
    a = torch.ones(2, 3)
    model(a, torch.zeros(2, 3))
    torch.testing.assert_close(a, torch.full((2, 3), 2.0))


def test_inplace_through_a_view_reaches_later_uses():
    """v = x[:, :2]; v.zero_() changes x for later reads, as in eager code."""
    def program(x):
        v = x[:, :2]
        v.zero_()
        return x.sum(dim=1)

    x = tg.Input((4,))
    model = tg.Model(x, program(x))
    inp = torch.randn(3, 4)
    torch.testing.assert_close(model(inp.clone()), program(inp.clone()))


def test_inplace_module_mutates_its_input_like_eager():
    """nn.ReLU(inplace=True) called for its side effect: later reads of its input see the mutation."""
    def program(x):
        h = x * 1
        nn.ReLU(inplace=True)(h)
        return h + 0

    x = tg.Input((4,))
    model = tg.Model(x, program(x))
    inp = torch.randn(5, 4)
    torch.testing.assert_close(model(inp), inp.relu())


def test_no_mode_is_left_on_after_building_modules_that_make_tensors():
    """The scope mode lives only during the module call; a user's own mode around the build survives."""
    from torch.overrides import TorchFunctionMode

    class Counting(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    stack = torch.overrides._get_current_function_mode_stack
    x = tg.Input(shape=(None,))
    y = _Scale()(x)
    assert not stack()  # gone as soon as the module call returned
    with Counting() as counting:
        z = _Scale()(x * y)
        assert stack() == [counting]
    model = tg.Model(x, z)
    assert not stack() and counting.calls > 0
    torch.testing.assert_close(model(torch.ones(2, 5)), torch.full((1,), 1 / 5))


def test_forward_that_fails_after_recording_started_leaves_nothing_behind():
    """A forward that raises in the original call (not in its probe runs): the error surfaces, no mode stays."""
    class FailsSecondTime(nn.Module):
        calls = 0

        def forward(self, x):
            n = x.size(1)
            FailsSecondTime.calls += 1
            if FailsSecondTime.calls > 2:  # the two probe runs pass, the original call fails
                raise RuntimeError("boom")
            return x * torch.full((1,), float(n))

    x = tg.Input(shape=(None,))
    with pytest.raises(RuntimeError, match="boom"):
        FailsSecondTime()(x)
    tg.Input(shape=(3,))  # a safe point: idle modes are removed
    assert not torch.overrides._get_current_function_mode_stack()
    model = tg.Model(x, _Scale()(x))
    assert model(torch.ones(1, 4)).shape == (1,)
