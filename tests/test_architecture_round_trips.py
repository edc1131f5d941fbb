"""The architecture tests' models round-trip: community code recorded on symbolic inputs
(tests/test_architectures.py) goes through tests/roundtrip.py -- get_config/from_config and
tg.save/tg.load with bit-identical outputs, tg.export_onnx with verification -- or fails at get_config
with a message that names the fix.

The community's blocks are registered the way a user would register their own (docs/config_and_saving.md):
``tg.register_layer`` on each block class (torchvision's ``norm_layer=nn.BatchNorm2d`` and timm's
``partial(nn.LayerNorm, eps=1e-6)`` are stored as layer classes), nanoGPT's ``GPTConfig`` dataclass as a
value type, torchvision's ``InvertedResidualConfig`` and ``MBConvConfig`` too. ``DataDependent`` stays unregistered:
tests/test_community_round_trips.py checks the error for an unregistered class.
"""

import dataclasses
import inspect
import re

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models import (ARCHITECTURES, HAS_TRANSFORMERS, convnext, densenet, efficientnet, encoder, llama_titan,
                              mobilenet, nanogpt, resnet, shufflenet, small, unet, vit)
from roundtrip import assert_round_trips
import test_architectures as architectures

# Whole models (their forward is recorded op by op) and the unregistered block stay as they are.
_NOT_LAYERS = {resnet.ResNet, mobilenet.MobileNetV2, mobilenet.MobileNetV3, vit.VisionTransformer, nanogpt.GPT,
               encoder.TransformerClassifier, unet.UNet, small.LSTMEncoder, small.SiameseNetwork,
               small.WithDataDependentBlock, small.DataDependent, convnext.ConvNeXt, llama_titan.Transformer,
               llama_titan.TransformerModelArgs, efficientnet.EfficientNet, shufflenet.ShuffleNetV2,
               densenet.DenseNet}
for _module in (resnet, mobilenet, vit, nanogpt, encoder, unet, small, convnext, llama_titan, efficientnet, shufflenet,
                densenet):
    for _, _cls in inspect.getmembers(_module, inspect.isclass):
        if issubclass(_cls, nn.Module) and _cls.__module__ == _module.__name__ and _cls not in _NOT_LAYERS:
            tg.register_layer(_cls, name=f"community.{_module.__name__.rsplit('.', 1)[-1]}.{_cls.__qualname__}")
# torchvision's MobileNetV3 block settings keep channels already scaled by width_mult: stored with 1.0.
tg.register_value_type(mobilenet.InvertedResidualConfig, name="community.mobilenet.InvertedResidualConfig",
                       to_config=lambda c: {"input_channels": c.input_channels, "kernel": c.kernel,
                                            "expanded_channels": c.expanded_channels,
                                            "out_channels": c.out_channels, "use_se": c.use_se,
                                            "activation": "HS" if c.use_hs else "RE", "stride": c.stride,
                                            "width_mult": 1.0},
                       from_config=lambda data: mobilenet.InvertedResidualConfig(**data))
# torchvision's EfficientNet stage settings likewise keep channels and layer counts already scaled: stored unscaled.
tg.register_value_type(efficientnet.MBConvConfig, name="community.efficientnet.MBConvConfig",
                       to_config=lambda c: {"expand_ratio": c.expand_ratio, "kernel": c.kernel, "stride": c.stride,
                                            "input_channels": c.input_channels, "out_channels": c.out_channels,
                                            "num_layers": c.num_layers, "width_mult": 1.0, "depth_mult": 1.0},
                       from_config=lambda data: efficientnet.MBConvConfig(**data))
tg.register_value_type(nanogpt.GPTConfig, to_config=dataclasses.asdict,
                       from_config=lambda data: nanogpt.GPTConfig(**data), name="community.nanogpt.GPTConfig")
tg.register_value_type(llama_titan.TransformerModelArgs, to_config=dataclasses.asdict,
                       from_config=lambda data: llama_titan.TransformerModelArgs(**data),
                       name="community.llama_titan.TransformerModelArgs")

if HAS_TRANSFORMERS:  # whole HF models called as one layer each, registered as docs/config_and_saving.md shows
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    tg.register_value_type(BertConfig)
    tg.register_value_type(GPT2Config)
    tg.register_layer(BertModel, get_config=lambda m: {"config": m.config, "add_pooling_layer": m.pooler is not None})
    tg.register_layer(GPT2Model, get_config=lambda m: {"config": m.config})

# The allowed other outcome, a clear error at get_config (see each message for why).
CONFIG_ERRORS = {
    "with_data_dependent_block": r"DataDependent.*@tg\.register_layer",
    # one layer each, needing real data to build (transformers' mask checks): tg.from_module is the way
    "hf_bert": r"'bert_model' \(BertModel\) needed real data to build",
    "hf_gpt2": r"'gpt2_model' \(GPT2Model\) needed real data to build",
}


@pytest.mark.parametrize("name", architectures.ALL)
def test_architecture_round_trips(name, tmp_path):
    torch.manual_seed(0)
    arch = ARCHITECTURES[name]
    model = arch.make_model().eval()
    built = architectures._build(name, model).eval()
    batch, size = architectures._cases(name, False)[-1]
    inputs = architectures._real_inputs(name, arch, batch, size, 0)
    error = assert_round_trips(built, inputs, folder=str(tmp_path))
    if name in CONFIG_ERRORS:
        assert error is not None and re.search(CONFIG_ERRORS[name], str(error)), error
    else:
        assert error is None, error
