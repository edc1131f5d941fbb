"""compile(clipnorm/global_clipnorm/clipvalue, gradient_accumulation_steps) and on_before_optimizer_step."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    x = tg.Input(shape=(4,))
    return tg.Model(x, nn.Linear(16, 3)(torch.tanh(nn.Linear(4, 16)(x))))


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x[:, :3].argmax(1)


def _handwritten(model, groups, lr):
    """SGD steps by hand: one step per group of batches, with the mean of the batches' gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for group in groups:
        opt.zero_grad()
        for xb, yb in group:
            (F.cross_entropy(model(xb), yb) / len(group)).backward()
        opt.step()


@pytest.mark.parametrize("n", [32, 40])
def test_accumulation_equals_the_mean_gradient_of_each_group(n):
    """4 batches of 8 accumulated make one step with their mean gradient; a short last group
    (40 samples: 4 + 1 batches) is averaged over the batches it has."""
    x, y = _data(n)
    model, reference = _mlp(), _mlp()
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.5), loss="cross_entropy",
                  gradient_accumulation_steps=4)
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]
    _handwritten(reference, [batches[i:i + 4] for i in range(0, len(batches), 4)], lr=0.5)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulation_of_equal_batches_equals_one_big_batch():
    """Mean losses over equal batches: accumulating 4 x 8 equals one batch of 32."""
    x, y = _data(32)
    small, big = _mlp(), _mlp()
    small.compile(optimizer=torch.optim.SGD(small.parameters(), lr=0.5), loss="cross_entropy",
                  gradient_accumulation_steps=4)
    big.compile(optimizer=torch.optim.SGD(big.parameters(), lr=0.5), loss="cross_entropy")
    small.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    big.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    for a, b in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _Grads(tg.callbacks.Callback):
    """Records the gradients each optimizer step is about to apply."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_before_optimizer_step(self, optimizer):
        assert optimizer is self.model.optimizer
        self.seen.append([p.grad.detach().clone() for p in self.model.parameters()])


def _one_step(**clip):
    """One SGD(lr=1) step on a large-gradient batch: returns (grads before clipping, weight change)."""
    model = _mlp()
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=1.0), loss="mse", **clip)
    before = [p.detach().clone() for p in model.parameters()]
    spy = _Grads()
    x = torch.randn(8, 4)
    model.fit(x, torch.full((8, 3), 50.0), batch_size=8, callbacks=[spy], verbose=0)
    assert len(spy.seen) == 1
    return spy.seen[0], [b - p.detach() for b, p in zip(before, model.parameters())]


def test_clipnorm_clips_each_tensor():
    """clipnorm (Keras): each gradient tensor g becomes g * c / max(||g||, c); the hook sees them unclipped."""
    grads, applied = _one_step(clipnorm=0.1)
    assert max(g.norm() for g in grads) > 0.1  # the case is meaningful
    for g, d in zip(grads, applied):
        torch.testing.assert_close(d, g * 0.1 / max(g.norm(), 0.1), rtol=1e-5, atol=1e-7)


def test_global_clipnorm_clips_all_gradients_together():
    """global_clipnorm: all gradients scaled by one factor, like torch.nn.utils.clip_grad_norm_."""
    grads, applied = _one_step(global_clipnorm=0.1)
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert total > 0.1
    for g, d in zip(grads, applied):
        torch.testing.assert_close(d, g * 0.1 / (total + 1e-6), rtol=1e-4, atol=1e-7)


def test_clipvalue_clamps_each_element():
    """clipvalue: each element clamped to [-c, c]."""
    grads, applied = _one_step(clipvalue=0.01)
    assert max(g.abs().max() for g in grads) > 0.01
    for g, d in zip(grads, applied):
        torch.testing.assert_close(d, g.clamp(-0.01, 0.01), rtol=1e-5, atol=1e-7)


def test_hook_runs_once_per_step_and_can_change_the_gradients():
    """on_before_optimizer_step runs once per optimizer step (per group when accumulating) and what
    it does to p.grad is what the optimizer applies."""
    model = _mlp()
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=1.0), loss="cross_entropy",
                  gradient_accumulation_steps=2)
    calls = []

    def zero(optimizer):
        calls.append(1)
        for p in model.parameters():
            p.grad.zero_()

    before = copy.deepcopy(model.state_dict())
    x, y = _data(40)
    model.fit(x, y, batch_size=8, callbacks=[tg.callbacks.LambdaCallback(on_before_optimizer_step=zero)],
              verbose=0)
    assert len(calls) == 3  # 5 batches in groups of 2: 2, 2, 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_accumulation_with_train_on_batch_steps_every_n_calls():
    """gradient_accumulation_steps=N: train_on_batch changes the weights on every N-th call."""
    model = _mlp()
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.5), loss="cross_entropy",
                  gradient_accumulation_steps=2)
    x, y = _data(16)
    w0 = model.get_layer("linear").weight.detach().clone()
    model.train_on_batch(x[:8], y[:8])
    assert torch.equal(model.get_layer("linear").weight, w0)
    model.train_on_batch(x[8:], y[8:])
    assert not torch.equal(model.get_layer("linear").weight, w0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(clipnorm=0), "clipnorm must be a positive number"),
    (dict(clipvalue=float("inf")), "clipvalue must be a positive number"),
    (dict(clipnorm=1.0, clipvalue=1.0), r"Expected at most one of clipnorm"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be a positive int"),
    (dict(gradient_accumulation_steps=2.0), "gradient_accumulation_steps must be a positive int"),
])
def test_bad_gradient_arguments_raise(kwargs, match):
    """Bad clipping or accumulation values fail at compile with what is expected."""
    with pytest.raises(ValueError, match=match):
        _mlp().compile(loss="mse", **kwargs)


def test_features_off_keep_the_handwritten_step():
    """Without clipping, accumulation or hook, fit gives exactly the handwritten loop's weights."""
    x, y = _data(32)
    model, reference = _mlp(), _mlp()
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.5), loss="cross_entropy")
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for i in range(0, 32, 8):
        loss = F.cross_entropy(reference(x[i:i + 8]), y[i:i + 8])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
