"""Recorded strides agree with eager CPU: a `.view` after a layer builds exactly when eager runs it.

NOTE: [Meta strides] in torchgraph/probe_layouts.py says which meta kernels lay out their outputs
differently from the CPU kernels, for transposed or permuted inputs.
"""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from torchgraph.errors import GraphBuildError

# (layer, the shape of one sample as the layer sees it, a permutation of the batched dims, batch first).
# The input is made in the permuted order and permuted back, so the layer sees a permuted tensor.
_T4, _NHWC, _C_SWAP = (0, 1, 3, 2), (0, 2, 3, 1), (0, 2, 1, 3)
_CASES = [
    (lambda: nn.BatchNorm2d(4), (4, 5, 6), _T4),
    (lambda: nn.BatchNorm2d(4).eval(), (4, 5, 6), _T4),
    (lambda: nn.BatchNorm2d(4), (4, 5, 6), _C_SWAP),
    (lambda: nn.BatchNorm2d(4), (4, 5, 6), _NHWC),
    (lambda: nn.BatchNorm1d(4), (4, 6), (0, 2, 1)),
    (lambda: nn.BatchNorm3d(4), (4, 3, 5, 6), (0, 1, 2, 4, 3)),
    (lambda: nn.GroupNorm(2, 4), (4, 5, 6), _NHWC),
    (lambda: nn.GroupNorm(2, 4), (4, 5, 6), _T4),
    (lambda: nn.GroupNorm(2, 4), (4, 3, 5, 6), (0, 2, 3, 4, 1)),
    (lambda: nn.Conv2d(4, 4, 3, padding=1), (4, 5, 6), _NHWC),
    (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (4, 5, 6), _NHWC),
    (lambda: nn.Conv2d(4, 4, 3, padding=1), (4, 5, 6), _T4),
    (lambda: nn.ConvTranspose2d(4, 4, 2, stride=2), (4, 5, 6), _NHWC),
    (lambda: nn.Conv3d(4, 4, 3, padding=1), (4, 3, 5, 6), (0, 2, 3, 4, 1)),
    (lambda: nn.Conv1d(4, 4, 3), (4, 6), (0, 2, 1)),
    (lambda: nn.ReflectionPad2d(1), (4, 5, 6), _NHWC),
    (lambda: nn.ReplicationPad2d(1), (4, 5, 6), _NHWC),
    (lambda: nn.ChannelShuffle(2), (4, 5, 6), _NHWC),
    (lambda: nn.LogSigmoid(), (4, 5, 6), _T4),
    (lambda: nn.RReLU().eval(), (4, 5, 6), _T4),
    (lambda: nn.MaxPool1d(2), (4, 6), (0, 2, 1)),
    (lambda: nn.MaxPool2d(2), (4, 6, 6), _NHWC),
    (lambda: nn.LayerNorm(6), (4, 5, 6), _T4),
    (lambda: nn.GELU(), (4, 5, 6), _T4),
    (lambda: nn.Linear(6, 3), (4, 5, 6), _C_SWAP),
]


class _ViewAfter(nn.Module):
    """`layer(v.permute(...)).view(n, -1)`, the way such code is written in a model's forward."""

    def __init__(self, layer: nn.Module, inverse: tuple):
        super().__init__()
        self.layer = layer
        self.inverse = inverse

    def forward(self, v):
        y = self.layer(v.permute(*self.inverse))
        return y.view(y.shape[0], -1)


def _case(make_layer, shape, perm):
    torch.manual_seed(0)
    batched = (3,) + shape
    stored = tuple(batched[i] for i in perm)  # the input's own (contiguous) layout
    inverse = tuple(perm.index(i) for i in range(len(perm)))
    module = _ViewAfter(make_layer(), inverse)
    return module, stored, torch.randn(stored)


def _eager(module, x):
    try:
        with torch.no_grad():
            return module(x), None
    except RuntimeError as exc:
        assert "view" in str(exc)
        return None, exc


def _case_id(case) -> str:
    make_layer, shape, perm = case
    return f"{type(make_layer()).__name__}-{len(shape) + 1}d-{''.join(map(str, perm))}"


@pytest.mark.parametrize("make_layer, shape, perm", _CASES, ids=[_case_id(c) for c in _CASES])
def test_view_after_layer_builds_exactly_when_eager_runs(make_layer, shape, perm):
    """tg.from_module on `layer(permuted).view(n, -1)`: same output as eager, or a build-time refusal."""
    module, stored, x = _case(make_layer, shape, perm)
    expected, eager_error = _eager(module, x)
    if eager_error is None:
        model = tg.from_module(module, stored[1:])
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)
    else:
        with pytest.raises(GraphBuildError, match="'view' cannot be applied"):
            tg.from_module(module, stored[1:])


def test_functional_batch_norm_on_transposed_input_then_view():
    """The reported case, written with tg.Input: BatchNorm2d on `v.transpose(2, 3)`, then `.view(n, -1)`."""
    torch.manual_seed(0)
    v = tg.Input(shape=(4, 5, 6))
    bn = nn.BatchNorm2d(4)
    y = bn(v.transpose(2, 3))
    model = tg.Model(v, y.view(v.shape[0], -1))
    x = torch.randn(2, 4, 5, 6)
    reference = nn.BatchNorm2d(4)
    torch.testing.assert_close(model(x), reference(x.transpose(2, 3)).view(2, -1))


def test_view_that_eager_refuses_still_fails_at_build():
    """A `.view` of a transposed tensor (no layer in between) is refused at build time, as in eager."""
    v = tg.Input(shape=(4, 5, 6))
    with pytest.raises(GraphBuildError, match="'view' cannot be applied.*Use .reshape"):
        v.transpose(2, 3).view(v.shape[0], -1)


def test_is_contiguous_after_batch_norm_matches_eager():
    """`x.is_contiguous()` read at build time answers what the model's tensor will be."""
    v = tg.Input(shape=(4, 5, 6))
    y = nn.BatchNorm2d(4)(v.transpose(2, 3))
    assert y.is_contiguous() == nn.BatchNorm2d(4)(torch.randn(2, 4, 5, 6).transpose(2, 3)).is_contiguous()


class _AttentionWithoutContiguous(nn.Module):
    """nanoGPT's attention without `.contiguous()`: on CPU, SDPA's output follows the query's layout."""

    def __init__(self, embed: int = 16, heads: int = 4):
        super().__init__()
        self.qkv = nn.Linear(embed, 3 * embed)
        self.heads = heads

    def forward(self, x):
        batch, time, embed = x.shape
        q, k, v = (t.view(batch, time, self.heads, embed // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(embed, dim=2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).view(batch, time, embed)


def test_attention_output_viewed_without_contiguous_builds():
    """`sdpa(q, k, v).transpose(1, 2).view(B, T, C)` runs in eager on CPU, so it builds and matches."""
    torch.manual_seed(0)
    module = _AttentionWithoutContiguous()
    model = tg.from_module(module, (tg.Dim("seq", max=32), 16))
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(model(x), module(x))


def test_attention_with_dropout_then_view_fails_at_build_as_in_eager():
    """With dropout SDPA takes the math path (a contiguous output): eager refuses the view, so does the build."""
    q = tg.Input(shape=(6, 4, 8)).transpose(1, 2)
    y = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        torch.nn.functional.scaled_dot_product_attention(
            *(torch.randn(2, 6, 4, 8).transpose(1, 2),) * 3, dropout_p=0.5).transpose(1, 2).view(2, 6, 32)
    with pytest.raises(GraphBuildError, match="'view' cannot be applied"):
        y.transpose(1, 2).view(y.shape[0], 6, 32)
