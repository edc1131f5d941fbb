"""Community models built as written with the symbolic API, and compared to eager PyTorch.

Each model comes from ``tests/community_models`` (code written the way torchvision, timm, nanoGPT, the
nn.TransformerEncoder tutorials and HuggingFace write it). Its own top-level ``forward`` code is run on
``tg.Input`` symbolic tensors -- ``model.forward(*inputs)``, not ``model(*inputs)``, so that the top level
(nanoGPT's ``b, t = idx.size()``, ``assert t <= block_size``, ``torch.arange(0, t, device=device)``; ViT's
``cls_token.expand(B, -1, -1)`` and ``pos_embed`` add; ResNet's ``torch.flatten``) is recorded op by op
while the community's blocks (Bottleneck, nn.Sequential stages, nanoGPT Blocks with the ``bias`` mask
sliced by T, SE modules) become layers. HuggingFace models are called as layers on symbolic
``input_ids`` and ``attention_mask`` sharing a named dim. Every built model must equal the eager model
at several sizes of every dynamic dim, in eval mode and in train mode (dropout drawing the same masks
from the same seed).
"""

import pytest
import torch

import torchgraph as tg
from community_models import ARCHITECTURES, HAS_TRANSFORMERS, tensor_leaves

# name -> per input: the shape given to tg.Input (dynamic dims as None or tg.Dim); sizes to compare at.
IMAGE_SIDES = ((32, 32), (40, 48))
T_SIZES = (1, 7, 32)


def _token_dim(name: str):
    """The sequence dim of a model with a positional table: bounded by the table (block_size, max_len)."""
    bounded = {"nanogpt": 32, "nanogpt_manual_attention": 32, "llama_titan": 32, "transformer_classifier": 32,
               "transformer_classifier_prenorm": 32, "hf_bert": 32, "hf_gpt2": 32}
    return tg.Dim("T", max=bounded[name]) if name in bounded else "T"


SPECS = {
    "resnet18": ("image", (3, None, None)),
    "resnet50": ("image", (3, None, None)),
    "mobilenet_v2": ("image", (3, None, None)),
    "mobilenet_v3_small": ("image", (3, None, None)),
    "convnext": ("image", (3, None, None)),
    "efficientnet_b0": ("image", (3, None, None)),
    "shufflenet_v2": ("image", (3, None, None)),
    "densenet": ("image", (3, None, None)),
    "unet": ("image", (3, None, None)),
    "vit": ("image", (3, 32, 32)),
    "vit_manual_attention": ("image", (3, 32, 32)),
    "siamese": ("image", (1, 32, 32)),
    "nanogpt": ("tokens", None),
    "nanogpt_manual_attention": ("tokens", None),
    "llama_titan": ("tokens", None),
    "transformer_classifier": ("tokens", None),
    "transformer_classifier_prenorm": ("tokens", None),
    "lstm_encoder": ("tokens", None),
    "with_data_dependent_block": ("vector", None),
    "hf_bert": ("tokens", None),
    "hf_gpt2": ("tokens", None),
}
AS_LAYER = {"hf_bert", "hf_gpt2"}            # called as one layer (keyword arguments, HF ModelOutput)


def _symbolic_inputs(name, arch):
    kind, shape = SPECS[name]
    inputs = []
    for spec in arch.inputs:
        if kind == "image":
            dims = shape
        elif kind == "tokens":
            dims = tuple(_token_dim(name) if d is None else d for d in spec.shape)
        else:
            dims = spec.shape
        inputs.append(tg.Input(shape=dims, dtype=spec.dtype, name=spec.name))
    return inputs


def _real_inputs(name, arch, batch, size, seed):
    kind, shape = SPECS[name]
    if kind == "image":
        generator = torch.Generator().manual_seed(seed)
        h, w = size if shape[1] is None else shape[1:]
        return tuple(torch.randn(batch, shape[0], h, w, generator=generator) for _ in arch.inputs)
    return arch.make_inputs(batch_size=batch, seq_len=size if kind == "tokens" else None, seed=seed)


def _sizes(name):
    kind, shape = SPECS[name]
    if kind == "image":
        return IMAGE_SIDES if shape[1] is None else ((None, None),)
    return T_SIZES if kind == "tokens" else (None,)


def _build(name, model):
    arch = ARCHITECTURES[name]
    inputs = _symbolic_inputs(name, arch)
    if name in AS_LAYER:
        outputs = model(**{spec.name: x for spec, x in zip(arch.inputs, inputs)})
    else:
        outputs = model.forward(*inputs)  # the community's own top-level code, on symbolic tensors
    return tg.Model(inputs, list(tensor_leaves(outputs)), name=type(model).__name__)


def _cases(name, train: bool):
    """(batch, size) pairs: in eval mode every dynamic dim takes 2-3 sizes; train mode checks one or two."""
    sizes = _sizes(name)
    if train:  # BatchNorm in train mode needs two or more values per channel
        return [(2, sizes[0]), (3, sizes[-1])] if len(sizes) > 2 else [(2, sizes[-1])]
    return [(1, sizes[0]), (3, sizes[-1])] + [(2, size) for size in sizes[1:-1]]


def _compare(name, model, built, train: bool):
    arch = ARCHITECTURES[name]
    model.train(train)
    built.train(train)
    for seed, (batch, size) in enumerate(_cases(name, train)):
        inputs = _real_inputs(name, arch, batch, size, seed)
        with torch.no_grad():
            torch.manual_seed(seed)  # dropout in train mode draws the same masks in the same order
            if name in AS_LAYER:
                expected = tensor_leaves(model(**{s.name: x for s, x in zip(arch.inputs, inputs)}))
            else:
                expected = tensor_leaves(model(*[x.clone() for x in inputs]))
            torch.manual_seed(seed)
            got = built(*[x.clone() for x in inputs])
        assert len(got) == len(expected), name
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {batch} {size}: {m}")


ALL = [n for n in SPECS if n in ARCHITECTURES]
if not HAS_TRANSFORMERS:  # the HF entries need the test extra (requirements-dev.txt pins it)
    ALL = [n for n in ALL if not n.startswith("hf_")]


@pytest.mark.parametrize("name", ALL)
def test_community_model_built_as_written_matches_eager(name):
    """The community's code, recorded on symbolic inputs, computes what eager PyTorch computes."""
    arch = ARCHITECTURES[name]
    model = arch.make_model().eval()
    built = _build(name, model)
    _compare(name, model, built, train=False)
    _compare(name, model, built, train=True)


def test_nanogpt_top_level_is_recorded_op_by_op():
    """nanoGPT's forward as written: sizes, the block_size guard, arange on idx.device, blocks as layers."""
    arch = ARCHITECTURES["nanogpt_manual_attention"]
    model = arch.make_model().eval()
    built = _build("nanogpt_manual_attention", model)
    code = built.code
    assert "idx.size()" in code or "size" in code
    assert "torch._assert" in code and "torch.arange" in code and "device = getattr" in code
    layers = [type(m).__name__ for m in built.layers]
    assert layers.count("Block") == model.config.n_layer and "Embedding" in layers
    with pytest.raises(ValueError, match="must satisfy"):  # T beyond block_size: named at call time
        built(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


def test_vit_top_level_expands_the_class_token_per_batch():
    """timm's cls_token.expand(B, -1, -1) records the batch size, so any batch works."""
    arch = ARCHITECTURES["vit"]
    model = arch.make_model().eval()
    built = _build("vit", model)
    assert "expand" in built.code and "cat" in built.code
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(built(x)[0], model(x), rtol=1e-4, atol=1e-5)
