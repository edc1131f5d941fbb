"""The core limits issue 13 reported, on the community models: each works (equal to eager at two sizes)
or is a clear GraphBuildError, never a silent difference.

1. A module probed with real data (its forward reads the data) whose forward returns its own input
   object: the call stays in the graph (it would silently drop out of it before).
2. Top-level ``torch.arange(x.size(1))``: covered in test_sizes.py (a clear error; the
   ``device=x.device`` form records).
3. nanoGPT's ``assert t <= block_size`` on a dynamic size (and transformers' mask helpers comparing
   sizes), through ``tg.from_module``.
4. BERT's position table (32 here) against the probe sizes of an unbounded dim.
5. GPT-2 without an attention mask, comparing the dynamic batch to 1: recorded as a check (batch 1
   fails loudly at call time; batches of 2 and more match eager).
"""

import warnings

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models import ARCHITECTURES, HAS_TRANSFORMERS, tensor_leaves

needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS,
                                        reason="transformers is a test extra (requirements-dev.txt)")


class PassThroughUnlessHuge(nn.Module):
    """Data-dependent: on ordinary data (the random probes included) it hands back its input object."""

    def forward(self, x):
        if x.abs().sum() > 1e9:
            return x * 0
        return x


def test_data_dependent_module_returning_its_input_stays_one_layer():
    """The call stays in the graph (NOTE: [Lost calls] in module_scopes.py) and decides on the data at run time."""
    gate = PassThroughUnlessHuge()
    x = tg.Input(shape=(4,))
    model = tg.Model(x, gate(x + 1))
    for data in (torch.ones(2, 4), torch.full((2, 4), 1e10)):
        torch.testing.assert_close(model(data), gate(data + 1))


def test_data_dependent_module_that_computes_stays_one_layer_and_matches_eager():
    """The same module computing on every branch is recorded as one layer and runs eagerly."""

    class Gate(nn.Module):
        def forward(self, x):
            return x.clone() if x.sum() > 0 else x * 0

    x = tg.Input(shape=(4,))
    model = tg.Model(x, Gate()(x) + 1)
    for sign in (1.0, -1.0):
        data = torch.full((2, 4), sign)
        torch.testing.assert_close(model(data), Gate()(data) + 1)


def _from_module(name: str, seq):
    arch = ARCHITECTURES[name]
    net = arch.make_model().eval()
    inputs = {s.name: tg.Input(shape=tuple(seq if d is None else d for d in s.shape), dtype=s.dtype, name=s.name)
              for s in arch.inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF attention modules staying opaque say so; not the point here
        return arch, net, tg.from_module(net, inputs).eval()


def _assert_matches_eager(arch, net, built, sizes):
    for batch, seq in sizes:
        kwargs = arch.make_kwargs(batch_size=batch, seq_len=seq, seed=seq)
        with torch.no_grad():
            expected, got = tensor_leaves(net(**kwargs)), tensor_leaves(built(**kwargs))
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def _sequence_dim(built):
    spec = next(n for n in built.graph.nodes if n.op == "placeholder").meta["tg_spec"]
    return spec.dims[1]


@pytest.mark.parametrize("name", ["nanogpt"] + (["hf_bert"] if HAS_TRANSFORMERS else []))
def test_unbounded_sequence_against_a_position_table_is_a_clear_error(name):
    """nanoGPT asserts t <= block_size; BERT's table of 32 positions cannot be expanded to the probe sizes:
    either way a GraphBuildError at build time, never a model that differs from eager."""
    with pytest.raises(tg.GraphBuildError) as info:
        _from_module(name, "seq")
    if name == "nanogpt":
        assert "assert t <= self.config.block_size" in str(info.value) and "tg.Dim('T', max=" in str(info.value)
    else:
        assert "expand" in str(info.value) and "(1, 32)" in str(info.value)


@pytest.mark.parametrize("name", ["nanogpt"] + (["hf_bert", "hf_gpt2"] if HAS_TRANSFORMERS else []))
def test_bounded_sequence_is_dynamic_through_from_module_and_matches_eager(name):
    """With tg.Dim("seq", max=<positions>) the sequence length stays a named dynamic dim of the recorded
    model (guards such as nanoGPT's assert are recorded), equal to eager at several lengths and batches."""
    arch, net, built = _from_module(name, tg.Dim("seq", max=32))
    dim = _sequence_dim(built)
    assert (dim.name, dim.max) == ("seq", 32)
    _assert_matches_eager(arch, net, built, [(2, 5), (3, 11), (2, 32)])
    with pytest.raises(ValueError, match="must satisfy"):
        built(**arch.make_kwargs(batch_size=1, seq_len=33))


@needs_transformers
def test_gpt2_without_attention_mask_keeps_batch_and_sequence_dynamic():
    """GPT-2 called without a mask compares the dynamic batch to position_ids' batch of 1 in its mask
    code: the comparison is recorded as a check, so the built model follows eager at batches 2 and 3 and
    two lengths of an unbounded sequence dim, and batch 1 (the other branch) fails loudly, naming the
    line, like an exported program whose dynamic dims start at 2."""
    arch, net, built = _from_module("hf_gpt2", "seq")
    assert [s.name for s in arch.inputs] == ["input_ids"]
    assert _sequence_dim(built).name == "seq"
    _assert_matches_eager(arch, net, built, [(2, 7), (3, 19)])
    with pytest.raises(AssertionError, match=r"batch_size != position_ids.shape\[0\].*other answer"):
        built(**arch.make_kwargs(batch_size=1, seq_len=7))
