"""``benchmarks/bench_peers.py --ablate``: each ablation really switches its optimisation off (and
nothing else), so the figures the docs quote from it measure what they say."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from torchgraph import fused, passes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_peers  # noqa: E402
from community_models.vit import Attention  # noqa: E402
from handwritten import Bottleneck, randomize_batchnorm  # noqa: E402

needs_fast_paths = pytest.mark.usefixtures("mkl_routes")  # MKL's routes, as on an Intel CPU


class _Net(nn.Module):
    """A torchvision bottleneck on a 2x2 map (residual conv, few-pixel convs), timm attention written
    out (``fused_attn=False``) and a classifier head with few rows."""

    def __init__(self):
        super().__init__()
        self.block = Bottleneck(64, 16)
        self.attn = Attention(64, num_heads=4, fused_attn=False)
        self.head = nn.Linear(64, 1024)

    def forward(self, x):
        h = self.block(x)  # (B, 64, 2, 2)
        tokens = h.flatten(2).transpose(1, 2)  # (B, 4, 64)
        return self.head(self.attn(tokens).mean(1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = randomize_batchnorm(_Net()).eval()
    x = tg.Input(shape=(64, 2, 2))
    return net, tg.Model(x, net(x)).eval()


def _targets(model) -> set:
    return {node.target for node in model.graph.nodes if node.op == "call_function"}


def _ops_run(fn, x) -> list:
    with torch.profiler.profile() as prof, torch.inference_mode():
        fn(x)
    return [event.name for event in prof.events()]


def test_every_ablation_patches_names_that_exist():
    for name, (_, patches) in bench_peers.ABLATIONS.items():
        for module, attribute, _ in patches:
            assert hasattr(module, attribute), (name, module.__name__, attribute)
    with pytest.raises(AttributeError):
        with bench_peers._patched([(passes, "no_such_pass", None)]):
            pass


def test_graph_ablations_remove_their_rewrite_only(model):
    net, graph_model = model
    full = _targets(tg.optimize(graph_model))
    fns, _ = bench_peers._ablated_variants(graph_model, ["conv-residual", "qkv-attention", "written-attention"])
    residual = _targets(fns["tg.optimize -conv-residual"].fn)
    assert fused.conv2d_add_act in full and fused.conv2d_add_act not in residual
    assert fused.qkv_attention in full and fused.qkv_attention in residual
    assert fused.qkv_attention not in _targets(fns["tg.optimize -qkv-attention"].fn)
    written = _targets(fns["tg.optimize -written-attention"].fn)
    assert fused.qkv_attention not in written  # softmax(q @ k^T * s) @ v stays as written
    x = torch.randn(2, 64, 2, 2)
    with torch.inference_mode():
        want = net(x)
        for fn in fns.values():
            torch.testing.assert_close(fn(x), want, rtol=1e-4, atol=1e-4)
    assert passes.fuse_conv_add is not bench_peers._no_pass  # restored after the build


@needs_fast_paths
def test_runtime_ablations_take_the_other_path(model):
    _, graph_model = model
    fns, _ = bench_peers._ablated_variants(graph_model, ["conv-gemm", "few-rows-mkl"])
    fast = tg.optimize(graph_model)
    x = torch.randn(2, 64, 2, 2)
    full = _ops_run(fast, x)
    assert "mkl::_mkl_linear" in full
    no_gemm = _ops_run(fns["tg.optimize -conv-gemm"], x)
    no_few_rows = _ops_run(fns["tg.optimize -few-rows-mkl"], x)
    # the convs on the 2x2 map run as MKL GEMMs, and so does the head (2 rows x 64 -> 1024): without
    # the conv GEMMs only the head is left on MKL; without the few-rows path only the convs are
    assert "mkldnn::_convolution_pointwise" not in full
    assert "mkldnn::_convolution_pointwise" in no_gemm and no_gemm.count("mkl::_mkl_linear") == 1
    assert "mkldnn::_convolution_pointwise" not in no_few_rows
    assert no_few_rows.count("mkl::_mkl_linear") == full.count("mkl::_mkl_linear") - 1 >= 3
    assert fused.conv.CONV_GEMM_MAX_ROWS > 0 and fused.linear.MKL_PACKED_MAX_ROWS > 0  # restored


@needs_fast_paths
def test_token_rows_ablation_moves_only_those_linears_to_onednn():
    """ViT-S's linears (a few hundred token rows) run MKL's packed GEMM; ``-mkl-token-rows`` puts
    them back on oneDNN and leaves the few-rows head on MKL."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Flatten(), nn.Linear(100 * 256, 300)).eval()
    x_sym = tg.Input(shape=(100, 256))
    graph_model = tg.Model(x_sym, net(x_sym)).eval()
    fns, _ = bench_peers._ablated_variants(graph_model, ["mkl-token-rows"])
    x = torch.randn(2, 100, 256)  # 200 token rows, then a 2-row head
    full = _ops_run(tg.optimize(graph_model), x)
    ablated = _ops_run(fns["tg.optimize -mkl-token-rows"], x)
    assert full.count("mkl::_mkl_linear") == 2 and "mkldnn::_linear_pointwise" not in full
    assert ablated.count("mkl::_mkl_linear") == 1 and ablated.count("mkldnn::_linear_pointwise") == 1
    with torch.inference_mode():
        torch.testing.assert_close(fns["tg.optimize -mkl-token-rows"](x), net(x), rtol=1e-4, atol=1e-4)
    assert fused.linear.MKL_PACKED_MAX_ROWS == 256  # restored


@needs_fast_paths
def test_overhead_ablations_switch_off_plans_and_walks(model):
    """``-conv-plans`` leaves every fused convolution deciding per call (no plan is stored for its
    weights); ``-shared-walks`` leaves fx's own code generator. Values are unchanged."""
    net, graph_model = model
    fns, _ = bench_peers._ablated_variants(graph_model, ["conv-plans", "shared-walks"])
    fast = tg.optimize(graph_model)
    assert type(fns["tg.optimize -shared-walks"].fn.graph._codegen) is torch.fx.graph.CodeGen
    assert type(fast.graph._codegen) is not torch.fx.graph.CodeGen
    x = torch.randn(2, 64, 2, 2)
    with torch.inference_mode():
        want = net(x)
        for fn in (*fns.values(), fast):
            torch.testing.assert_close(fn(x), want, rtol=1e-4, atol=1e-4)

    def planned(module) -> list:
        plans = fused.conv._PLANS.keys() | fused.conv._ADD_PLANS.keys()
        return [id(p) in plans for p in module.parameters() if p.dim() == 4]

    assert planned(fast) and all(planned(fast))
    assert planned(fns["tg.optimize -conv-plans"].fn) and not any(planned(fns["tg.optimize -conv-plans"].fn))
    assert fused.conv._new_plan is not bench_peers._no_plan  # restored


def test_attention_kernels_ablation_leaves_sdpa_as_written(model):
    """``--ablate attention-kernels``: neither fused attention call is left, only F.scaled_dot_product_attention
    (what write_attention_as_sdpa made of timm's written-out attention), with the same outputs."""
    net, graph_model = model
    fns, _ = bench_peers._ablated_variants(graph_model, ["attention-kernels"])
    ablated = fns["tg.optimize -attention-kernels"]
    targets = _targets(ablated.fn)
    assert fused.qkv_attention in _targets(tg.optimize(graph_model))
    assert fused.qkv_attention not in targets and fused.scaled_dot_product_attention not in targets
    assert torch.nn.functional.scaled_dot_product_attention in targets
    x = torch.randn(2, 64, 2, 2)
    with torch.inference_mode():
        torch.testing.assert_close(ablated(x), net(x), rtol=1e-4, atol=1e-4)


def test_sdpa_kernel_ablation_keeps_sdpa_itself():
    """``--ablate sdpa-kernel``: a masked SDPA call stays F.scaled_dot_product_attention instead of
    fused.scaled_dot_product_attention (ops.attention_inference), with the same outputs."""
    torch.manual_seed(0)

    class MaskedAttention(nn.Module):
        def forward(self, x, keep):
            heads = x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)
            out = nn.functional.scaled_dot_product_attention(heads, heads, heads, attn_mask=keep[:, None, None, :])
            return out.transpose(1, 2).flatten(2)

    x, keep = tg.Input(shape=(5, 8)), tg.Input(shape=(5,), dtype=torch.bool)
    graph_model = tg.Model([x, keep], MaskedAttention()(x, keep))
    fns, _ = bench_peers._ablated_variants(graph_model, ["sdpa-kernel"])
    ablated = fns["tg.optimize -sdpa-kernel"]
    assert fused.scaled_dot_product_attention in _targets(tg.optimize(graph_model))
    assert fused.scaled_dot_product_attention not in _targets(ablated.fn)
    data = torch.randn(3, 5, 8), torch.rand(3, 5) > 0.3
    with torch.inference_mode():
        torch.testing.assert_close(ablated(*data), graph_model(*data))


def test_record_parents_ablation_leaves_the_untraceable_attention_one_call():
    """``--ablate record-parents``: torchtitan's attention (fx cannot trace it, and it takes the rotary
    buffer) stays one opaque call, as before parents were recorded; the full optimize inlines it."""
    from community_models.llama_titan import Attention as TitanAttention
    from community_models.llama_titan import Transformer, TransformerModelArgs

    torch.manual_seed(0)
    net = Transformer(TransformerModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64)).eval()
    tokens = tg.Input(shape=(8,), dtype=torch.long)
    graph_model = tg.Model(tokens, net(tokens))
    fns, _ = bench_peers._ablated_variants(graph_model, ["record-parents"])
    ablated = fns["tg.optimize -record-parents"]

    def attention_calls(model):
        return sum(n.op == "call_module" and isinstance(model.get_submodule(n.target), TitanAttention)
                   for n in model.graph.nodes)

    assert attention_calls(ablated.fn) == 1 and attention_calls(tg.optimize(graph_model)) == 0
    data = torch.randint(0, 64, (2, 8))
    with torch.inference_mode():
        torch.testing.assert_close(ablated(data), net(data), atol=1e-5, rtol=1e-5)


def test_nhwc_permute_ablation_copies_before_the_permute_again():
    """``--ablate nhwc-permute``: ConvNeXt's ``x.permute(0, 2, 3, 1)`` of a channels_last conv value reads a
    contiguous copy again (``.contiguous()`` first), as before; the full optimize reads the value itself."""
    from community_models.convnext import convnext_atto

    net = convnext_atto(num_classes=10, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), ls_init_value=0.5).eval()
    x = tg.Input(shape=(3, 32, 32))
    graph_model = tg.Model(x, net(x))
    fns, _ = bench_peers._ablated_variants(graph_model, ["nhwc-permute"])
    ablated = fns["tg.optimize -nhwc-permute"]

    def copies_before_permutes(model):
        return sum(n.op == "call_method" and n.target == "contiguous"
                   and any(u.op == "call_method" and u.target == "permute" for u in n.users) for n in model.graph.nodes)

    assert copies_before_permutes(ablated.fn) > 0 and copies_before_permutes(tg.optimize(graph_model)) == 0
    data = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(ablated(data), net(data), atol=1e-4, rtol=1e-4)


def test_tokens_and_concat_ablations_copy_before_the_flatten_and_the_concatenation_again():
    """``--ablate tokens-layout`` and ``--ablate concat-layout``: a patch embedding's ``flatten(2).transpose(1, 2)``
    and DenseNet's ``torch.cat`` read a contiguous copy of the channels_last conv value again, as before."""
    from community_models import ARCHITECTURES

    for name, ablation, reader in (("vit", "tokens-layout", "flatten"), ("densenet", "concat-layout", torch.cat)):
        arch = ARCHITECTURES[name]
        net = arch.make_model().eval()
        x = tg.Input(shape=arch.inputs[0].shape)
        graph_model = tg.Model(x, net(x))
        fns, _ = bench_peers._ablated_variants(graph_model, [ablation])
        ablated = fns[f"tg.optimize -{ablation}"]

        def copies_before(model):
            return sum(n.op == "call_method" and n.target == "contiguous"
                       and any(u.target == reader for u in n.users) for n in model.graph.nodes)

        assert copies_before(ablated.fn) > 0 and copies_before(tg.optimize(graph_model)) == 0, name
        (data,) = arch.make_inputs()
        with torch.inference_mode():
            expected = net(data)
            torch.testing.assert_close(ablated(data), expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)


def test_lone_convs_ablation_keeps_them_channels_last():
    """``-lone-convs``: the convolutions between instance norms (fast neural style's blocks) stay channels_last
    ``conv2d_act`` calls with copies around them, as before NOTE: [Lone convolutions]; the full model runs them
    as ``F.conv2d``. Values are eager's either way."""
    from test_lone_convolutions import StyleBlock, _kinds

    torch.manual_seed(0)
    net = StyleBlock().eval()
    x_sym = tg.Input(shape=(3, 12, 12))
    graph_model = tg.Model(x_sym, net(x_sym)).eval()
    fns, _ = bench_peers._ablated_variants(graph_model, ["lone-convs"])
    ablated = fns["tg.optimize -lone-convs"]
    assert _kinds(tg.optimize(graph_model))[:2] == (2, 0)
    assert _kinds(ablated.fn)[:2] == (0, 2)
    x = torch.randn(2, 3, 12, 12)
    with torch.inference_mode():
        torch.testing.assert_close(ablated(x), net(x), rtol=1e-5, atol=1e-5)
    assert passes.layout._run_lone_convolutions_as_written is not bench_peers._no_pass  # restored


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_device_cuda_without_a_gpu_is_a_clear_usage_error(monkeypatch, capsys):
    """``bench_peers.py --device cuda`` where torch sees no GPU: exit status 2 and one line saying so."""
    monkeypatch.setattr(sys, "argv", ["bench_peers.py", "--device", "cuda", "--only", "gpt"])
    with pytest.raises(SystemExit) as exit_info:
        bench_peers.main()
    assert exit_info.value.code == 2
    assert "--device cuda: torch sees no GPU here" in capsys.readouterr().err


def test_winograd_ablation_runs_the_direct_convolution(monkeypatch):
    """``-winograd`` sends the stride-1 3x3 convolutions that ran on ops.winograd_conv2d_inference back to
    oneDNN's direct convolution (the route switched on as on an AVX2 CPU, whatever this CPU is)."""
    from torchgraph import _extension

    if not (_extension.HAS_C_OPS and fused._common._HAS_ONEDNN):
        pytest.skip("needs torchgraph._C and oneDNN")
    monkeypatch.setattr(fused.conv, "WINOGRAD_KERNEL", True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    x_sym = tg.Input(shape=(64, 16, 16))
    graph_model = tg.Model(x_sym, net(x_sym)).eval()
    fns, _ = bench_peers._ablated_variants(graph_model, ["winograd"])
    x = torch.randn(2, 64, 16, 16)
    full = _ops_run(tg.optimize(graph_model), x)
    ablated = _ops_run(fns["tg.optimize -winograd"], x)
    assert full.count("torchgraph::winograd_conv2d_inference") == 2 and "mkldnn::_convolution_pointwise" not in full
    assert "torchgraph::winograd_conv2d_inference" not in ablated
    assert ablated.count("mkldnn::_convolution_pointwise") == 2
    with torch.inference_mode():
        torch.testing.assert_close(fns["tg.optimize -winograd"](x), net(x), rtol=1e-4, atol=1e-4)
    assert fused.conv.WINOGRAD_KERNEL  # restored


@needs_fast_paths
def test_implicit_gemm_ablation_runs_the_stem_on_onednn(monkeypatch):
    """``-implicit-gemm`` sends a stem that ran on ops.implicit_gemm_conv2d_inference back to oneDNN's channels_last
    convolution (the route switched on as on an AVX2 CPU, whatever this CPU is)."""
    from torchgraph import _extension

    if not (_extension.HAS_C_OPS and fused._common._HAS_ONEDNN):
        pytest.skip("needs torchgraph._C and oneDNN")
    monkeypatch.setattr(fused.conv, "IMPLICIT_GEMM_KERNEL", True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
                        nn.Conv2d(32, 32, 3, padding=1, groups=32)).eval()
    x_sym = tg.Input(shape=(3, 32, 32))
    graph_model = tg.Model(x_sym, net(x_sym)).eval()
    fns, _ = bench_peers._ablated_variants(graph_model, ["implicit-gemm"])
    x = torch.randn(2, 3, 32, 32)
    full = _ops_run(tg.optimize(graph_model), x)
    ablated = _ops_run(fns["tg.optimize -implicit-gemm"], x)
    assert full.count("torchgraph::implicit_gemm_conv2d_inference") == 1
    assert "torchgraph::implicit_gemm_conv2d_inference" not in ablated
    assert "mkldnn::_convolution_pointwise" in ablated
    with torch.inference_mode():
        torch.testing.assert_close(fns["tg.optimize -implicit-gemm"](x), net(x), rtol=1e-4, atol=1e-4)
    assert fused.conv.IMPLICIT_GEMM_KERNEL  # restored


@needs_fast_paths
def test_expand_depthwise_ablation_keeps_the_two_convolutions():
    """``-expand-depthwise`` leaves an inverted residual block's expansion and depthwise convolution as two fused
    convolutions; the optimized model as built runs them as one call."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 48, 1), nn.ReLU6(), nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.ReLU6(),
                        nn.Conv2d(48, 8, 1)).eval()
    x_sym = tg.Input(shape=(8, 16, 16))
    graph_model = tg.Model(x_sym, net(x_sym)).eval()
    fns, _ = bench_peers._ablated_variants(graph_model, ["expand-depthwise"])
    assert fused.conv2d_expand_depthwise in _targets(tg.optimize(graph_model))
    ablated = fns["tg.optimize -expand-depthwise"]
    assert fused.conv2d_expand_depthwise not in _targets(ablated.fn)
    x = torch.randn(2, 8, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(ablated(x), net(x), rtol=1e-4, atol=1e-4)
    assert passes.fuse_expand_depthwise is not bench_peers._no_pass  # restored
