"""Handwritten baselines that reuse the very layer objects of a torchgraph model.

Each class is written the way a PyTorch user would write it by hand (attribute access, small block
modules, a loop over a ModuleList), so "tg.Model / handwritten" measures torchgraph's overhead alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["HandMLP", "HandResNet", "HandGPT"]


class HandMLP(nn.Module):
    """``for linear in self.linears: x = relu(linear(x))``."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.linears = nn.ModuleList(linears)

    def forward(self, x):
        for linear in self.linears:
            x = F.relu(linear(x))
        return x


class _Block(nn.Module):
    def __init__(self, layers: dict, prefix: str):
        super().__init__()
        self.conv1, self.bn1 = layers[prefix + "conv1"], layers[prefix + "bn1"]
        self.conv2, self.bn2 = layers[prefix + "conv2"], layers[prefix + "bn2"]
        self.conv3 = layers.get(prefix + "conv3")
        self.bn3 = layers.get(prefix + "bn3")
        ds = prefix + "downsample_0"
        self.downsample = nn.Sequential(layers[ds], layers[prefix + "downsample_1"]) if ds in layers else None

    def forward(self, x):
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        if self.conv3 is not None:
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
        else:
            out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return F.relu(out + identity)


class HandResNet(nn.Module):
    """torchvision's ResNet structure over the layers of ``torchgraph.applications.resnet_layers``."""

    def __init__(self, layers: dict):
        super().__init__()
        self.conv1, self.bn1, self.maxpool = layers["conv1"], layers["bn1"], layers["maxpool"]
        stages = []
        s = 1
        while f"layer{s}_0_conv1" in layers:
            blocks, b = [], 0
            while f"layer{s}_{b}_conv1" in layers:
                blocks.append(_Block(layers, f"layer{s}_{b}_"))
                b += 1
            stages.append(nn.Sequential(*blocks))
            s += 1
        self.stages = nn.Sequential(*stages)
        self.avgpool, self.fc = layers["avgpool"], layers["fc"]

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.stages(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class HandGPT(nn.Module):
    """A stack of ``torchgraph.applications.GPTBlock`` modules."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x
