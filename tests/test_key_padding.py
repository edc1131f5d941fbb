"""nn.TransformerEncoder called with a key padding mask (BERT-style classifiers): tg.optimize writes it out
as primitive ops and keeps eager's inference values, including the fast path's zeros at padded positions
and NaN for an all-padding sample (NOTE: [Eager's padded positions] in torchgraph/fused/key_padding.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from torchgraph import fused

DIM, HEADS, SEQ = 16, 4, 7


def _padding(kind: str) -> torch.Tensor:
    """(4, SEQ) bool masks, True at padding."""
    lengths = {"left_aligned": [7, 4, 1, 6], "all_padded_sample": [7, 3, 0, 5], "none": [7, 7, 7, 7]}
    if kind in lengths:
        return torch.arange(SEQ).expand(4, SEQ) >= torch.tensor(lengths[kind])[:, None]
    assert kind == "not_left_aligned"  # left padding in one sample, as in some generation code
    return (torch.arange(SEQ).expand(4, SEQ) >= torch.tensor([7, 4, 5, 6])[:, None]).index_put(
        (torch.tensor([1]),), torch.tensor([[True, True, False, False, False, False, False]]))


def _encoder(norm_first: bool, heads: int = HEADS, final_norm: bool = False) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, heads, 32, dropout=0.1, batch_first=True, norm_first=norm_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor with norm_first: torch's warning
        return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(DIM) if final_norm else None).eval()


def _model(module: nn.Module) -> tg.Model:
    x = tg.Input(shape=("seq", DIM))
    padding = tg.Input(shape=("seq",), dtype=torch.bool)
    return tg.Model([x, padding], module(x, src_key_padding_mask=padding)).eval()


def _targets(model) -> set:
    return {n.target for n in model.graph.nodes if n.op == "call_function"}


def _called_modules(model) -> set:
    return {type(model.get_submodule(n.target)) for n in model.graph.nodes if n.op == "call_module"}


def _assert_as_eager(fast, module, x, padding) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch's nested-tensor prototype warning
        expected = module(x, src_key_padding_mask=padding)
        got = fast(x, padding)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("kind", ["left_aligned", "not_left_aligned", "all_padded_sample", "none"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_with_padding_is_written_out_and_equals_eager(norm_first, kind):
    """Post-norm (nested-tensor path) and pre-norm encoders with each kind of mask: no encoder module left,
    the attention skips padded keys, and every value equals eager's in inference, zeros and NaN included."""
    module = _encoder(norm_first, final_norm=True)
    fast = tg.optimize(_model(module))
    assert not _called_modules(fast) & {nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention}
    # post-norm: the nested-tensor path's zeros, its layers on the real tokens alone (NOTE: [Tokens on rows])
    expected = {fused.qkv_attention_with_padding} if norm_first else \
        {fused.qkv_attention_on_rows, fused.token_rows, fused.gather_rows, fused.scatter_rows,
         fused.padded_output_as_nested}
    assert expected <= _targets(fast)
    torch.manual_seed(1)
    x, padding = torch.randn(4, SEQ, DIM), _padding(kind)
    _assert_as_eager(fast, module, x, padding)
    with torch.no_grad():
        out = fast(x, padding)
    if kind == "all_padded_sample":  # eager's NaN (pre-norm) or the nested path's zeros through the norm
        assert out[2].isnan().all() == norm_first
    if kind == "left_aligned" and not norm_first:  # the nested path's zeros, through the final LayerNorm
        torch.testing.assert_close(out[1, 4:], module.norm.bias.expand(3, DIM), atol=1e-6, rtol=0)


def test_fast_path_switched_off_at_run_time():
    """With torch.backends.mha's fast path off, eager keeps the padded queries' values and SDPA's zeros for an
    all-padding sample; the optimized model reads the same switch when it runs."""
    module = _encoder(norm_first=False)
    fast = tg.optimize(_model(module))
    x, padding = torch.randn(4, SEQ, DIM), _padding("all_padded_sample")
    before = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        _assert_as_eager(fast, module, x, padding)
        with torch.no_grad():
            assert not fast(x, padding).isnan().any()
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def test_encoder_layer_alone_with_padding():
    """One nn.TransformerEncoderLayer called with a padding mask: written out, no nested-tensor zeros."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, HEADS, 32, batch_first=True, activation="gelu").eval()
    fast = tg.optimize(_model(layer))
    assert nn.TransformerEncoderLayer not in _called_modules(fast)
    assert fused.padded_output_as_nested not in _targets(fast)
    _assert_as_eager(fast, layer, torch.randn(4, SEQ, DIM), _padding("left_aligned"))


def test_layers_off_the_native_fast_path_keep_the_module():
    """Odd head counts run torch's Python path (SDPA's zeros, not NaN, for an all-padding sample): with a
    padding mask such an encoder stays one module call, and still equals eager."""
    module = _encoder(norm_first=True, heads=1)
    fast = tg.optimize(_model(module))
    assert nn.TransformerEncoder in _called_modules(fast)
    _assert_as_eager(fast, module, torch.randn(4, SEQ, DIM), _padding("all_padded_sample"))


def test_float_padding_mask_keeps_the_module():
    """An additive float mask (0 / -inf) is not rewritten: the encoder stays one call."""
    module = _encoder(norm_first=False)
    x = tg.Input(shape=("seq", DIM))
    padding = tg.Input(shape=("seq",))
    fast = tg.optimize(tg.Model([x, padding], module(x, src_key_padding_mask=padding)).eval())
    assert nn.TransformerEncoder in _called_modules(fast)


def test_token_rows_are_the_tokens_eager_computes():
    """The real tokens when eager would nest (a left-aligned mask, the fast path on), else every position;
    gather_rows and scatter_rows invert each other there."""
    padding = _padding("all_padded_sample")
    rows = fused.token_rows(padding)
    assert torch.equal(rows, padding.logical_not().flatten().nonzero().squeeze(1))
    assert rows.numel() == 7 + 3 + 0 + 5
    assert torch.equal(fused.token_rows(_padding("not_left_aligned")), torch.arange(4 * SEQ))
    before = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        assert torch.equal(fused.token_rows(padding), torch.arange(4 * SEQ))
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    x = torch.randn(4, SEQ, 3)
    round_trip = fused.scatter_rows(fused.gather_rows(x, rows), rows, padding)
    assert torch.equal(round_trip, x.masked_fill(padding.unsqueeze(-1), 0.0))


def test_padded_output_as_nested_follows_torchs_alignment_test():
    """Zeros exactly when torch's own left-alignment test passes, over random masks (rows of all padding
    and of no padding included)."""
    generator = torch.Generator().manual_seed(0)
    output = torch.ones(3, 5, 2)
    for _ in range(200):
        padding = torch.rand(3, 5, generator=generator) < 0.3
        if torch.rand(1, generator=generator) < 0.5:  # mostly left-aligned masks, some with all-padding rows
            padding = padding.cummax(dim=1).values
        aligned = torch._nested_tensor_from_mask_left_aligned(output, padding.logical_not())
        expected = output.masked_fill(padding.unsqueeze(-1), 0.0) if aligned else output
        assert torch.equal(fused.padded_output_as_nested(output, padding), expected), (padding, aligned)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_optimized_encoder_with_padding_exports_to_onnx(tmp_path, exporter):
    """The written-out encoder exports (both exporters: the legacy one traces add_layer_norm's reference) and
    onnxruntime computes eager's values, zeros at padded positions included, at another batch and length."""
    ort = pytest.importorskip("onnxruntime")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    module = _encoder(norm_first=False, final_norm=True)
    fast = tg.optimize(_model(module))
    path = str(tmp_path / "encoder.onnx")
    tg.export_onnx(fast, path, exporter=exporter)
    x = torch.randn(3, 11, DIM)
    padding = torch.arange(11).expand(3, 11) >= torch.tensor([11, 4, 1])[:, None]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (x.numpy(), padding.numpy()))))[0]
    with torch.no_grad():
        expected = module(x, src_key_padding_mask=padding)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-4)


class SelfAttentionBlock(nn.Module):
    """A pre-norm block around nn.MultiheadAttention with a key padding mask, as custom encoders write it."""

    def __init__(self, heads: int, need_weights: bool | None):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(DIM), nn.MultiheadAttention(DIM, heads, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x, src_key_padding_mask):
        h = self.norm(x)
        kwargs = {} if self.need_weights is None else {"need_weights": self.need_weights}
        out, _ = self.attn(h, h, h, key_padding_mask=src_key_padding_mask, **kwargs)
        return x + out


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("heads, need_weights", [(4, None), (4, False), (1, False), (1, True)])
def test_self_attention_module_with_padding_equals_eager(heads, need_weights, fast_path):
    """`mha(x, x, x, key_padding_mask=m)[0]` becomes in_proj + qkv_attention_with_padding + out_proj, with
    eager's value for an all-padding sample on each of torch's paths: NaN from the weights' softmax
    (need_weights, the default) or the native fast path (even heads, when on), else SDPA's zeros."""
    torch.manual_seed(0)
    block = SelfAttentionBlock(heads, need_weights).eval()
    fast = tg.optimize(_model(block))
    assert nn.MultiheadAttention not in _called_modules(fast)
    assert fused.qkv_attention_with_padding in _targets(fast)
    x, padding = torch.randn(4, SEQ, DIM), _padding("all_padded_sample")
    before = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        _assert_as_eager(fast, block, x, padding)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
