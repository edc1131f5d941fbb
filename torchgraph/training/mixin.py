"""``TrainingMixin``: the Keras training API on ``tg.Model`` (``compile``, ``fit``, ``evaluate``, ...).

The methods are thin: each documents the API and calls the module that implements it
(``configure``, ``fit_loop``, ``evaluation``, ``batch_api``, ``weights``).
"""

from __future__ import annotations

import os

import torch

from ..callbacks import History
from .batch_api import predict_on_batch, test_on_batch, train_on_batch
from .configure import TRAINING_KWARGS, compile_arguments, configure
from .evaluation import evaluate, predict
from .fit_loop import fit
from .state import state_of
from .weights import load_weights, save_weights

__all__ = ["TrainingMixin"]


class TrainingMixin:
    """Keras-style training for an ``nn.Module`` (a base of tg.Model).

    Example:
        >>> import torch, torch.nn as nn, torchgraph as tg
        >>> x = tg.Input(shape=(4,))
        >>> model = tg.Model(x, nn.Linear(4, 3)(x))
        >>> model.compile(optimizer="adam", loss="cross_entropy", metrics=["accuracy"])
        >>> history = model.fit(torch.randn(64, 4), torch.randint(0, 3, (64,)), epochs=2, verbose=0)
        >>> sorted(history.history)
        ['accuracy', 'loss']
        >>> sorted(model.evaluate(torch.randn(16, 4), torch.randint(0, 3, (16,)), verbose=0))
        ['accuracy', 'loss']
        >>> model.predict(torch.randn(5, 4)).shape
        torch.Size([5, 3])
        >>> model.count_params()
        15
    """

    # ------------------------------------------------------------------ state kept outside __dict__
    @property
    @torch.jit.unused
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer set by ``compile`` (None before): use it in custom loops and LR schedulers."""
        cfg = state_of(self).config
        return None if cfg is None else cfg.optimizer

    @property
    @torch.jit.unused
    def stop_training(self) -> bool:
        """Set to True (e.g. from a callback) to end ``fit`` after the current batch or epoch."""
        return state_of(self).stop_training

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        state_of(self).stop_training = bool(value)

    # ------------------------------------------------------------------ compile
    def compile(self, *args, **kwargs):
        """Configure training (Keras style), or torch.compile the model in place (PyTorch style).

        The rule: with a positional argument or any of ``optimizer``, ``loss``, ``metrics``,
        ``loss_weights``, ``device``, ``amp``, ``clipnorm``, ``clipvalue``, ``global_clipnorm``,
        ``gradient_accumulation_steps`` it configures training; otherwise (no arguments, or only
        torch.compile's ``backend``/``mode``/``fullgraph``/``dynamic``/``options``/...) it is
        ``nn.Module.compile``. The two combine: ``model.compile(mode="max-autotune")`` then
        ``model.compile(optimizer="adam", loss="mse")`` trains the torch-compiled forward.

        Args:
            optimizer: ``"adam"`` (default), ``"adamw"``, ``"sgd"``, ``"rmsprop"``, ``"adagrad"``,
                ``"adamax"``, ``"nadam"``, ``"radam"`` (default learning rates as in Keras), a
                ``torch.optim.Optimizer`` built on this model's parameters, or a callable
                ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``).
            loss: a name (``"cross_entropy"``, ``"mse"``, ``"mae"``, ``"bce_with_logits"``, ``"bce"``,
                ``"nll"``, ``"huber"``, ``"smooth_l1"``...), an ``nn.Module`` or a callable
                ``loss(prediction, target)`` (PyTorch argument order), or for several outputs a dict
                (by output name, or by the name of the layer producing the output) or a list.
            metrics: names (``"accuracy"``, ``"mae"``, ``"mse"``, and from torchmetrics
                ``"precision"``, ``"recall"``, ``"f1_score"``, ``"auroc"``, ``"top_5_accuracy"``,
                ``"r2_score"``...), torchmetrics metric objects, or callables ``metric(prediction,
                target) -> batch mean``; a list applies to every output; a dict maps outputs to
                metrics; a list of lists gives each output its own.
            loss_weights: a dict (or list) of weights per output for the total loss.
            device: ``"auto"`` (CUDA when available, else CPU), or any torch device. The model
                moves there now; batches move there one at a time.
            amp: mixed precision with ``torch.autocast``: ``False`` (default), ``True`` (bfloat16 on
                CPU, float16 with a GradScaler on CUDA), ``"bf16"`` or ``"fp16"``.
            clipnorm: rescale each gradient tensor to a norm of at most this (Keras semantics: per
                tensor). global_clipnorm: rescale all gradients together (``clip_grad_norm_``).
                clipvalue: clamp every gradient element to ``[-clipvalue, clipvalue]``. At most one.
            gradient_accumulation_steps: update the weights every N batches with the mean of their
                gradients (an effective batch N times larger).

        Raises:
            TypeError: training and torch.compile keywords mixed, or a bad optimizer.
            ValueError: an unknown loss or metric name, names that are not outputs, bad clipping or
                accumulation values.
        """
        if not args and not (kwargs.keys() & TRAINING_KWARGS):
            return super().compile(**kwargs)
        other = sorted(kwargs.keys() - TRAINING_KWARGS)
        if other:
            raise TypeError(
                f"{self._get_name()}.compile: got training arguments together with {other}. Expected "
                f"either training arguments {sorted(TRAINING_KWARGS)} (Keras style) or torch.compile "
                "arguments (PyTorch style). Call compile twice to do both."
            )
        state = state_of(self)
        state.config = configure(self, *args, **kwargs)
        state.compile_arguments = compile_arguments(self, *args, **kwargs)
        state.batch = {}

    # ------------------------------------------------------------------ fit / evaluate / predict
    def fit(self, x=None, y=None, batch_size: int = 32, epochs: int = 1, verbose="auto", callbacks=None,
            validation_split: float = 0.0, validation_data=None, shuffle: bool = True, class_weight=None,
            sample_weight=None, initial_epoch: int = 0, steps_per_epoch=None, validation_steps=None,
            validation_freq=1, *, distributed: bool | None = None) -> History:
        """Train for ``epochs`` epochs; return a ``History`` (``history.history["loss"]``, ...).

        The arguments and their order are Keras'.

        Args:
            x: inputs: a tensor (or NumPy array); a list/tuple or dict of them for several inputs;
                a ``Dataset``/``DataLoader``; or any iterable of batches, e.g. a Python generator,
                yielding ``(x, y)`` or ``(x, y, sample_weight)`` (then ``y`` is None).
            y: targets: a tensor, or a list/dict by output name for several outputs.
            batch_size: samples per step (ignored for data that yields batches).
            epochs: the epoch to stop at (counted from 1; with ``initial_epoch`` the run is
                ``epochs - initial_epoch`` epochs long).
            verbose: ``"auto"`` (a live bar in a terminal or Jupyter, one line per epoch in a file or
                pipe), 0 (silent), 1 (bar), 2 (one line per epoch).
            callbacks: ``tg.callbacks.Callback`` instances.
            validation_split: the fraction of the tensors (taken from the end, before shuffling)
                held out for validation.
            validation_data: ``(x_val, y_val)``, ``(x_val, y_val, sample_weight)``, a Dataset, a
                DataLoader or a generator; its loss and metrics appear as ``val_*``.
            shuffle: reshuffle the training samples every epoch.
            class_weight: ``{class index: weight}``: weights each sample's loss by its class (one
                output only; not with ``sample_weight``).
            sample_weight: per-sample weights (shape ``(N,)``, or the targets' shape), or a dict/list
                of them per output; each loss becomes ``mean(loss_i * weight_i)``, as in Keras.
            initial_epoch: the epoch to start from (to resume a run).
            steps_per_epoch: batches per epoch. The data is not restarted between epochs (a generator
                goes on; tensors continue where the last epoch stopped), as in Keras.
            validation_steps: batches per validation (the first ones each time; a generator goes on).
            validation_freq: validate every N epochs (an int), or after the epochs listed (from 1).
            distributed: use DistributedDataParallel. None (default): when a process group with
                more than one process is initialised (e.g. under torchrun). True: also initialise one
                from torchrun's environment when needed.

        Returns:
            History: ``.history`` maps ``loss``, metric names and ``val_*`` to per-epoch lists.

        Raises:
            RuntimeError: the model is not compiled for training.
            ValueError / TypeError: data of the wrong structure, lengths or dtypes, or targets that do
                not fit the loss; raised before the first optimizer step.
        """
        return fit(self, x, y, batch_size, epochs, verbose, callbacks, validation_split, validation_data,
                   shuffle, class_weight, sample_weight, initial_epoch, steps_per_epoch, validation_steps,
                   validation_freq, distributed)

    def evaluate(self, x=None, y=None, batch_size: int = 32, verbose="auto", sample_weight=None, steps=None,
                 callbacks=None, *, distributed: bool | None = None) -> dict:
        """Loss and metrics over ``x``/``y`` in eval mode under ``no_grad``: ``{"loss": ..., ...}``.

        Accepts the same data as ``fit`` (and ``sample_weight``); ``steps`` caps the batches. Under
        torch.distributed each rank evaluates its share and the results are combined. The model's
        previous train/eval modes are restored.
        """
        return evaluate(self, x, y, batch_size, verbose, sample_weight, steps, callbacks, distributed)

    def predict(self, x, batch_size: int = 32, verbose=0, steps=None, callbacks=None):
        """The model's outputs for ``x``, batch by batch in eval mode under ``no_grad``, on the CPU.

        Returns the model's output structure (a tensor, a list/tuple or a dict of tensors) with all
        batches concatenated. ``x`` is like ``fit``'s; data yielding batches may yield ``x`` or
        ``(x, y)``. Needs no ``compile``: it runs on the device of the model's parameters.
        """
        return predict(self, x, batch_size, verbose, steps, callbacks)

    # ------------------------------------------------------------------ one batch
    def train_on_batch(self, x, y=None, sample_weight=None, class_weight=None, return_dict: bool = False,
                       reset_metrics: bool = True):
        """One optimizer step on the batch ``x``/``y`` (Keras).

        Returns:
            The loss (a float) when there are no metrics, else ``[loss, *metrics]`` (floats in the
            order of ``fit``'s logs), or that dict with ``return_dict=True``. With
            ``reset_metrics=False`` the values are running means over the calls since the last
            reset (``model.reset_metrics()`` or a call with ``reset_metrics=True``).
        """
        return train_on_batch(self, x, y, sample_weight, class_weight, return_dict, reset_metrics)

    def test_on_batch(self, x, y=None, sample_weight=None, return_dict: bool = False, reset_metrics: bool = True):
        """Loss and metrics on the batch ``x``/``y`` in eval mode, without a step; like ``train_on_batch``."""
        return test_on_batch(self, x, y, sample_weight, return_dict, reset_metrics)

    def predict_on_batch(self, x):
        """The model's outputs for the batch ``x``, in eval mode under ``no_grad``, on the CPU."""
        return predict_on_batch(self, x)

    def reset_metrics(self) -> None:
        """Forget the running values of ``train_on_batch`` / ``test_on_batch`` (``reset_metrics=False``)."""
        state = state_of(self)
        state.batch = {k: v for k, v in state.batch.items() if k not in ("train", "test")}

    # ------------------------------------------------------------------ files
    def save(self, filepath, overwrite: bool = True) -> None:
        """Save architecture and weights to one file with ``tg.save`` (load it with ``tg.load``).

        The training configuration is not saved (call ``compile`` after loading); to resume
        training with the optimizer's state, use ``tg.callbacks.BackupAndRestore`` or
        ``torchgraph.training.save_checkpoint``.
        """
        from ..saving import save

        path = os.fspath(filepath)
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{self._get_name()}.save: '{path}' exists and overwrite=False. Pass "
                                  "overwrite=True or another path.")
        save(self, path)

    def save_weights(self, filepath, overwrite: bool = True) -> None:
        """Save the weights (``state_dict``) to a safetensors file, atomically.

        Load them with ``model.load_weights(filepath)``, or with
        ``safetensors.torch.load_model(model, filepath)``.
        """
        save_weights(self, filepath, overwrite)

    def load_weights(self, filepath) -> None:
        """Load weights saved by ``save_weights``, ``save``/``tg.save`` or a training checkpoint.

        Keys and shapes must match this model exactly; on a mismatch nothing is loaded and the
        ValueError names the keys that differ.
        """
        load_weights(self, filepath)

    def count_params(self) -> int:
        """The number of parameters (trainable or not, each shared one once), as in Keras.

        Buffers such as BatchNorm's running statistics are not parameters in PyTorch and are not
        counted (``summary()`` lists them apart).
        """
        return sum(p.numel() for p in self.parameters())  # parameters() lists a shared one once
