"""A BERT-style text classifier on ``nn.TransformerEncoder``, the way PyTorch tutorials and forum code write it."""

import math

import torch
import torch.nn as nn

__all__ = ["TransformerClassifier"]


class TransformerClassifier(nn.Module):
    """Token + learned position embeddings, ``nn.TransformerEncoder`` (batch_first), masked mean pooling, Linear.

    ``src_key_padding_mask`` is (batch, seq) bool, True at padding (PyTorch's convention); ``norm_first=True`` gives
    the pre-LN variant. Style: the PyTorch transformer tutorials and BERT (Devlin et al. 2018).
    """

    def __init__(self, vocab_size, d_model=256, nhead=4, dim_feedforward=1024, num_layers=4, num_classes=2,
                 max_len=512, dropout=0.1, norm_first=False, pad_idx=0):
        super().__init__()
        self.d_model = d_model
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_idx)
        self.pos_embedding = nn.Embedding(max_len, d_model)
        encoder_layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                                   norm_first=norm_first)
        # nested tensors need post-norm layers; saying so up front avoids PyTorch's warning for norm_first=True
        self.encoder = nn.TransformerEncoder(encoder_layer, num_layers, enable_nested_tensor=not norm_first)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, input_ids, src_key_padding_mask=None):
        positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        x = self.embedding(input_ids) * math.sqrt(self.d_model) + self.pos_embedding(positions)
        x = self.encoder(x, src_key_padding_mask=src_key_padding_mask)
        if src_key_padding_mask is None:
            pooled = x.mean(dim=1)
        else:
            keep = (~src_key_padding_mask).unsqueeze(-1).type_as(x)
            pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))
