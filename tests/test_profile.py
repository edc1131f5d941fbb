"""tg.profile: per-node times, multiply-adds and the kernels that tg.optimize's convolutions run."""

import re

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from torchgraph.applications import GPTBlock

ROUTE = re.compile(r"^(GEMM( kernel)?, \d+ rows|depthwise kernel|implicit GEMM kernel|oneDNN convolution)$")


def _conv_stack():
    torch.manual_seed(0)
    x = tg.Input(shape=(16, 16, 16))
    h = nn.ReLU()(nn.BatchNorm2d(32)(nn.Conv2d(16, 32, 3, padding=1)(x)))
    h = nn.ReLU6()(nn.Conv2d(32, 32, 3, padding=1, groups=32)(h))  # depthwise, as MobileNet writes it
    y = nn.Conv2d(32, 64, 1)(h).relu().mean(dim=(2, 3))
    return tg.Model(x, y).eval()


def test_profile_times_every_computing_node_and_counts_multiply_adds(one_thread):
    """Each call node gets a time and a target; convolutions their multiply-adds (batch x out x H x W x
    in / groups x kh x kw); the table lists the nodes; the by-target totals add up to the nodes' sum."""
    model = _conv_stack()
    x = torch.randn(2, 16, 16, 16)
    report = tg.profile(model, x, reps=3, warmup=1)
    computing = [n.name for n in model.graph.nodes if n.op.startswith("call_")]
    assert [n.name for n in report.nodes] == computing
    assert all(n.ms > 0 for n in report.nodes) and report.forward_ms > 0
    macs = {n.target: n.macs for n in report.nodes}
    assert macs["Conv2d"] > 0 and report.nodes[0].macs == 2 * 32 * 16 * 16 * 16 * 3 * 3
    depthwise = report.nodes[3]  # conv, bn, relu, then the depthwise conv
    assert depthwise.target == "Conv2d" and depthwise.macs == 2 * 32 * 16 * 16 * 1 * 3 * 3
    assert sum(report.by_target().values()) == pytest.approx(report.nodes_ms)
    text = str(report)
    assert all(n.name in text for n in report.nodes) and "a plain call" in text
    assert report.nodes[0].gflops == pytest.approx(2 * report.nodes[0].macs / report.nodes[0].ms / 1e6)


def test_profile_names_the_kernels_of_optimized_convolutions(one_thread):
    """After tg.optimize, the fused convolutions say which kernel their plan runs, and count their
    multiply-adds from the weights (the flop counter does not know oneDNN's ops)."""
    model = _conv_stack()
    fast = tg.optimize(model)
    x = torch.randn(2, 16, 16, 16)
    report = tg.profile(fast, x, reps=3, warmup=1)
    convs = [n for n in report.nodes if n.target == "conv2d_act"]
    assert len(convs) == 3
    assert [n.macs for n in convs] == [2 * 32 * 16 * 16 * 16 * 9, 2 * 32 * 16 * 16 * 9, 2 * 64 * 16 * 16 * 32]
    if torch.backends.mkldnn.is_available():
        assert all(ROUTE.match(n.route) for n in convs), [n.route for n in convs]
    torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-4)  # profiling changed nothing


def test_profile_counts_attention_and_linear_multiply_adds(one_thread):
    """A GPT block, optimized: qkv_attention counts Q K^T and P V over every head (2 B T^2 E), linear_act
    rows x in x out."""
    torch.manual_seed(0)
    x = tg.Input(shape=(16, 32))
    fast = tg.optimize(tg.Model(x, GPTBlock(32, 4)(x)).eval())
    report = tg.profile(fast, torch.randn(3, 16, 32), reps=2, warmup=1)
    by_target = {}
    for n in report.nodes:
        by_target.setdefault(n.target, []).append(n.macs)
    assert by_target["qkv_attention"] == [2 * 3 * 16 * 16 * 32]
    assert sorted(by_target["linear_act"]) == sorted([3 * 16 * 32 * 96, 3 * 16 * 32 * 32, 3 * 16 * 32 * 128,
                                                      3 * 16 * 128 * 32])


def test_profile_takes_keyword_inputs(one_thread):
    """Inputs given by name reach their placeholders, as in a call."""
    a, b = tg.Input(shape=(4,), name="a"), tg.Input(shape=(4,), name="b")
    model = tg.Model([a, b], nn.Linear(4, 3)(a * b))
    report = tg.profile(model, a=torch.randn(5, 4), b=torch.randn(5, 4), reps=2, warmup=0)
    assert [n.target for n in report.nodes] == ["mul", "Linear"]
    assert report.nodes[1].macs == 5 * 4 * 3


def test_profile_rejects_what_it_cannot_time():
    """A plain module gets the way in (tg.from_module); bad counts are named."""
    with pytest.raises(TypeError, match=r"expected a tg.Model .* received Linear.*tg.from_module"):
        tg.profile(nn.Linear(2, 2), torch.randn(1, 2))
    x = tg.Input(shape=(2,))
    with pytest.raises(ValueError, match=r"reps must be >= 1 .* reps=0"):
        tg.profile(tg.Model(x, nn.Linear(2, 2)(x)), torch.randn(1, 2), reps=0)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "nanogpt", "hf_bert"])
def test_profile_runs_community_models_before_and_after_optimize(name, one_thread):
    """Models written as torchvision, nanoGPT and transformers write them, brought in with tg.from_module and
    called by keyword: every computing node is timed, the multiply-adds agree before and after tg.optimize
    for the convnets (the fused ops count theirs from the weights), every fused convolution names its
    kernel, and the optimized model's output is unchanged by profiling."""
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    from test_community_round_trips import _bring_in

    model, kwargs = _bring_in(name)
    fast = tg.optimize(model)
    with torch.no_grad():
        expected = fast(**kwargs)
    before = tg.profile(model, reps=1, warmup=0, **kwargs)
    after = tg.profile(fast, reps=1, warmup=0, **kwargs)
    for report, graph in ((before, model), (after, fast)):
        assert [n.name for n in report.nodes] == [n.name for n in graph.graph.nodes if n.op.startswith("call_")]
    macs = sum(n.macs for n in after.nodes)
    assert macs > 0
    if name in ("resnet50", "mobilenet_v2"):
        assert macs == sum(n.macs for n in before.nodes)
        convs = [n for n in after.nodes if n.target in ("conv2d_act", "conv2d_add_act")]
        assert convs and (not torch.backends.mkldnn.is_available() or all(ROUTE.match(n.route) for n in convs))
    with torch.no_grad():
        torch.testing.assert_close(fast(**kwargs), expected, rtol=0, atol=0)
