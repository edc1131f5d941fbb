"""The registry of community models: ``ARCHITECTURES`` (test sizes) and ``BENCHMARK_ARCHITECTURES`` (bench sizes).

Both map the same names to an ``Architecture``: how to build the model (seeded), its inputs (``InputSpec``: the
name, per-sample shape and dtype you would give ``tg.Input``) and the shapes of its tensor outputs.

Example:
    >>> from community_models import ARCHITECTURES, tensor_leaves
    >>> arch = ARCHITECTURES["resnet18"]
    >>> model = arch.make_model().eval()
    >>> outputs = tensor_leaves(model(*arch.make_inputs(batch_size=3)))
    >>> [tuple(o.shape) for o in outputs] == list(arch.expected_output_shapes(batch_size=3))
    True
"""

import builtins
import dataclasses
import keyword
from typing import Callable

import torch
import torch.nn as nn

from .convnext import convnext_atto
from .cyclegan import ResnetGenerator, get_norm_layer
from .densenet import DenseNet
from .efficientnet import efficientnet_b0
from .encoder import TransformerClassifier
from .llama_titan import Transformer as TitanTransformer
from .llama_titan import TransformerModelArgs as TitanArgs
from .hf import HAS_TRANSFORMERS, tiny_bert, tiny_gpt2, tiny_llama
from .mobilenet import mobilenet_v2, mobilenet_v3_small
from .nanogpt import GPT, GPTConfig
from .preact_resnet import preact_resnet18
from .resnet import resnet18, resnet50
from .shufflenet import ShuffleNetV2
from .small import LSTMEncoder, SiameseNetwork, WithDataDependentBlock
from .unet import UNet
from .vit import vit_tiny

__all__ = ["InputSpec", "Architecture", "ARCHITECTURES", "BENCHMARK_ARCHITECTURES", "input_symbol", "tensor_leaves"]

BATCH = "batch"  # placeholder in Architecture.outputs for the batch size
SEQ = "seq"  # placeholder in Architecture.outputs for the sequence length


def input_symbol(name: str) -> str:
    """The name to give ``tg.Input`` for the ``forward()`` argument ``name``: ``name`` itself, or ``name + "_"``
    for a Python builtin (``def forward(self, input)``, as torch.nn and CycleGAN write it): generated code cannot
    use a builtin as a variable, so tg.Input refuses one."""
    return name + "_" if keyword.iskeyword(name) or name in dir(builtins) else name


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One positional input of a model's ``forward``.

    Attributes:
        name: the ``forward`` argument's name.
        shape: one sample's shape, without the batch dim; ``None`` marks the sequence length.
        dtype: the input's dtype.
        kind: how ``make_inputs`` fills it: "normal" (``randn``), "tokens" (``randint(0, high)``),
            "padding_mask" (bool, True at padding: ``nn.TransformerEncoder``'s ``src_key_padding_mask``) or
            "attention_mask" (int64, 1 at real tokens: HuggingFace's convention). In both masks the odd-numbered
            samples have their second half padded, and every sample keeps at least one real token.
        high: the exclusive upper bound of the token ids (the vocabulary size) for kind "tokens".
    """

    name: str
    shape: tuple
    dtype: torch.dtype = torch.float32
    kind: str = "normal"
    high: int = 0


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One community model at one size.

    Attributes:
        name: the registry key, e.g. "resnet18".
        style: where its code style comes from, in one line.
        build: makes the model (random init, train mode); ``make_model`` calls it under a fixed seed.
        inputs: the positional inputs of ``forward``, in order.
        outputs: the shapes of ``tensor_leaves(model(*inputs))`` in eval mode, with ``"batch"`` and ``"seq"``
            standing for the batch size and the sequence length.
        batch_size: the default batch size of ``make_inputs``.
        seq_len: the default sequence length (for the ``None`` dims of ``inputs``); None for fixed-shape models.
    """

    name: str
    style: str
    build: Callable[[], nn.Module]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[tuple, ...]
    batch_size: int = 2
    seq_len: int | None = None

    @property
    def is_sequence(self) -> bool:
        """True when some input has a dynamic sequence dim."""
        return self.seq_len is not None

    def make_model(self, seed: int = 0) -> nn.Module:
        """The model (train mode), built with ``torch.manual_seed(seed)`` without touching the global RNG
        state; its BatchNorm layers hold running statistics of its own activations (``_calibrate``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build()
            _calibrate(model, lambda: self.make_inputs(batch_size=_CALIBRATION_BATCH, seed=seed))
            return model

    def make_inputs(self, batch_size: int | None = None, seq_len: int | None = None,
                    seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Example inputs for ``model(*inputs)``, from a private generator seeded with ``seed``."""
        batch_size = batch_size or self.batch_size
        seq_len = seq_len or self.seq_len
        generator = torch.Generator().manual_seed(seed)
        return tuple(_make_input(spec, batch_size, seq_len, generator) for spec in self.inputs)

    def make_kwargs(self, batch_size: int | None = None, seq_len: int | None = None,
                    seed: int = 0) -> dict[str, torch.Tensor]:
        """``make_inputs`` keyed by the ``forward`` argument names, for ``model(**kwargs)``."""
        inputs = self.make_inputs(batch_size, seq_len, seed)
        return {spec.name: tensor for spec, tensor in zip(self.inputs, inputs)}

    def expected_output_shapes(self, batch_size: int | None = None,
                               seq_len: int | None = None) -> tuple[tuple[int, ...], ...]:
        """``outputs`` with the placeholders filled in."""
        sizes = {BATCH: batch_size or self.batch_size, SEQ: seq_len or self.seq_len}
        return tuple(tuple(sizes.get(d, d) for d in shape) for shape in self.outputs)


# NOTE: with their initial running statistics (mean 0, variance 1) BatchNorm layers in eval mode do
# not normalise, and torchvision's initialisation then shrinks EfficientNet's output to ~1e-11 (MobileNet's to
# ~1e-8): every comparison against eager passes there, whatever the optimizer did. So the BatchNorm layers
# get the statistics a trained network has, those of its own activations: one train-mode pass without
# gradients on a seeded batch (momentum None: the batch's statistics themselves). The batch is large because
# the last stages of the test-size models run on 1x1 maps, where two samples' statistics would divide by
# a near-zero variance on any other input (outputs of ~1e7).
_CALIBRATION_BATCH = 32


def _calibrate(model: nn.Module, make_inputs: Callable[[], tuple]) -> None:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None
    with torch.no_grad():
        model(*make_inputs())
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def _make_input(spec: InputSpec, batch_size: int, seq_len: int | None, generator: torch.Generator) -> torch.Tensor:
    shape = (batch_size, *(seq_len if d is None else d for d in spec.shape))
    if spec.kind == "normal":
        return torch.randn(shape, generator=generator, dtype=spec.dtype)
    if spec.kind == "tokens":
        return torch.randint(0, spec.high, shape, generator=generator, dtype=spec.dtype)
    if spec.kind in ("padding_mask", "attention_mask"):
        length = shape[-1]
        lengths = torch.tensor([length - (i % 2) * (length // 2) for i in range(batch_size)])
        padding = torch.arange(length).expand(shape) >= lengths.view(-1, *([1] * (len(shape) - 1)))
        return padding if spec.kind == "padding_mask" else (~padding).to(spec.dtype)
    raise ValueError(f"InputSpec {spec.name!r}: unknown kind {spec.kind!r}. Expected one of 'normal', 'tokens', "
                     f"'padding_mask', 'attention_mask'.")


def tensor_leaves(output) -> tuple[torch.Tensor, ...]:
    """The tensors in a model's output, in order: tuples, lists and dicts (HF ``ModelOutput``) flattened, no None."""
    if output is None:
        return ()
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return tuple(leaf for item in output for leaf in tensor_leaves(item))
    raise TypeError(f"tensor_leaves: cannot flatten an output of type {type(output).__name__}. Expected tensors, "
                    f"tuples, lists, dicts or None.")


def _image(side: int, channels: int = 3, name: str = "x") -> InputSpec:
    return InputSpec(name, (channels, side, side))


def _tokens(vocab_size: int, name: str = "input_ids") -> InputSpec:
    return InputSpec(name, (None,), torch.long, kind="tokens", high=vocab_size)


def _registry(size: str) -> dict[str, Architecture]:
    """All architectures at ``size`` "test" (each builds and runs in well under a second) or "benchmark"."""
    test = size == "test"
    side = 32 if test else 64  # image side: benchmarks run at 64x64 (FACTS.md's ResNet-18 b8 64x64 figures)
    batch = 2 if test else 8
    seq = 16 if test else 128
    vocab = 256 if test else 8192
    num_classes = 10 if test else 1000
    d_model = 64 if test else 256
    depth = 2 if test else 4
    ffn = 4 * d_model

    gpt_config = dict(block_size=2 * seq, vocab_size=vocab, n_layer=depth, n_head=4, n_embd=d_model, dropout=0.0,
                      bias=True)
    encoder_config = dict(vocab_size=vocab, d_model=d_model, nhead=4, dim_feedforward=ffn, num_layers=depth,
                          num_classes=3, max_len=2 * seq)
    image = _image(side)
    archs = [
        Architecture("resnet18", "torchvision resnet.py (BasicBlock)",
                     lambda: resnet18(num_classes=num_classes, **(dict(width=16) if test else {})),
                     (image,), ((BATCH, num_classes),), batch),
        Architecture("resnet50", "torchvision resnet.py (Bottleneck)",
                     lambda: resnet50(num_classes=num_classes, **(dict(width=8) if test else {})),
                     (image,), ((BATCH, num_classes),), batch),
        Architecture("preact_resnet18", "kuangliu/pytorch-cifar preact_resnet.py (F.relu(self.bn1(x)) before each "
                     "convolution, shortcut from the pre-activated value, out += shortcut; CIFAR 32x32)",
                     lambda: preact_resnet18(num_classes=10, width=16 if test else 64),
                     (_image(32),), ((BATCH, 10),), batch),
        Architecture("mobilenet_v2", "torchvision mobilenetv2.py",
                     lambda: mobilenet_v2(num_classes=num_classes, width_mult=0.25 if test else 1.0),
                     (image,), ((BATCH, num_classes),), batch),
        Architecture("mobilenet_v3_small", "torchvision mobilenetv3.py (SE with F.hardsigmoid, Hardswish)",
                     lambda: mobilenet_v3_small(num_classes=num_classes, width_mult=0.5 if test else 1.0),
                     (image,), ((BATCH, num_classes),), batch),
        Architecture("efficientnet_b0", "torchvision efficientnet.py (MBConv: SiLU, SE with nn.Sigmoid, "
                     "StochasticDepth 'row', `result += input`)",
                     lambda: efficientnet_b0(num_classes=num_classes, width_mult=0.25 if test else 1.0),
                     (image,), ((BATCH, num_classes),), batch),
        Architecture("shufflenet_v2", "torchvision shufflenetv2.py (x.chunk, torch.cat, channel_shuffle with "
                     "view/transpose/contiguous, x.mean([2, 3]))",
                     lambda: ShuffleNetV2([2, 2, 2] if test else [4, 8, 4],
                                          [8, 16, 32, 64, 128] if test else [24, 48, 96, 192, 1024],
                                          num_classes=num_classes),
                     (image,), ((BATCH, num_classes),), batch),
        Architecture("densenet", "torchvision densenet.py (nn.ModuleDict dense blocks, list of features, "
                     "torch.cat, F.relu(inplace=True))",
                     lambda: DenseNet(**(dict(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16)
                                         if test else dict(growth_rate=32, block_config=(6, 12, 24, 16),
                                                           num_init_features=64)),
                                      bn_size=4, drop_rate=0, num_classes=num_classes),
                     (image,), ((BATCH, num_classes),), batch),
        Architecture("convnext", "timm convnext.py (LayerNorm2d, permutes to channels-last, layer scale, drop path)",
                     # layer scale 0.5 rather than timm's 1e-6 init, so that every block changes the output
                     lambda: convnext_atto(num_classes=num_classes, ls_init_value=0.5, drop_path_rate=0.1,
                                           **(dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)) if test else {})),
                     (image,), ((BATCH, num_classes),), batch),
        Architecture("vit", "timm vision_transformer.py (fused SDPA attention)",
                     lambda: vit_tiny(img_size=side, patch_size=8, num_classes=num_classes,
                                      **(dict(embed_dim=64, depth=2, num_heads=4) if test else {})),
                     (image,), ((BATCH, num_classes),), batch),
        Architecture("vit_manual_attention", "timm vision_transformer.py (fused_attn=False: softmax written out)",
                     lambda: vit_tiny(img_size=side, patch_size=8, num_classes=num_classes, fused_attn=False,
                                      **(dict(embed_dim=64, depth=2, num_heads=4) if test else {})),
                     (image,), ((BATCH, num_classes),), batch),
        Architecture("nanogpt", "karpathy/nanoGPT model.py (flash attention)",
                     lambda: GPT(GPTConfig(**gpt_config)),
                     (_tokens(vocab, "idx"),), ((BATCH, 1, vocab),), batch, seq),
        Architecture("nanogpt_manual_attention", "karpathy/nanoGPT model.py (manual attention, tril bias buffer)",
                     lambda: GPT(GPTConfig(**gpt_config, flash=False)),
                     (_tokens(vocab, "idx"),), ((BATCH, 1, vocab),), batch, seq),
        Architecture("llama_titan", "torchtitan llama3/model.py (nn.RMSNorm, complex rotary buffer, repeat_kv, "
                     "SDPA wrapper with sdpa_kernel)",
                     lambda: TitanTransformer(TitanArgs(dim=d_model, n_layers=depth, n_heads=4, n_kv_heads=2,
                                                        vocab_size=vocab, max_seq_len=2 * seq)),
                     (_tokens(vocab, "tokens"),), ((BATCH, SEQ, vocab),), batch, seq),
        Architecture("transformer_classifier", "nn.TransformerEncoder tutorials, BERT-style post-norm",
                     lambda: TransformerClassifier(**encoder_config),
                     (_tokens(vocab), InputSpec("src_key_padding_mask", (None,), torch.bool, "padding_mask")),
                     ((BATCH, 3),), batch, seq),
        Architecture("transformer_classifier_prenorm", "nn.TransformerEncoder tutorials, norm_first=True",
                     lambda: TransformerClassifier(**encoder_config, norm_first=True),
                     (_tokens(vocab), InputSpec("src_key_padding_mask", (None,), torch.bool, "padding_mask")),
                     ((BATCH, 3),), batch, seq),
        Architecture("unet", "milesial/Pytorch-UNet unet_parts.py (ConvTranspose2d up)",
                     lambda: UNet(n_channels=3, n_classes=2, base=8 if test else 32),
                     (image,), ((BATCH, 2, side, side),), batch),
        Architecture("cyclegan_generator", "junyanz pytorch-CycleGAN-and-pix2pix networks.py (ResnetGenerator: "
                     "ReflectionPad2d, InstanceNorm2d as a functools.partial, ConvTranspose2d, Tanh)",
                     lambda: ResnetGenerator(3, 3, ngf=8 if test else 32, norm_layer=get_norm_layer("instance"),
                                             n_blocks=2 if test else 6),
                     (_image(side, name="input"),), ((BATCH, 3, side, side),), batch),
        Architecture("lstm_encoder", "PyTorch seq2seq tutorial encoder (nn.LSTM batch_first)",
                     lambda: LSTMEncoder(vocab, embed_dim=32 if test else 128, hidden_size=64 if test else 256,
                                         num_outputs=num_classes),
                     (_tokens(vocab, "src"),), ((BATCH, num_classes),), batch if test else 32, seq // 2),
        Architecture("siamese", "Koch et al. Siamese network (shared tower, torch.abs(a - b))",
                     lambda: SiameseNetwork(in_channels=1, width=8 if test else 32, embedding_dim=32 if test else 128),
                     (_image(side, 1, "input1"), _image(side, 1, "input2")), ((BATCH, 1),), batch),
        Architecture("with_data_dependent_block", "MLP around a block with `if x.sum() > 0:`",
                     lambda: WithDataDependentBlock(in_features=16, hidden=32 if test else 1024, num_classes=4),
                     (InputSpec("x", (16,)),), ((BATCH, 4),), batch if test else 64),
    ]
    if HAS_TRANSFORMERS:
        hf_sizes = dict(hidden_size=d_model, num_hidden_layers=depth, num_attention_heads=4, intermediate_size=ffn)
        archs += [
            Architecture("hf_bert", "HuggingFace transformers BertModel, random init (sdpa attention)",
                         lambda: tiny_bert(vocab_size=vocab, max_position_embeddings=2 * seq, **hf_sizes),
                         (_tokens(vocab), InputSpec("attention_mask", (None,), torch.long, "attention_mask")),
                         ((BATCH, SEQ, d_model), (BATCH, d_model)), batch, seq),
            Architecture("hf_gpt2", "HuggingFace transformers GPT2Model, random init (sdpa attention)",
                         lambda: tiny_gpt2(vocab_size=vocab, n_embd=d_model, n_layer=depth, n_head=4,
                                           n_positions=2 * seq),
                         (_tokens(vocab),), ((BATCH, SEQ, d_model),), batch, seq),
            Architecture("hf_llama", "HuggingFace transformers LlamaModel, random init (sdpa attention, "
                         "grouped-query heads, rotary embeddings, RMSNorm, SwiGLU)",
                         lambda: tiny_llama(vocab_size=vocab, hidden_size=d_model, intermediate_size=ffn * 2 // 3,
                                            num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=2 * seq),
                         (_tokens(vocab),), ((BATCH, SEQ, d_model),), batch, seq),
        ]
    return {arch.name: arch for arch in archs}


ARCHITECTURES: dict[str, Architecture] = _registry("test")
BENCHMARK_ARCHITECTURES: dict[str, Architecture] = _registry("benchmark")
