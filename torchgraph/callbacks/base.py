"""``Callback``, the base class of every callback, and ``CallbackList``, which calls the hooks."""

from __future__ import annotations

__all__ = ["Callback", "CallbackList", "HOOKS"]

HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
         "on_train_batch_end", "on_before_optimizer_step", "on_test_begin", "on_test_end",
         "on_predict_begin", "on_predict_end")


class Callback:
    """Base class: override the hooks you need. ``self.model`` and ``self.params`` are set by fit.

    ``params`` holds ``epochs``, ``steps`` (per epoch, None when unknown), ``verbose``, ``rank``
    and ``world_size``.

    ``on_before_optimizer_step(optimizer)`` runs after ``backward()`` (with gradient accumulation:
    once the gradients of all micro-batches are summed; with fp16 autocast: after unscaling) and
    before clipping and ``optimizer.step()``: read or change ``p.grad`` there.

    A callback whose progress should survive an interruption (``BackupAndRestore``) implements
    ``state_dict()`` / ``load_state_dict(state)`` with plain numbers, strings, lists and dicts.

    Example:
        >>> import torchgraph as tg
        >>> class PrintLoss(tg.callbacks.Callback):
        ...     def on_epoch_end(self, epoch, logs=None):
        ...         print(f"epoch {epoch + 1}: loss {logs['loss']:.3f}")
    """

    def __init__(self):
        self.model = None
        self.params: dict = {}

    def set_model(self, model) -> None:
        self.model = model

    def set_params(self, params: dict) -> None:
        self.params = params

    def on_train_begin(self, logs=None): pass
    def on_train_end(self, logs=None): pass
    def on_epoch_begin(self, epoch, logs=None): pass
    def on_epoch_end(self, epoch, logs=None): pass
    def on_train_batch_begin(self, batch, logs=None): pass
    def on_train_batch_end(self, batch, logs=None): pass
    def on_before_optimizer_step(self, optimizer): pass
    def on_test_begin(self, logs=None): pass
    def on_test_end(self, logs=None): pass
    def on_predict_begin(self, logs=None): pass
    def on_predict_end(self, logs=None): pass


def _overrides(cb: Callback, hook: str) -> bool:
    return getattr(getattr(cb, hook), "__func__", None) is not getattr(Callback, hook)


class CallbackList:
    """Calls each hook on every callback that overrides it (so unused batch hooks cost nothing)."""

    def __init__(self, callbacks, model=None, params: dict | None = None):
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks: expected tg.callbacks.Callback instances; received "
                                f"{type(cb).__name__}. Subclass tg.callbacks.Callback or use LambdaCallback.")
            if model is not None:
                cb.set_model(model)
            if params is not None:
                cb.set_params(params)
        self._by_hook = {h: [getattr(cb, h) for cb in self.callbacks if _overrides(cb, h)] for h in HOOKS}

    def has(self, hook: str) -> bool:
        return bool(self._by_hook[hook])

    def call(self, hook: str, *args) -> None:
        for fn in self._by_hook[hook]:
            fn(*args)
