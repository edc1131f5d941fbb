"""The community reference models run eagerly, as their authors wrote them (no torchgraph here)."""

import doctest
import math
import pathlib
import subprocess
import sys

import pytest
import torch

import community_models as cm
from community_models import ARCHITECTURES, BENCHMARK_ARCHITECTURES, tensor_leaves

TESTS = pathlib.Path(__file__).resolve().parent


def _run(model, arch, batch_size, seq_len=None):
    with torch.no_grad():
        return tensor_leaves(model(*arch.make_inputs(batch_size, seq_len)))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_test_size_runs_with_expected_shapes_and_is_deterministic(name, one_thread):
    """Each model runs at two batch sizes (and two sequence lengths), with the registry's shapes, reproducibly."""
    arch = ARCHITECTURES[name]
    model = arch.make_model().eval()
    twin = arch.make_model().eval()  # same seed: same weights
    seq_lens = (arch.seq_len, arch.seq_len // 2 + 1) if arch.is_sequence else (None,)
    for batch_size in (2, 3):
        for seq_len in seq_lens:
            outputs = _run(model, arch, batch_size, seq_len)
            expected = arch.expected_output_shapes(batch_size, seq_len)
            assert [tuple(o.shape) for o in outputs] == list(expected), (batch_size, seq_len)
            assert all(torch.isfinite(o).all() for o in outputs)
            for again in (_run(model, arch, batch_size, seq_len), _run(twin, arch, batch_size, seq_len)):
                for a, b in zip(outputs, again):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(BENCHMARK_ARCHITECTURES))
def test_benchmark_size_builds_and_runs(name, one_thread):
    """The benchmark-size configs build and produce the registry's output shapes (run at batch 2 to save time)."""
    arch = BENCHMARK_ARCHITECTURES[name]
    outputs = _run(arch.make_model().eval(), arch, batch_size=2)
    assert [tuple(o.shape) for o in outputs] == list(arch.expected_output_shapes(batch_size=2))


def test_registry_lists_every_family_at_both_sizes():
    """Both registries hold the same names, including the HuggingFace models when transformers is installed."""
    assert ARCHITECTURES.keys() == BENCHMARK_ARCHITECTURES.keys()
    expected = {"resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "vit", "nanogpt",
                "nanogpt_manual_attention", "transformer_classifier", "unet", "lstm_encoder", "siamese",
                "with_data_dependent_block", "efficientnet_b0", "shufflenet_v2", "densenet"}
    assert expected <= ARCHITECTURES.keys()
    assert cm.HAS_TRANSFORMERS == ({"hf_bert", "hf_gpt2", "hf_llama"} <= ARCHITECTURES.keys())


def test_registry_docstring_example_runs():
    """The registry module's docstring example works."""
    result = doctest.testmod(cm.registry)
    assert result.attempted > 0 and result.failed == 0


def test_make_inputs_seeded_and_masks_keep_a_token():
    """Inputs are reproducible per seed, differ across seeds, and each masked sample keeps real tokens."""
    arch = ARCHITECTURES["transformer_classifier"]
    ids, mask = arch.make_inputs(batch_size=4, seq_len=7)
    ids_again, mask_again = arch.make_inputs(batch_size=4, seq_len=7)
    assert torch.equal(ids, ids_again) and torch.equal(mask, mask_again)
    assert not torch.equal(ids, arch.make_inputs(batch_size=4, seq_len=7, seed=1)[0])
    assert mask.dtype == torch.bool and mask.shape == (4, 7)
    assert mask.tolist()[0] == [False] * 7 and mask.tolist()[1] == [False] * 4 + [True] * 3
    assert (~mask).sum(dim=1).min() >= 1
    assert set(arch.make_kwargs(batch_size=2)) == {"input_ids", "src_key_padding_mask"}


def test_make_model_leaves_the_global_rng_alone():
    """make_model seeds a forked RNG: the caller's random stream continues unchanged."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ARCHITECTURES["vit"].make_model()
    assert torch.equal(torch.rand(3), expected)


def test_tensor_leaves_flattens_and_rejects_unknown():
    """tensor_leaves flattens tuples and dicts, drops None, and names the type it cannot flatten."""
    a, b = torch.zeros(1), torch.ones(2)
    assert tensor_leaves((a, None, {"x": b, "y": [a]})) == (a, b, a)
    with pytest.raises(TypeError, match="cannot flatten an output of type str"):
        tensor_leaves("logits")


def test_package_imports_neither_torchgraph_nor_transformers():
    """The models are plain PyTorch: importing them loads no torchgraph, and transformers only lazily."""
    code = ("import sys, community_models; "
            "assert 'torchgraph' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=TESTS, check=True)
    for path in (TESTS / "community_models").glob("*.py"):
        text = path.read_text()
        assert "import torchgraph" not in text and "from torchgraph" not in text, path


def test_resnet_follows_torchvision_structure():
    """One shared ReLU per block, downsample = Sequential(conv1x1, BN), Bottleneck expansion 4, zero_init_residual."""
    model = cm.resnet18(num_classes=7, width=8)
    block = model.layer2[0]
    assert sum(isinstance(m, torch.nn.ReLU) for m in block.children()) == 1 and block.relu.inplace
    assert [type(m) for m in block.downsample] == [torch.nn.Conv2d, torch.nn.BatchNorm2d]
    assert isinstance(model.layer1, torch.nn.Sequential) and len(model.layer1) == 2
    resnet50 = cm.resnet50(num_classes=7, width=8, zero_init_residual=True)
    stages = (resnet50.layer1, resnet50.layer2, resnet50.layer3, resnet50.layer4)
    assert [len(stage) for stage in stages] == [3, 4, 6, 3]
    assert resnet50.fc.in_features == 8 * 8 * cm.Bottleneck.expansion
    assert all(m.bn3.weight.abs().sum() == 0 for m in resnet50.modules() if isinstance(m, cm.Bottleneck))


def test_mobilenet_blocks_add_the_residual():
    """InvertedResidual (V2) and the in-place `result += input` (V3) both equal block(x) + x when shapes allow."""
    torch.manual_seed(0)
    v2 = cm.InvertedResidual(16, 16, stride=1, expand_ratio=6).eval()
    x = torch.randn(2, 16, 8, 8)
    assert v2.use_res_connect
    torch.testing.assert_close(v2(x), v2.conv(x) + x)
    cnf = cm.InvertedResidualConfig(40, 5, 240, 40, True, "HS", 1, width_mult=1.0)
    v3 = cm.InvertedResidualV3(cnf).eval()
    x = torch.randn(2, 40, 8, 8)
    assert v3.use_res_connect and isinstance(v3.block[2], cm.SqueezeExcitation)
    with torch.no_grad():
        torch.testing.assert_close(v3(x.clone()), v3.block(x.clone()) + x)


def test_squeeze_excitation_scales_by_hardsigmoid():
    """SE output = hardsigmoid(fc2(relu(fc1(pool(x))))) * x."""
    torch.manual_seed(0)
    se = cm.SqueezeExcitation(16)
    x = torch.randn(2, 16, 5, 5)
    scale = se.fc2(torch.relu(se.fc1(x.mean(dim=(2, 3), keepdim=True))))
    torch.testing.assert_close(se(x), torch.nn.functional.hardsigmoid(scale) * x)


def test_efficientnet_stochastic_depth_is_identity_in_eval_and_drops_rows_in_train():
    """MBConv adds its branch through StochasticDepth(p, "row"): identity in eval; in train, with a seed, whole
    samples of the branch are zeroed and the kept ones divided by the survival rate."""
    model = cm.efficientnet_b0(num_classes=10, width_mult=0.25)
    blocks = [m for m in model.modules() if isinstance(m, cm.efficientnet.MBConv)]
    assert len(blocks) == 16 and blocks[0].stochastic_depth.p == 0.0
    assert blocks[-1].stochastic_depth.p == pytest.approx(0.2 * 15 / 16) and blocks[-1].stochastic_depth.mode == "row"
    assert [type(m) for m in blocks[-1].block[2].children()] == [torch.nn.AdaptiveAvgPool2d, torch.nn.Conv2d,
                                                                  torch.nn.Conv2d, torch.nn.SiLU, torch.nn.Sigmoid]
    depth = blocks[-1].stochastic_depth
    x = torch.randn(64, 3, 2, 2)
    assert depth.eval()(x) is x
    torch.manual_seed(0)
    y = depth.train()(x)
    kept = (y == 0).flatten(1).all(dim=1).logical_not()
    assert 0 < kept.sum() < 64  # some rows dropped, some kept (p ~ 0.19)
    torch.testing.assert_close(y[kept], x[kept] / (1 - depth.p))
    assert y[~kept].abs().sum() == 0
    cnf = cm.MBConvConfig(6, 5, 1, 40, 40, 1)
    block = cm.efficientnet.MBConv(cnf, 0.5, torch.nn.BatchNorm2d).eval()
    x = torch.randn(2, 40, 6, 6)
    assert block.use_res_connect and block.block[1][0].kernel_size == (5, 5) and block.block[1][0].groups == 240
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.block(x) + x)


def test_shufflenet_channel_shuffle_interleaves_the_groups():
    """channel_shuffle(x, 2) on 6 channels gives channel order 0, 3, 1, 4, 2, 5; stride-1 units keep x1 as is."""
    x = torch.arange(2 * 6 * 2 * 2, dtype=torch.float32).view(2, 6, 2, 2)
    y = cm.channel_shuffle(x, 2)
    assert y.shape == x.shape and y.is_contiguous()
    torch.testing.assert_close(y, x[:, [0, 3, 1, 4, 2, 5]], rtol=0, atol=0)
    torch.testing.assert_close(cm.channel_shuffle(x, 3), x[:, [0, 2, 4, 1, 3, 5]], rtol=0, atol=0)
    torch.manual_seed(0)
    unit = cm.shufflenet.InvertedResidual(16, 16, 1).eval()
    assert len(unit.branch1) == 0 and unit.branch2[3].groups == 8
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        y = unit(x)
    torch.testing.assert_close(y[:, 0::2], x[:, :8])  # the untouched half lands on the even channels
    with pytest.raises(ValueError, match="Invalid combination of stride 1"):
        cm.shufflenet.InvertedResidual(16, 24, 1)
    model = ARCHITECTURES["shufflenet_v2"].make_model()
    assert [len(model.stage2), len(model.stage3), len(model.stage4)] == [2, 2, 2]
    assert [len(stage) for stage in (cm.shufflenet_v2_x0_5().stage2, cm.shufflenet_v2_x0_5().stage3)] == [4, 8]


def test_densenet_block_concatenates_every_layer():
    """A dense block's output has in + layers * growth channels, its first channels are its input, and each
    layer sees the concatenation of everything before it (a Tensor or a list of Tensors)."""
    torch.manual_seed(0)
    block = cm.densenet._DenseBlock(num_layers=3, num_input_features=10, bn_size=4, growth_rate=6, drop_rate=0).eval()
    assert list(block.keys()) == ["denselayer1", "denselayer2", "denselayer3"]
    x = torch.randn(2, 10, 5, 5)
    with torch.no_grad():
        y = block(x)
        assert y.shape == (2, 10 + 3 * 6, 5, 5)
        torch.testing.assert_close(y[:, :10], x, rtol=0, atol=0)
        layer = block.denselayer2
        torch.testing.assert_close(layer([x, y[:, 10:16]]), y[:, 16:22])
        torch.testing.assert_close(block.denselayer1(x), block.denselayer1([x]))
    assert [name for name, _ in layer.named_children()] == ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]
    model = cm.densenet121(num_classes=10)
    names = [name for name, _ in model.features.named_children()]
    assert names[:5] == ["conv0", "norm0", "relu0", "pool0", "denseblock1"] and names[-1] == "norm5"
    assert model.classifier.in_features == 1024 and len(model.features.denseblock3) == 24
    assert [type(m) for m in model.features.transition1] == [torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.Conv2d,
                                                               torch.nn.AvgPool2d]


def test_vit_fused_and_manual_attention_agree():
    """timm's fused SDPA path and its written-out softmax path give the same logits."""
    fused = ARCHITECTURES["vit"]
    manual = ARCHITECTURES["vit_manual_attention"]
    (x,) = fused.make_inputs(batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(fused.make_model().eval()(x), manual.make_model().eval()(x))


def test_nanogpt_flash_and_manual_attention_agree():
    """The flash path and the masked manual path (tril `bias` buffer) give the same logits for the same weights."""
    arch = ARCHITECTURES["nanogpt"]
    flash = arch.make_model().eval()
    manual = ARCHITECTURES["nanogpt_manual_attention"].make_model().eval()
    missing, unexpected = manual.load_state_dict(flash.state_dict(), strict=False)
    assert not unexpected and missing and all(key.endswith("attn.bias") for key in missing)
    assert flash.transformer.h[0].attn.flash and not manual.transformer.h[0].attn.flash
    (idx,) = arch.make_inputs(batch_size=2, seq_len=12)
    targets = torch.roll(idx, -1, dims=1)
    with torch.no_grad():
        for args in ((idx,), (idx, targets)):
            (flash_logits, flash_loss), (manual_logits, manual_loss) = flash(*args), manual(*args)
            torch.testing.assert_close(flash_logits, manual_logits)
            if flash_loss is not None:
                torch.testing.assert_close(flash_loss, manual_loss)


def test_nanogpt_forward_as_karpathy_wrote_it():
    """Tied weights, last-position logits without targets, full logits and a ~ln(vocab) loss with them."""
    config = cm.GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = cm.GPT(config).eval()
    assert model.transformer.wte.weight is model.lm_head.weight
    idx = torch.randint(0, 64, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 64) and loss is None
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 10, 64) and loss.ndim == 0
    assert abs(loss.item() - math.log(64)) < 0.5  # near-uniform predictions at init
    with pytest.raises(AssertionError, match="block size is only 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert model.generate(idx[:, :4], max_new_tokens=3).shape == (3, 7)


def test_nanogpt_trains_one_step():
    """configure_optimizers + loss.backward() reduce the loss on a repeated batch (the tied weight gets one grad)."""
    torch.manual_seed(0)
    model = cm.GPT(cm.GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95), device_type="cpu")
    data = torch.randint(0, 64, (4, 17))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()  # nanoGPT's get_batch stacks contiguous rows
    losses = []
    for _ in range(5):
        _, loss = model(x, targets=y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_classifier_ignores_padded_tokens(norm_first):
    """With src_key_padding_mask, tokens at padded positions do not change the logits (masked mean pooling)."""
    name = "transformer_classifier_prenorm" if norm_first else "transformer_classifier"
    arch = ARCHITECTURES[name]
    model = arch.make_model().eval()
    ids, mask = arch.make_inputs(batch_size=2, seq_len=8)
    changed = ids.masked_fill(mask, 7)
    assert not torch.equal(ids, changed)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), model(changed, mask))
        assert model(ids).shape == (2, 3)  # without a mask: plain mean pooling


def test_unet_pads_odd_sizes():
    """Up pads the upsampled map to the skip's size, so any input side works and the output keeps it."""
    torch.manual_seed(0)
    for bilinear in (False, True):
        model = cm.UNet(n_channels=1, n_classes=3, bilinear=bilinear, base=4).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 1, 35, 33)).shape == (2, 3, 35, 33)


def test_lstm_encoder_reads_the_last_hidden_state():
    """The output is fc(h_n of the last layer), which for a one-directional LSTM is the last time step's output."""
    torch.manual_seed(0)
    model = cm.LSTMEncoder(50, embed_dim=8, hidden_size=12, num_layers=2, num_outputs=5).eval()
    src = torch.randint(0, 50, (3, 6))
    outputs, _ = model.lstm(model.embedding(src))
    torch.testing.assert_close(model(src), model.fc(outputs[:, -1]))


def test_siamese_is_symmetric_with_one_tower():
    """The tower is shared (one set of weights) and |a - b| makes the score symmetric."""
    arch = ARCHITECTURES["siamese"]
    model = arch.make_model().eval()
    a, b = arch.make_inputs(batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(model(a, b), model(b, a))
    assert [name for name, _ in model.named_children()] == ["tower", "head"]


def test_data_dependent_takes_both_branches():
    """The branch depends on the sign of x.sum(): the same module computes two different functions."""
    torch.manual_seed(0)
    block = cm.DataDependent(4)
    x = torch.rand(2, 4) + 0.1
    torch.testing.assert_close(block(x), block.positive(x))
    torch.testing.assert_close(block(-x), torch.relu(block.negative(-x)))
    model = cm.WithDataDependentBlock(in_features=16, hidden=32, num_classes=4)
    signs = {bool(model.stem(torch.randn(1, 16)).sum() > 0) for _ in range(20)}
    assert signs == {False, True}  # inputs reach both branches inside the bigger model


@pytest.mark.parametrize("name", ["hf_bert", "hf_gpt2"])
def test_hf_models_eager_and_sdpa_agree(name):
    """transformers' sdpa and eager attention give the same hidden states (random init, attention mask honoured)."""
    pytest.importorskip("transformers")
    factory = cm.tiny_bert if name == "hf_bert" else cm.tiny_gpt2
    arch = ARCHITECTURES[name]
    kwargs = ARCHITECTURES["hf_bert"].make_kwargs(batch_size=2, seq_len=10)  # input_ids and a padding mask
    torch.manual_seed(0)
    sdpa = factory(attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    eager = factory(attn_implementation="eager").eval()
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    with torch.no_grad():
        for a, b in zip(tensor_leaves(sdpa(**kwargs)), tensor_leaves(eager(**kwargs))):
            keep = kwargs["attention_mask"].bool()
            torch.testing.assert_close(a[keep] if a.ndim == 3 else a, b[keep] if b.ndim == 3 else b)
    if name == "hf_gpt2":  # no DynamicCache in the output: last_hidden_state only
        assert list(arch.make_model().eval()(**arch.make_kwargs()).keys()) == ["last_hidden_state"]
