"""fit's Keras data arguments: generators, steps_per_epoch, validation_steps/_freq, class/sample weights."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0, classes=3):
    torch.manual_seed(seed)
    x = tg.Input(shape=(4,))
    return tg.Model(x, nn.Linear(16, classes)(F.relu(nn.Linear(4, 16)(x))))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x[:, :3].argmax(1)


def _frozen(model, **kw):
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss="cross_entropy", **kw)
    return model


def _batches(x, y, size=16):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


# ---------------------------------------------------------------------- generators and iterables

def test_generator_trains_like_the_same_batches_as_tensors():
    """A generator of (x, y) batches gives the same weights as the same batches from tensors."""
    x, y = _data()
    a, b = _mlp(), _mlp()
    for m in (a, b):
        m.compile(optimizer=torch.optim.SGD(m.parameters(), lr=0.1), loss="cross_entropy", metrics=["accuracy"])
    ha = a.fit((batch for batch in _batches(x, y)), verbose=0)
    hb = b.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    assert ha.history == pytest.approx(hb.history)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


class _Reiterable:
    """An object with __iter__ (not an iterator): every epoch starts over."""

    def __init__(self, batches):
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)


def test_reiterable_restarts_each_epoch_and_predict_takes_iterables():
    """Any iterable of batches works; a re-iterable one is iterated once per epoch."""
    x, y = _data()
    data = _Reiterable(_batches(x, y))
    model = _frozen(_mlp())
    h = model.fit(data, epochs=3, validation_data=_Reiterable(_batches(x, y)), verbose=0)
    assert data.iterations == 3 and len(h.history["val_loss"]) == 3
    assert h.history["loss"][0] == pytest.approx(h.history["val_loss"][0])
    torch.testing.assert_close(model.predict(iter([xb for xb, _ in _batches(x, y)])), model.predict(x))
    assert model.evaluate(iter(_batches(x, y)), verbose=0)["loss"] == pytest.approx(h.history["loss"][0])


def test_generator_used_up_stops_training_with_a_warning():
    """A one-shot generator runs out after the first epoch: training stops with a warning (Keras)."""
    x, y = _data()
    model = _frozen(_mlp())
    with pytest.warns(UserWarning, match="ran out before epoch 2; training stops"):
        h = model.fit(iter(_batches(x, y)), epochs=3, verbose=0)
    assert h.epoch == [0]


def test_generator_yielding_sample_weights():
    """(x, y, sample_weight) batches weigh the loss like sample_weight= does with tensors."""
    x, y = _data()
    w = torch.rand(64, generator=torch.Generator().manual_seed(1))
    model = _frozen(_mlp())
    from_gen = model.fit(iter([(x[i:i + 16], y[i:i + 16], w[i:i + 16]) for i in range(0, 64, 16)]), verbose=0)
    from_tensors = model.fit(x, y, sample_weight=w, batch_size=16, shuffle=False, verbose=0)
    assert from_gen.history["loss"] == pytest.approx(from_tensors.history["loss"])


def test_bad_batches_from_a_generator_are_named():
    """A generator yielding inputs only, or 4-tuples, gets a clear error before any step."""
    x, y = _data(16)
    model = _frozen(_mlp())
    with pytest.raises(ValueError, match="yields inputs without targets"):
        model.fit(iter([x]), verbose=0)
    with pytest.raises(ValueError, match=r"\(x, y\) or \(x, y, sample_weight\); received a tuple of 4"):
        model.fit(iter([(x, y, y, y)]), verbose=0)
    with pytest.raises(ValueError, match="y must be None when x is a list_iterator"):
        model.fit(iter([(x, y)]), y, verbose=0)


# ---------------------------------------------------------------------- steps

def test_steps_per_epoch_on_an_endless_generator():
    """steps_per_epoch cuts an endless generator into epochs; the generator goes on between epochs."""
    x, y = _data()
    drawn = []

    def endless():
        for i in itertools.count():
            drawn.append(i)
            yield x[(i % 4) * 16:(i % 4 + 1) * 16], y[(i % 4) * 16:(i % 4 + 1) * 16]

    model = _frozen(_mlp())
    seen = []
    h = model.fit(endless(), epochs=3, steps_per_epoch=2, verbose=0,
                  callbacks=[tg.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(b))])
    assert h.epoch == [0, 1, 2] and seen == [0, 1] * 3 and drawn == list(range(6))


def test_steps_per_epoch_on_tensors_continues_then_restarts():
    """On tensors, epochs of steps_per_epoch batches continue through the data; running out ends the
    epoch early with a warning (Keras), and the next epoch starts over."""
    x, y = _data(64)
    model = _frozen(_mlp())
    counts = []
    cb = tg.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: counts.append(len(steps)))
    steps = []
    cb2 = tg.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: steps.append(b))
    with pytest.warns(UserWarning, match="ran out during epoch 2"):
        h = model.fit(x, y, batch_size=16, epochs=3, steps_per_epoch=3, shuffle=False, callbacks=[cb2, cb],
                      verbose=0)
    assert h.epoch == [0, 1, 2] and counts == [3, 4, 7]  # 3 steps, 1 (data ran out), 3 again


def test_validation_steps_and_freq():
    """validation_steps takes the first batches each time; validation_freq picks the epochs."""
    x, y = _data(64)
    model = _frozen(_mlp())
    h = model.fit(x, y, epochs=4, validation_data=(x, y), validation_steps=1, batch_size=16,
                  validation_freq=2, verbose=0)
    assert len(h.history["val_loss"]) == 2 and len(h.history["loss"]) == 4
    first = model.evaluate(x[:16], y[:16], verbose=0)["loss"]
    assert h.history["val_loss"] == pytest.approx([first, first])
    h = model.fit(x, y, epochs=4, validation_data=(x, y), validation_freq=[1, 4], verbose=0)
    assert len(h.history["val_loss"]) == 2
    assert model.evaluate(x, y, steps=1, batch_size=16, verbose=0)["loss"] == pytest.approx(first)


def test_one_shot_validation_generator_needs_validation_steps():
    """A generator as validation_data would be used up by the first validation: a clear error."""
    x, y = _data(32)
    model = _frozen(_mlp())
    with pytest.raises(ValueError, match="one-shot iterator.*Pass validation_steps"):
        model.fit(x, y, epochs=2, validation_data=iter(_batches(x, y)), verbose=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps_per_epoch=0), "steps_per_epoch must be a positive int"),
    (dict(validation_steps=1.5), "validation_steps must be a positive int"),
    (dict(validation_freq=0), "validation_freq must be a positive int"),
    (dict(validation_freq=[0, 2]), "validation_freq must be a positive int"),
])
def test_bad_step_arguments(kwargs, match):
    """Bad steps/frequency arguments name what is expected."""
    x, y = _data(16)
    with pytest.raises(ValueError, match=match):
        _frozen(_mlp()).fit(x, y, verbose=0, **kwargs)


# ---------------------------------------------------------------------- weights

def test_sample_weight_is_keras_weighted_mean():
    """The loss with sample_weight is mean(loss_i * w_i) (Keras); zero weights drop samples from the gradient."""
    x, y = _data(32)
    model = _frozen(_mlp())
    w = torch.rand(32, generator=torch.Generator().manual_seed(3))
    h = model.fit(x, y, sample_weight=w, batch_size=32, verbose=0)
    with torch.no_grad():
        per_sample = F.cross_entropy(model(x), y, reduction="none")
    assert h.history["loss"][0] == pytest.approx((per_sample * w).mean().item(), rel=1e-5)
    assert model.evaluate(x, y, sample_weight=w, verbose=0)["loss"] == pytest.approx((per_sample * w).mean().item(),
                                                                                   rel=1e-5)
    a = _mlp()
    a.compile(optimizer=torch.optim.SGD(a.parameters(), lr=0.5), loss="cross_entropy")
    a.fit(x, y, sample_weight=(torch.arange(32) < 16).float(), batch_size=32, verbose=0)
    # Weights 1 on half the batch: the loss is half the mean over that half, so one step of lr 0.5
    # equals a step of lr 0.25 on the half alone.
    for p, q in zip(a.parameters(), _scaled_step(x[:16], y[:16], lr=0.25).parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _scaled_step(x, y, lr):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return model


def test_class_weight_equals_the_matching_sample_weights():
    """class_weight={c: w} is sample_weight=w[y] (Keras); classes left out weigh 1."""
    x, y = _data(48)
    cw = {0: 0.5, 2: 3.0}
    sw = torch.tensor([cw.get(int(c), 1.0) for c in y])
    model = _frozen(_mlp())
    by_class = model.fit(x, y, class_weight=cw, shuffle=False, verbose=0).history["loss"]
    by_sample = model.fit(x, y, sample_weight=sw, shuffle=False, verbose=0).history["loss"]
    assert by_class == pytest.approx(by_sample)
    onehot = F.one_hot(y, 3).float()
    soft = model.fit(x, onehot, class_weight=cw, shuffle=False, verbose=0).history["loss"]
    assert soft == pytest.approx(by_sample, rel=1e-5)


def test_sample_weight_per_output_and_loss_modules():
    """Per-output weights by name; an nn.Module loss is weighted through its reduction='none' copy."""
    torch.manual_seed(0)
    x = tg.Input(shape=(4,))
    h = F.relu(nn.Linear(4, 8)(x))
    model = tg.Model(x, {"cls": nn.Linear(8, 3)(h), "reg": nn.Linear(8, 1)(h)})
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss={"cls": loss, "reg": "mse"})
    xs, ys = _data(32)
    w = torch.rand(32, generator=torch.Generator().manual_seed(2))
    target = {"cls": ys, "reg": xs[:, :1]}
    hist = model.fit(xs, target, sample_weight={"cls": w}, batch_size=32, verbose=0).history
    with torch.no_grad():
        out = model(xs)
    expected_cls = (F.cross_entropy(out["cls"], ys, label_smoothing=0.1, reduction="none") * w).mean()
    assert hist["cls_loss"][0] == pytest.approx(expected_cls.item(), rel=1e-5)
    assert hist["reg_loss"][0] == pytest.approx(F.mse_loss(out["reg"], xs[:, :1]).item(), rel=1e-5)
    assert loss.reduction == "mean"  # the user's module is untouched


def test_weight_errors_are_clear():
    """class_weight with sample_weight, on several outputs, bad keys; a loss without per-sample values."""
    x, y = _data(16)
    model = _frozen(_mlp())
    with pytest.raises(ValueError, match="got both class_weight and sample_weight"):
        model.fit(x, y, class_weight={0: 2.0}, sample_weight=torch.ones(16), verbose=0)
    with pytest.raises(ValueError, match="class_weight keys must be class indices"):
        model.fit(x, y, class_weight={"a": 2.0}, verbose=0)
    with pytest.raises(ValueError, match=r"x and y hold different numbers of samples .*sample_weight has 15"):
        model.fit(x, y, sample_weight=torch.ones(15), verbose=0)
    model.compile(loss=lambda pred, target: F.cross_entropy(pred, target))
    with pytest.raises(ValueError, match="need per-sample losses.*reduction='none'"):
        model.fit(x, y, sample_weight=torch.ones(16), verbose=0)
    xin = tg.Input(shape=(4,))
    two = tg.Model(xin, [nn.Linear(4, 3)(xin), nn.Linear(4, 3)(xin)])
    two.compile(loss="cross_entropy")
    with pytest.raises(ValueError, match="class_weight works with one output; this model has 2"):
        two.fit(x, [y, y], class_weight={0: 2.0}, verbose=0)
