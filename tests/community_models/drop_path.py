"""Stochastic depth the way timm, torchvision and HuggingFace write it, and blocks that use it.

timm (timm/layers/drop.py): ``DropPath(drop_prob, scale_by_keep=True)`` calling ``drop_path``; the ViT block
(timm/models/vision_transformer.py) and the ConvNeXt block (timm/models/convnext.py) add their residual branch
through one. torchvision (torchvision/ops/stochastic_depth.py): ``StochasticDepth(p, mode)`` calling
``stochastic_depth``, used by its EfficientNet ``MBConv`` (torchvision/models/efficientnet.py). Both return their
input object unchanged when not training (or when the probability is 0).
"""

import torch
import torch.nn as nn

from .vit import Attention, Mlp

__all__ = ["drop_path", "DropPath", "LayerScale", "DropPathViTBlock", "ConvNeXtBlock", "stochastic_depth",
           "StochasticDepth", "MBConv", "Stack", "drop_path_vit", "drop_path_convnext", "mbconv_net"]


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """timm's drop paths (stochastic depth) per sample, applied in the main path of residual blocks."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # work with diff dim tensors, not just 2D ConvNets
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """timm's drop paths (stochastic depth) per sample, applied in the main path of residual blocks."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self):
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class LayerScale(nn.Module):
    """timm's per-channel scale of a residual branch (``x * gamma``)."""

    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DropPathViTBlock(nn.Module):
    """timm's ViT ``Block`` with layer scale and drop path: ``x = x + drop_path1(ls1(attn(norm1(x))))``."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=1e-5, drop_path=0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block (channels-last MLP): dwconv 7x7, LayerNorm, Linear 4x, GELU, Linear, gamma, drop path."""

    def __init__(self, dim, drop_path=0.1, ls_init_value=1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.mlp(x)
        x = x.permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        x = self.drop_path(x) + shortcut
        return x


def stochastic_depth(input, p: float, mode: str, training: bool = True):
    """torchvision's stochastic depth ("row": per sample, "batch": the whole batch), from Huang et al. 2016."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input

    survival_rate = 1.0 - p
    if mode == "row":
        size = [input.shape[0]] + [1] * (input.ndim - 1)
    else:
        size = [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


class StochasticDepth(nn.Module):
    """torchvision's ``StochasticDepth(p, mode)`` module."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input):
        return stochastic_depth(input, self.p, self.mode, self.training)


class MBConv(nn.Module):
    """torchvision's EfficientNet MBConv (expand 1x1, depthwise, squeeze-excitation, project 1x1, stochastic depth)."""

    def __init__(self, channels, expand_ratio=4, stochastic_depth_prob=0.2, mode="row"):
        super().__init__()
        hidden = channels * expand_ratio
        squeeze = max(1, channels // 4)
        self.block = nn.Sequential(
            nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU()),
            nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                          nn.BatchNorm2d(hidden), nn.SiLU()),
            _SqueezeExcitation(hidden, squeeze),
            nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels)),
        )
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, mode)

    def forward(self, input):
        result = self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class _SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation: global pool, fc1, SiLU, fc2, sigmoid scale."""

    def __init__(self, input_channels, squeeze_channels):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, input):
        scale = self.fc2(self.activation(self.fc1(self.avgpool(input))))
        return self.scale_activation(scale) * input


class Stack(nn.Sequential):
    """``nn.Sequential`` whose forward argument is named ``x`` (so tests can pass it by keyword)."""

    def forward(self, x):
        for module in self:
            x = module(x)
        return x


def drop_path_vit(dim=32, depth=2, num_heads=4, drop_path_rate=0.1):
    """A small ViT trunk: Linear patch projection, ``depth`` DropPathViTBlocks with timm's linear drop-path decay."""
    rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth + 1)[1:]]
    return Stack(nn.Linear(16, dim), *[DropPathViTBlock(dim, num_heads, drop_path=r) for r in rates],
                         nn.LayerNorm(dim))


def drop_path_convnext(dim=16, depth=2, drop_path_rate=0.1):
    """A small ConvNeXt stage: stem conv, ``depth`` ConvNeXtBlocks with drop path, pool and head."""
    return Stack(nn.Conv2d(3, dim, 2, stride=2), *[ConvNeXtBlock(dim, drop_path=drop_path_rate)
                                                           for _ in range(depth)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, 10))


def mbconv_net(channels=8, mode="row"):
    """A small EfficientNet-like stage: stem conv, two MBConv blocks with stochastic depth, pool and head."""
    return Stack(nn.Conv2d(3, channels, 3, padding=1), MBConv(channels, mode=mode),
                         MBConv(channels, mode=mode), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))
