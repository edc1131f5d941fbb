"""Small classic models: an LSTM sequence encoder, a Siamese network, and a block with data-dependent control flow."""

import torch
import torch.nn as nn

__all__ = ["LSTMEncoder", "SiameseNetwork", "DataDependent", "WithDataDependentBlock"]


class LSTMEncoder(nn.Module):
    """seq2seq-tutorial style encoder: Embedding, ``nn.LSTM(batch_first=True)``, last layer's final hidden -> Linear."""

    def __init__(self, vocab_size, embed_dim=64, hidden_size=128, num_layers=2, num_outputs=10, dropout=0.0,
                 pad_idx=0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_idx)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.fc = nn.Linear(hidden_size, num_outputs)

    def forward(self, src):
        embedded = self.embedding(src)  # (batch, seq, embed_dim)
        outputs, (hidden, cell) = self.lstm(embedded)  # hidden: (num_layers, batch, hidden_size)
        return self.fc(hidden[-1])


class SiameseNetwork(nn.Module):
    """Koch et al. 2015 style: one shared conv tower embeds both images; ``torch.abs(a - b)`` feeds a Linear."""

    def __init__(self, in_channels=1, width=32, embedding_dim=64):
        super().__init__()
        self.tower = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width * 2, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width * 2, embedding_dim),
        )
        self.head = nn.Linear(embedding_dim, 1)

    def forward_once(self, x):
        return self.tower(x)

    def forward(self, input1, input2):
        a = self.forward_once(input1)
        b = self.forward_once(input2)
        return self.head(torch.abs(a - b))


class DataDependent(nn.Module):
    """Python ``if`` on a tensor's value (``x.sum() > 0``): which Linear runs depends on the data, not the shapes."""

    def __init__(self, features):
        super().__init__()
        self.positive = nn.Linear(features, features)
        self.negative = nn.Linear(features, features)

    def forward(self, x):
        if x.sum() > 0:
            return self.positive(x)
        return torch.relu(self.negative(x))


class WithDataDependentBlock(nn.Module):
    """An ordinary MLP with one ``DataDependent`` block in the middle (that block must stay opaque to a tracer)."""

    def __init__(self, in_features=16, hidden=32, num_classes=4):
        super().__init__()
        self.stem = nn.Linear(in_features, hidden)  # no ReLU: the sign of the sum must depend on the input
        self.block = DataDependent(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))
