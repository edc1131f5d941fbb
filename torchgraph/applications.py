"""Reference architectures built symbolically: ResNets (torchvision layout), an MLP, a GPT stack.

Each builder makes its layers first (``*_layers``) and records the graph second (``build_*``), so a
benchmark can time building alone, and a handwritten module can reuse the very same layer objects.
Layer names follow torchvision's parameter names with dots as underscores
(``layer1_0_conv1``), so ``state_dict`` keys are readable.

Example:
    >>> import torch, torchgraph as tg
    >>> model = tg.applications.resnet18(num_classes=10, input_shape=(3, 64, 64))
    >>> model(torch.randn(2, 3, 64, 64)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Model
from .naming import name as _name
from .symbolic import Input

__all__ = ["resnet18", "resnet50", "resnet_layers", "build_resnet", "mlp", "gpt_stack", "GPTBlock"]

_RESNET = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


def resnet_layers(arch: str = "resnet18", num_classes: int = 1000) -> dict[str, nn.Module]:
    """The layers of a torchvision-style ResNet, named like torchvision's parameters."""
    kind, blocks = _RESNET[arch]
    expansion = 1 if kind == "basic" else 4
    layers: dict[str, nn.Module] = {
        "conv1": nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        "bn1": nn.BatchNorm2d(64),
        "maxpool": nn.MaxPool2d(3, 2, 1),
    }
    inplanes = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(count):
            stride = 2 if (b == 0 and stage > 1) else 1
            p = f"layer{stage}_{b}_"
            if kind == "basic":
                layers[p + "conv1"] = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
                layers[p + "bn1"] = nn.BatchNorm2d(planes)
                layers[p + "conv2"] = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
                layers[p + "bn2"] = nn.BatchNorm2d(planes)
            else:
                layers[p + "conv1"] = nn.Conv2d(inplanes, planes, 1, bias=False)
                layers[p + "bn1"] = nn.BatchNorm2d(planes)
                layers[p + "conv2"] = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
                layers[p + "bn2"] = nn.BatchNorm2d(planes)
                layers[p + "conv3"] = nn.Conv2d(planes, planes * expansion, 1, bias=False)
                layers[p + "bn3"] = nn.BatchNorm2d(planes * expansion)
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                layers[p + "downsample_0"] = nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False)
                layers[p + "downsample_1"] = nn.BatchNorm2d(planes * expansion)
            inplanes = planes * expansion
    layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
    layers["fc"] = nn.Linear(512 * expansion, num_classes)
    for n, m in layers.items():
        _name(m, n)
    return layers


def resnet_forward(layers: dict[str, nn.Module], x):
    """The ResNet forward over ``layers``: used both symbolically and by handwritten baselines."""
    x = layers["maxpool"](F.relu(layers["bn1"](layers["conv1"](x))))
    stage = 1
    while f"layer{stage}_0_conv1" in layers:
        b = 0
        while f"layer{stage}_{b}_conv1" in layers:
            p = f"layer{stage}_{b}_"
            identity = x
            out = F.relu(layers[p + "bn1"](layers[p + "conv1"](x)))
            if p + "conv3" in layers:
                out = F.relu(layers[p + "bn2"](layers[p + "conv2"](out)))
                out = layers[p + "bn3"](layers[p + "conv3"](out))
            else:
                out = layers[p + "bn2"](layers[p + "conv2"](out))
            if p + "downsample_0" in layers:
                identity = layers[p + "downsample_1"](layers[p + "downsample_0"](x))
            x = F.relu(out + identity)
            b += 1
        stage += 1
    x = torch.flatten(layers["avgpool"](x), 1)
    return layers["fc"](x)


def build_resnet(layers: dict[str, nn.Module], input_shape=(3, 224, 224), name: str = "ResNet") -> Model:
    """Record a ResNet over existing ``layers`` (from :func:`resnet_layers`)."""
    x = Input(shape=input_shape, name="image")
    return Model(x, resnet_forward(layers, x), name=name)


def resnet18(num_classes: int = 1000, input_shape=(3, 224, 224)) -> Model:
    """ResNet-18 (torchvision layout: 11,689,512 parameters with 1000 classes)."""
    return build_resnet(resnet_layers("resnet18", num_classes), input_shape, name="ResNet18")


def resnet50(num_classes: int = 1000, input_shape=(3, 224, 224)) -> Model:
    """ResNet-50 (torchvision layout: 25,557,032 parameters with 1000 classes)."""
    return build_resnet(resnet_layers("resnet50", num_classes), input_shape, name="ResNet50")


def mlp(depth: int = 200, width: int = 256, num_classes: int | None = None) -> Model:
    """``depth`` x (Linear(width, width) + ReLU), optionally followed by a classifier."""
    x = Input(shape=(width,), name="features")
    h = x
    for _ in range(depth):
        h = F.relu(nn.Linear(width, width)(h))
    if num_classes is not None:
        h = nn.Linear(width, num_classes)(h)
    return Model(x, h, name="MLP")


class GPTBlock(nn.Module):
    """A pre-LayerNorm transformer block (causal self-attention + GELU MLP), written by hand."""

    def __init__(self, dim: int = 256, heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        return gpt_block_forward(self, x)


def gpt_block_forward(block: GPTBlock, x):
    """The block's computation, shared by the handwritten module and the symbolic builder."""
    b, t, d = x.shape
    q, k, v = block.qkv(block.ln1(x)).chunk(3, dim=-1)
    h = block.heads
    q = q.view(b, t, h, d // h).transpose(1, 2)
    k = k.view(b, t, h, d // h).transpose(1, 2)
    v = v.view(b, t, h, d // h).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + block.proj(a.transpose(1, 2).reshape(b, t, d))
    return x + block.fc2(F.gelu(block.fc1(block.ln2(x))))


def gpt_stack(num_blocks: int = 4, dim: int = 256, heads: int = 4, seq_len: int | None = 128,
              blocks: list[GPTBlock] | None = None) -> Model:
    """A stack of pre-LN GPT blocks, recorded at the level of their layers (Linear, LayerNorm...).

    ``seq_len=None`` makes the sequence length dynamic.
    """
    blocks = blocks if blocks is not None else [GPTBlock(dim, heads) for _ in range(num_blocks)]
    x = Input(shape=(seq_len, dim), name="tokens")
    h = x
    for block in blocks:
        h = gpt_block_forward(block, h)
    return Model(x, h, name="GPT")
