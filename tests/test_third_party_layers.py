"""Third-party modules built from a config object (Hugging Face transformers) are storable through
tg.register_value_type and tg.register_layer, without a wrapper class."""

import pytest
import torch

import torchgraph as tg

transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertModel, GPT2Config  # noqa: E402
from transformers.models.bert.modeling_bert import BertLayer  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2Block  # noqa: E402

tg.register_value_type(BertConfig)
tg.register_value_type(GPT2Config)
tg.register_layer(BertLayer)
tg.register_layer(GPT2Block)
# BertModel keeps its config: a hook reads its arguments back, so instances made before registration
# work too.
tg.register_layer(BertModel, get_config=lambda m: {"config": m.config, "add_pooling_layer": m.pooler is not None})

_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)


def _round_trip(model, inputs, tmp_path):
    model.eval()
    rebuilt = tg.Model.from_config(model.get_config())
    assert rebuilt.code == model.code and list(rebuilt.state_dict()) == list(model.state_dict())
    tg.save(model, tmp_path / "m.safetensors")
    loaded = tg.load(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), model(*inputs))
    return loaded


def test_bert_model_from_a_bert_config(tmp_path):
    """BertModel(BertConfig(...)): the config object is stored as data and rebuilt on loading."""
    torch.manual_seed(0)
    bert = BertModel(BertConfig(**_BERT), add_pooling_layer=False)
    ids = tg.Input(shape=(16,), dtype=torch.long, name="input_ids")
    model = tg.Model(ids, bert(ids).last_hidden_state)
    config = model.get_config()["layers"][0]
    assert config["kwargs"]["config"]["object"]["type"] == "transformers.models.bert.configuration_bert.BertConfig"
    loaded = _round_trip(model, (torch.randint(0, 100, (2, 16)),), tmp_path)
    assert loaded.bert_model.config.hidden_size == 32


@pytest.mark.parametrize("block", ["bert_layer", "gpt2_block"])
def test_transformer_blocks_from_config_objects(tmp_path, block):
    """BertLayer(config) and GPT2Block(config, layer_idx) record their arguments once registered."""
    torch.manual_seed(0)
    h = tg.Input(shape=(16, 32))
    if block == "bert_layer":
        out = BertLayer(BertConfig(**_BERT))(h)
    else:
        cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=0,
                         eos_token_id=0)
        out = GPT2Block(cfg, layer_idx=0)(h)
    out = out[0] if isinstance(out, tuple) else out
    _round_trip(tg.Model(h, out), (torch.randn(2, 16, 32),), tmp_path)


def test_unregistered_config_object_names_the_fix():
    """Without tg.register_value_type the message says to register the config's class."""

    class Settings:
        width = 4

    @tg.register_layer
    class Block(torch.nn.Module):
        def __init__(self, settings):
            super().__init__()
            self.linear = torch.nn.Linear(settings.width, settings.width)

        def forward(self, x):
            return self.linear(x)

    x = tg.Input(shape=(4,))
    with pytest.raises(ValueError, match=r"tg.register_value_type\(Settings\)"):
        tg.Model(x, Block(Settings())(x)).get_config()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_config_object_keeps_its_attention_implementation(implementation):
    """BertConfig.to_dict() leaves out the attention implementation the model runs; a stored config
    keeps it, so an attention module rebuilt from it runs the same one (it differed by ~1e-2)."""
    from torchgraph.config_values import decode_value, encode_value

    bert = BertModel(BertConfig(**_BERT, attn_implementation=implementation))
    stored = encode_value(bert.config, "test")
    assert decode_value(stored, "test")._attn_implementation == implementation
