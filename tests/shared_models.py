"""Models shared by several test files (built once each; the tests never mutate them)."""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg


@functools.lru_cache(maxsize=None)  # built once (never mutated by the tests)
def multi_io_model():
    """Two named inputs, dict outputs, a shared Linear, an LSTM (tuple output), torch functions."""
    img = tg.Input(shape=(3, 32, 32), name="img")
    tokens = tg.Input(shape=(8,), dtype=torch.long, name="tokens")  # static: LSTM on meta is slow
    shared = nn.Linear(16, 16)
    h = F.relu(nn.Conv2d(3, 16, 3)(img)).mean(dim=(2, 3))
    seq, _ = nn.LSTM(16, 16, batch_first=True)(nn.Embedding(100, 16)(tokens))
    a = shared(h)
    b = shared(seq[:, -1])
    logits = nn.Linear(32, 10)(torch.cat([a, b], dim=1))
    return tg.Model({"img": img, "tokens": tokens}, {"logits": logits, "feat": a}, name="Multi")
