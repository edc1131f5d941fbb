"""ConvNeXt written the way timm writes it (timm/models/convnext.py, timm/layers/norm.py).

The stem and each downsampling are a conv and timm's ``LayerNorm2d`` (an ``nn.LayerNorm`` whose forward
permutes to channels-last, calls ``F.layer_norm`` and permutes back); the blocks are
``community_models.drop_path.ConvNeXtBlock`` (depthwise 7x7 conv, ``x.permute(0, 2, 3, 1)``, LayerNorm,
MLP, ``.permute(0, 3, 1, 2)``, layer scale, drop path); the head is timm's ``NormMlpClassifierHead``
(global average pool, LayerNorm2d, flatten, linear). Left out: the conv-MLP variant, gradient
checkpointing, feature-info plumbing, weight init schemes.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .drop_path import ConvNeXtBlock

__all__ = ["LayerNorm2d", "ConvNeXtStage", "ConvNeXt", "convnext_atto"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class ConvNeXtStage(nn.Module):
    def __init__(self, in_chs, out_chs, stride=2, depth=2, drop_path_rates=None, ls_init_value=1.0):
        super().__init__()
        if in_chs != out_chs or stride > 1:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, kernel_size=stride, stride=stride),
            )
        else:
            self.downsample = nn.Identity()
        drop_path_rates = drop_path_rates or [0.0] * depth
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(out_chs, drop_path=drop_path_rates[j], ls_init_value=ls_init_value) for j in range(depth)])

    def forward(self, x):
        x = self.downsample(x)
        x = self.blocks(x)
        return x


class NormMlpClassifierHead(nn.Module):
    def __init__(self, in_features, num_classes):
        super().__init__()
        self.norm = LayerNorm2d(in_features)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        x = x.mean((2, 3), keepdim=True)  # timm's SelectAdaptivePool2d('avg')
        x = self.norm(x)
        x = self.flatten(x)
        x = self.drop(x)
        return self.fc(x)


class ConvNeXt(nn.Module):
    def __init__(self, in_chans=3, num_classes=1000, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                 ls_init_value=1e-6, patch_size=4, drop_path_rate=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size),
            LayerNorm2d(dims[0]),
        )
        dp_rates = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths)).split(depths)]
        stages = []
        prev_chs = dims[0]
        for i in range(4):
            stride = 2 if i > 0 else 1
            stages.append(ConvNeXtStage(prev_chs, dims[i], stride=stride, depth=depths[i],
                                        drop_path_rates=dp_rates[i], ls_init_value=ls_init_value))
            prev_chs = dims[i]
        self.stages = nn.Sequential(*stages)
        self.head = NormMlpClassifierHead(prev_chs, num_classes)

    def forward_features(self, x):
        x = self.stem(x)
        x = self.stages(x)
        return x

    def forward(self, x):
        return self.head(self.forward_features(x))


def convnext_atto(**kwargs) -> ConvNeXt:
    """timm's ``convnext_atto`` sizes: depths (2, 2, 6, 2), dims (40, 80, 160, 320)."""
    return ConvNeXt(**{**dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)), **kwargs})
