"""Every community model (tests/community_models), brought in with tg.from_module, round-trips through
tests/roundtrip.py: get_config/from_config and tg.save/tg.load with bit-identical outputs, and
tg.export_onnx with verification -- or fails at get_config with a message that says how to fix it.

The models are the registry's, at their test sizes and in its default configuration (dropout on: the
transformers attention modules' mode-following attention dropout is recorded as
``tg.layers.ScaledDotProductAttention`` layers, so they round-trip without registering anything).
"""

import warnings

import pytest
import torch

import torchgraph as tg
from community_models import ARCHITECTURES, input_symbol
from roundtrip import assert_round_trips

# A sequence length the recording keeps dynamic (a named dim, "seq"); the others take a fixed length:
# nanoGPT compares it (`assert t <= block_size`), transformers' mask helpers too (docs/from_module.md).
DYNAMIC_SEQUENCE = {"transformer_classifier", "transformer_classifier_prenorm", "lstm_encoder"}
# The legacy exporter traces sizes: it fixes nn.MultiheadAttention's reshapes to the example length,
# which verification catches (onnxruntime fails at other lengths). Those go through the dynamo one, as
# does HF LLaMA: transformers' mask helpers call torch.diff, which the legacy exporter has no translation for,
# and torchtitan's LLaMA: its rotary embeddings are complex numbers (no legacy translation of view_as_complex).
DYNAMO = {"transformer_classifier", "transformer_classifier_prenorm", "hf_llama", "llama_titan"}
# The allowed other outcome: a clear error at get_config (a custom layer nobody registered).
CONFIG_ERRORS = {"with_data_dependent_block": r"layer 'block'.*DataDependent.*@tg\.register_layer"}


def _bring_in(name: str):
    """``(tg.from_module model, example kwargs)`` for one architecture, in eval mode."""
    arch = ARCHITECTURES[name]
    specs = {s.name: (s.shape, s.dtype) for s in arch.inputs}
    kwargs = arch.make_kwargs()
    if name == "hf_gpt2":  # without a mask, transformers compares the dynamic batch (docs/from_module.md)
        specs["attention_mask"] = ((None,), torch.long)
        mask = torch.ones_like(kwargs["input_ids"])
        mask[1, arch.seq_len // 2:] = 0
        kwargs["attention_mask"] = mask
    seq = "seq" if name in DYNAMIC_SEQUENCE else arch.seq_len
    inputs = {n: tg.Input(shape=tuple(seq if d is None else d for d in shape), dtype=dtype, name=input_symbol(n))
              for n, (shape, dtype) in specs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opaque layers are warned about (tests/test_from_module_models.py)
        model = tg.from_module(arch.make_model().eval(), inputs)
    # the model's own input names: a forward argument named after a builtin (`input`) is its input `input_`
    return model.eval(), {input_symbol(key): value for key, value in kwargs.items()}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_community_model_round_trips(name, tmp_path, one_thread):
    """Config, file (bit-identical) and verified ONNX, or a get_config error naming the layer and the fix."""
    model, kwargs = _bring_in(name)
    error = assert_round_trips(model, kwargs, exporter="dynamo" if name in DYNAMO else "legacy",
                               folder=str(tmp_path))
    if name in CONFIG_ERRORS:
        assert error is not None
        assert pytest.importorskip("re").search(CONFIG_ERRORS[name], str(error)), str(error)
    else:
        assert error is None, str(error)


@pytest.mark.parametrize("name", ["transformer_classifier", "lstm_encoder"])
def test_named_sequence_dims_round_trip_at_other_lengths(name, tmp_path, one_thread):
    """A dynamic sequence length survives config and file: the rebuilt models run at another length."""
    model, _ = _bring_in(name)
    arch = ARCHITECTURES[name]
    kwargs = arch.make_kwargs(seq_len=7)
    expected = model(**kwargs)
    tg.save(model, tmp_path / "m.safetensors")
    rebuilt = tg.Model.from_config(model.get_config())
    rebuilt.load_state_dict(model.state_dict())
    for other in (rebuilt.eval(), tg.load(tmp_path / "m.safetensors")):
        assert torch.equal(other(**kwargs), expected)
