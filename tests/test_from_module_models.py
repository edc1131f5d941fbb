"""tg.from_module on the community models (tests/community_models): torchvision, timm, nanoGPT, transformers.

Each model is brought in, compared with the original (outputs in eval and train mode, state_dict keys
and tensors, the original's checkpoint loading), then summarised, plotted with the real `dot`, saved and
loaded, exported to ONNX (checked in onnxruntime), optimized and trained for one step.
"""

import copy
import struct
import warnings

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models import ARCHITECTURES, hf, tensor_leaves


def _inputs(arch, dynamic_seq: bool = True) -> dict:
    """One tg.Input per forward argument; a sequence dim is the named dim "seq" (shared by the inputs)."""
    return {s.name: tg.Input(shape=tuple(("seq" if dynamic_seq else arch.seq_len) if d is None else d for d in s.shape),
                             dtype=s.dtype, name=s.name) for s in arch.inputs}


def _no_dropout(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return module


def _assert_equivalent(model, net, kwargs: dict) -> None:
    """Same state_dict (keys, order, tensors), same outputs in eval and train mode, checkpoint loads."""
    assert list(model.state_dict()) == list(net.state_dict())
    theirs = net.state_dict(keep_vars=True)
    assert all(t is theirs[k] for k, t in model.state_dict(keep_vars=True).items())
    for mode in (False, True):
        twin = copy.deepcopy(net).train(mode)
        model.load_state_dict(twin.state_dict())  # a checkpoint written for the original, unchanged
        model.train(mode)
        torch.manual_seed(0)
        expected = tensor_leaves(twin(**kwargs))
        torch.manual_seed(0)
        got = tensor_leaves(model(**kwargs))
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if mode:  # train mode updated the same BatchNorm statistics
            for key, t in twin.state_dict().items():
                torch.testing.assert_close(net.state_dict()[key], t, rtol=0, atol=0)
    model.eval()


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    return struct.unpack(">II", data[16:24])


def _check_everything_else(model, kwargs: dict, tmp_path, depth: int | None, exporter: str) -> None:
    """summary and plot (real dot) at `depth`, save/load, ONNX, optimize, one fit step.

    (The dynamo ONNX exporter takes 20-30 s on a ResNet-50 on this machine, the legacy one under 1 s:
    the convolution models use the legacy one; test_export.py covers both exporters.)
    """
    expected = tensor_leaves(model(**kwargs))
    lines = []
    model.summary(depth=depth, print_fn=lines.append)
    assert depth is None or f"Depth: {depth} of" in lines[0]
    dot = tg.plot_model(model, to_file=tmp_path / "model.png", depth=depth)
    width, height = _png_size(tmp_path / "model.png")
    assert width > 200 and height < 8_000 and (depth is None or "cluster" in dot.source)
    tg.save(model, tmp_path / "model.safetensors")
    loaded = tg.load(tmp_path / "model.safetensors").eval()
    assert list(loaded.state_dict()) == list(model.state_dict())
    for a, b in zip(tensor_leaves(loaded(**kwargs)), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    tg.export_onnx(model, tmp_path / "model.onnx", exporter=exporter)  # verified in onnxruntime
    fast = tg.optimize(model)
    for a, b in zip(tensor_leaves(fast(**kwargs)), expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    targets = [t.detach().clone().normal_() for t in expected]
    names = model.output_names
    model.compile(optimizer="sgd", loss="mse")
    model.fit(kwargs if len(kwargs) > 1 else next(iter(kwargs.values())),
              dict(zip(names, targets)) if len(targets) > 1 else targets[0],
              batch_size=len(targets[0]), epochs=1, verbose=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()


@pytest.mark.parametrize("name, depth, exporter", [("resnet50", 2, "legacy"), ("mobilenet_v2", 2, "legacy"),
                                                    ("transformer_classifier", None, "dynamo")])
def test_community_model_end_to_end(name, depth, exporter, tmp_path, one_thread):
    """torchvision ResNet-50 (Bottleneck, shared inplace ReLU), MobileNetV2 and an nn.TransformerEncoder
    classifier: recorded down to torch.nn layers without a warning, equivalent, and every feature works."""
    arch = ARCHITECTURES[name]
    net = _no_dropout(arch.make_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = tg.from_module(net, _inputs(arch))
    kwargs = arch.make_kwargs(batch_size=3)
    _assert_equivalent(model, net, kwargs)
    if arch.is_sequence:  # the named dynamic dim: another length works too
        for a, b in zip(tensor_leaves(model(**arch.make_kwargs(seq_len=5))), tensor_leaves(net.eval()(
                **arch.make_kwargs(seq_len=5)))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    _check_everything_else(model, kwargs, tmp_path, depth, exporter)


def test_resnet50_structure_summary_and_picture(tmp_path):
    """Layers keep torchvision's names; depth 1 is the stem, four stages and the head, in one screen."""
    arch = ARCHITECTURES["resnet50"]
    net = arch.make_model()
    model = tg.from_module(net, _inputs(arch))
    targets = {n.target for n in model.graph.nodes if n.op == "call_module"}
    assert {"conv1", "layer1.0.conv1", "layer1.0.downsample.0", "layer4.2.relu", "fc"} <= targets
    assert sum(n.target == "layer1.0.relu" for n in model.graph.nodes) == 3  # the shared inplace ReLU
    lines = []
    model.summary(depth=1, print_fn=lines.append)
    table = lines[0].splitlines()
    rules = [i for i, line in enumerate(table) if line.startswith("=====")]
    rows = [line.split()[0] for line in table[rules[1] + 1:rules[2]]]
    assert rows == ["x", "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool",
                    "flatten", "fc"]
    assert "layer4 (Sequential)" in lines[0] and "(None, 10)" in lines[0]
    tg.plot_model(model, to_file=tmp_path / "resnet50.png", depth=1)
    width, height = _png_size(tmp_path / "resnet50.png")
    assert height < 1_800 and width < 1_000  # one screen (it is 957 x 19,408 px drawn whole)
    default = tg.model_to_dot(model).source  # too big to draw whole: collapsed, and the title says so
    assert "collapsed to depth 2 of 4" in default and "layer3.5" in default and "layer3_5_conv1" not in default


def test_data_dependent_block_stays_opaque_with_a_warning(tmp_path):
    """`if x.sum() > 0:` in one block: that block is one layer (warned, named), the rest is recorded,
    and both branches give the original's outputs."""
    arch = ARCHITECTURES["with_data_dependent_block"]
    net = arch.make_model()
    with pytest.warns(UserWarning, match=r"'block' \(DataDependent\) stays one opaque layer: recording its "
                                         r"forward failed \('__bool__' needs the data"):
        model = tg.from_module(net, _inputs(arch))
    assert [n.target for n in model.graph.nodes if n.op == "call_module"] == ["stem", "block", "head"]
    _assert_equivalent(model, net, arch.make_kwargs())
    for sign in (1.0, -1.0):
        x = sign * torch.ones(2, 16)
        net.stem.weight.data.abs_(), net.stem.bias.data.zero_()
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    lines = []
    tg.summary(model, print_fn=lines.append)
    assert "block (DataDependent)" in lines[0]


@pytest.mark.parametrize("name", ["vit", "nanogpt_manual_attention", "unet", "lstm_encoder", "siamese"])
def test_more_community_models_are_equivalent(name, one_thread):
    """timm ViT (cls_token, pos_embed), nanoGPT (tied weights, causal-mask buffer), U-Net, LSTM, Siamese."""
    arch = ARCHITECTURES[name]
    net = _no_dropout(arch.make_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = tg.from_module(net, _inputs(arch, dynamic_seq=not name.startswith("nanogpt")))
    _assert_equivalent(model, net, arch.make_kwargs())
    if name.startswith("nanogpt"):
        assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.skipif(not hf.HAS_TRANSFORMERS, reason="transformers is a test extra (requirements-dev.txt)")
@pytest.mark.parametrize("which", ["bert", "gpt2"])
def test_huggingface_models_end_to_end(which, tmp_path, one_thread):
    """Random-config BertModel / GPT2Model with input_ids and attention_mask (a fixed sequence length)."""
    seq = 12
    if which == "bert":
        net = hf.tiny_bert(vocab_size=128, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        net = hf.tiny_gpt2(vocab_size=128, n_embd=32, n_layer=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0)
    inputs = {"input_ids": tg.Input(shape=(seq,), dtype=torch.long, name="input_ids"),
              "attention_mask": tg.Input(shape=(seq,), dtype=torch.long, name="attention_mask")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = tg.from_module(net, inputs)
    assert model.output_names == (["last_hidden_state", "pooler_output"] if which == "bert" else ["last_hidden_state"])
    ids = torch.randint(0, 128, (3, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0  # padding
    kwargs = {"input_ids": ids, "attention_mask": mask}
    _assert_equivalent(model, net, kwargs)
    _check_everything_else(model, kwargs, tmp_path, depth=2, exporter="dynamo")


@pytest.mark.skipif(not hf.HAS_TRANSFORMERS, reason="transformers is a test extra (requirements-dev.txt)")
def test_llama_whose_blocks_are_self_layers(tmp_path, one_thread):
    """LlamaModel keeps its decoder blocks in ``self.layers``, the name of a tg.Model property: the
    recording keeps that name (model.layers is its ModuleList, as on the original), for any length."""
    torch.manual_seed(0)
    net = hf.tiny_llama().eval()
    model = tg.from_module(net, {"input_ids": tg.Input(shape=(None,), dtype=torch.long, name="input_ids")})
    assert type(model.layers) is nn.ModuleList and model.layers[1].mlp.up_proj is net.layers[1].mlp.up_proj
    for seq in (5, 9):
        ids = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seq))
        _assert_equivalent(model, net, {"input_ids": ids})
    model.eval()
    tg.save(model, tmp_path / "llama.safetensors")
    loaded = tg.load(tmp_path / "llama.safetensors").eval()
    assert list(loaded.state_dict()) == list(net.state_dict()) and type(loaded.layers) is nn.ModuleList
    assert loaded.code.count("torch._assert(") == model.code.count("torch._assert(") > 0  # branch guards
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(input_ids=ids)["last_hidden_state"], net(input_ids=ids).last_hidden_state,
                               rtol=0, atol=0)
