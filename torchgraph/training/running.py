"""``Running``: an epoch's losses and metrics, accumulated on the device and read once per epoch."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .. import distributed as tgdist
from ..data import flatten_outputs
from .state import TrainingConfig

__all__ = ["Running"]


class Running(Mapping):
    """Epoch sums on the device. As a Mapping it gives running means (0-dim tensors) to batch hooks.

    Losses and built-in metrics are sums of ``batch mean * batch size``; torchmetrics metrics keep
    their own state (reset here, computed in ``result``).
    """

    def __init__(self, cfg: TrainingConfig, device: torch.device):
        names = ["loss"]
        self.per_output = len(cfg.info.output_names) > 1  # one loss per output besides the total
        if self.per_output:
            names += [f"{e.output}_loss" for e in cfg.losses]
        self.summed = len(names) + sum(m.fn is not None for m in cfg.metrics)
        names += [m.name for m in cfg.metrics if m.fn is not None]
        self.states = [(m.name, m.state) for m in cfg.metrics if m.state is not None]
        for _, state in self.states:
            state.reset()
        names += [name for name, _ in self.states]
        self.names = names
        self.sums = [torch.zeros((), device=device) for _ in range(self.summed)]
        self.count = 0
        self._index = {n: i for i, n in enumerate(names)}

    def __getitem__(self, key):
        i = self._index[key]
        if i < self.summed:
            return self.sums[i] / max(self.count, 1)
        return self.states[i - self.summed][1].local()

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def add(self, cfg: TrainingConfig, out, ys, parts, n: int) -> None:
        """Adds per-output losses and metrics (times the batch size ``n``) to the sums."""
        sums = self.sums
        k = 1
        if parts is not None and self.per_output:
            for p in parts:
                sums[k].add_(p.detach(), alpha=n)
                k += 1
        if not cfg.metrics:
            return
        with torch.no_grad():
            if cfg.info.single:
                flat, ys = (out,), (ys,)
            else:
                flat = flatten_outputs(cfg.info, out)
            for m in cfg.metrics:
                i = m.output_index
                if m.fn is not None:
                    sums[k].add_(m.fn(flat[i], ys[i]), alpha=n)
                    k += 1
                else:
                    m.state.update(flat[i], ys[i])

    def result(self, reset: bool = True) -> dict[str, float]:
        """Epoch means as floats: one host sync (and one all-reduce under torch.distributed).

        ``reset=False`` keeps the torchmetrics states, to go on accumulating.
        """
        dev = self.sums[0].device
        t = torch.stack(self.sums + [torch.tensor(float(self.count), device=dev)])
        values = tgdist.all_reduce_sum(t).tolist()
        count = values[-1]
        logs = {n: (v / count if count else math.nan) for n, v in zip(self.names, values[:-1])}
        for name, state in self.states:
            logs[name] = state.compute()
            if reset:
                state.reset()
        return logs
