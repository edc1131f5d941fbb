"""Reference models written the way their communities write them (torchvision, timm, nanoGPT, transformers, ...).

Plain PyTorch only (no torchgraph import): tests and benchmarks use them as "other people's code". One module per
family; ``registry`` lists every model at test and benchmark sizes (``ARCHITECTURES``, ``BENCHMARK_ARCHITECTURES``).
Import with ``tests/`` on ``sys.path`` (pytest does that for the tests): ``from community_models import ...``.

Block-level names that two families share (``Block``: timm ViT and nanoGPT) are not re-exported here; take them from
their module: ``community_models.vit.Block``, ``community_models.nanogpt.Block``. Likewise EfficientNet's
``SqueezeExcitation`` and ``MBConv`` (``community_models.efficientnet``) and ShuffleNetV2's ``InvertedResidual``
(``community_models.shufflenet``): the top-level names are MobileNet's.
"""

from . import (convnext, cyclegan, densenet, efficientnet, encoder, hf, llama_meta, llama_titan, mobilenet, nanogpt,
               preact_resnet, registry, resnet, shufflenet, small, unet, vit)
from .cyclegan import ResnetBlock, ResnetGenerator, get_norm_layer
from .densenet import DenseNet, densenet121
from .efficientnet import EfficientNet, MBConvConfig, efficientnet_b0
from .encoder import TransformerClassifier
from .hf import HAS_TRANSFORMERS, tiny_bert, tiny_gpt2
from .mobilenet import (Conv2dNormActivation, InvertedResidual, InvertedResidualConfig, InvertedResidualV3,
                        MobileNetV2, MobileNetV3, SqueezeExcitation, _make_divisible, mobilenet_v2,
                        mobilenet_v3_small)
from .nanogpt import GPT, MLP, CausalSelfAttention, GPTConfig, LayerNorm
from .preact_resnet import PreActBlock, PreActBottleneck, PreActResNet, preact_resnet18
from .registry import ARCHITECTURES, BENCHMARK_ARCHITECTURES, Architecture, InputSpec, input_symbol, tensor_leaves
from .resnet import BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3, resnet18, resnet50
from .shufflenet import ShuffleNetV2, channel_shuffle, shufflenet_v2_x0_5
from .small import DataDependent, LSTMEncoder, SiameseNetwork, WithDataDependentBlock
from .unet import DoubleConv, Down, OutConv, Up, UNet
from .vit import Attention, Mlp, PatchEmbed, VisionTransformer, vit_tiny

__all__ = [
    # modules, one per family
    "convnext", "cyclegan", "densenet", "efficientnet", "encoder", "hf", "llama_meta", "llama_titan", "mobilenet", "nanogpt",
    "preact_resnet", "registry", "resnet", "shufflenet", "small", "unet", "vit",
    # registry
    "ARCHITECTURES", "BENCHMARK_ARCHITECTURES", "Architecture", "InputSpec", "input_symbol", "tensor_leaves",
    # torchvision ResNet
    "conv3x3", "conv1x1", "BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50",
    # torchvision MobileNetV2 / V3
    "_make_divisible", "Conv2dNormActivation", "InvertedResidual", "MobileNetV2", "mobilenet_v2",
    "SqueezeExcitation", "InvertedResidualConfig", "InvertedResidualV3", "MobileNetV3", "mobilenet_v3_small",
    # torchvision EfficientNet, ShuffleNetV2, DenseNet (their SqueezeExcitation, MBConv and InvertedResidual share
    # names with MobileNet's and drop_path's: take them from community_models.efficientnet / .shufflenet)
    "MBConvConfig", "EfficientNet", "efficientnet_b0", "channel_shuffle", "ShuffleNetV2", "shufflenet_v2_x0_5",
    "DenseNet", "densenet121",
    # timm ViT
    "PatchEmbed", "Attention", "Mlp", "VisionTransformer", "vit_tiny",
    # nanoGPT
    "GPTConfig", "GPT", "LayerNorm", "CausalSelfAttention", "MLP",
    # nn.TransformerEncoder classifier, U-Net, small models
    "TransformerClassifier", "DoubleConv", "Down", "Up", "OutConv", "UNet",
    # kuangliu's pre-activation ResNet
    "PreActBlock", "PreActBottleneck", "PreActResNet", "preact_resnet18",
    # CycleGAN's ResNet generator
    "ResnetBlock", "ResnetGenerator", "get_norm_layer",
    "LSTMEncoder", "SiameseNetwork", "DataDependent", "WithDataDependentBlock",
    # HuggingFace transformers (imported lazily)
    "HAS_TRANSFORMERS", "tiny_bert", "tiny_gpt2",
]
