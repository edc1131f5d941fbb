"""Every kind of model the tests build round-trips (tests/roundtrip.py): configs, files, ONNX.

The catalogue covers the builders in torchgraph.applications, tests/shared_models.py, the models of
README.md and docs/config_and_saving.md, and models written the way their communities write them
(ViT's class token and position embedding, MobileNetV3's squeeze-excitation, a Hugging Face BERT).
Most exports use the faster legacy exporter; the default (dynamo) exporter runs on a few.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg
from roundtrip import assert_round_trips
from shared_models import multi_io_model


def readme_model():
    image = tg.Input(shape=(1, 8, 8), name="image")
    meta = tg.Input(shape=(4,), name="meta")
    h = F.relu(nn.Conv2d(1, 16, 3, padding=1)(image))
    h = nn.MaxPool2d(2)(h).flatten(1)
    joint = torch.cat([h, F.relu(nn.Linear(4, 16)(meta))], dim=1)
    model = tg.Model({"image": image, "meta": meta}, nn.Linear(joint.shape[1], 10)(joint))
    return model, {"image": torch.randn(2, 1, 8, 8), "meta": torch.randn(2, 4)}


def docs_model():
    x = tg.Input(shape=(3, 32, 32), name="image")
    h = F.relu(nn.Conv2d(3, 16, 3)(x))
    return tg.Model(x, nn.Linear(16, 10)(h.mean(dim=(2, 3))), name="Net"), torch.randn(2, 3, 32, 32)


def vit_model():
    from test_graph_constants import vit_tokens

    return vit_tokens(), torch.randn(2, 3, 8, 8)


def se_block_model():
    from test_config_functions import _se_block_model

    return _se_block_model(), torch.randn(2, 8, 6, 6)


def nested_shared_model():
    inner_x = tg.Input(shape=(8,))
    inner = tg.Model(inner_x, nn.Linear(8, 8)(inner_x), name="Head")
    x = tg.Input(shape=(None, 8), name="seq")
    shared = nn.Linear(8, 8)
    h = shared(torch.tanh(shared(x)))
    out, _ = nn.GRU(8, 8, batch_first=True)(h)
    return tg.Model(x, [inner(out[:, -1]), out.mean(1)], name="Nested"), torch.randn(2, 5, 8)


def sequential_model():
    model = tg.Sequential([tg.Input(shape=(6,)), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2),
                           nn.Linear(8, 3)], name="Stack")
    return model, torch.randn(4, 6)


def bert_model():
    transformers = pytest.importorskip("transformers")
    import test_third_party_layers  # noqa: F401 - registers BertModel and BertConfig

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    ids = tg.Input(shape=(16,), dtype=torch.long, name="input_ids")
    return tg.Model(ids, bert(ids).last_hidden_state, name="Bert"), torch.randint(0, 100, (2, 16))


CATALOGUE = {
    "mlp": (lambda: (tg.applications.mlp(depth=3, width=16, num_classes=4), torch.randn(3, 16)), "legacy"),
    "resnet18": (lambda: (tg.applications.resnet18(num_classes=10, input_shape=(3, 32, 32)),
                          torch.randn(2, 3, 32, 32)), "legacy"),
    "gpt_stack": (lambda: (tg.applications.gpt_stack(num_blocks=2, dim=32, heads=2, seq_len=None),
                           torch.randn(2, 9, 32)), "dynamo"),
    "multi_io": (lambda: (multi_io_model(), {"img": torch.randn(2, 3, 32, 32),
                                             "tokens": torch.randint(0, 100, (2, 8))}), "legacy"),
    "readme": (readme_model, "legacy"),
    "docs": (docs_model, "dynamo"),
    "vit": (vit_model, "legacy"),
    "se_block": (se_block_model, "legacy"),
    "nested_shared": (nested_shared_model, "legacy"),
    "sequential": (sequential_model, "legacy"),
    "bert": (bert_model, "legacy"),
}


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_model_round_trips(name, tmp_path):
    """get_config/from_config, tg.save/tg.load (bit-identical) and tg.export_onnx with verification."""
    build, exporter = CATALOGUE[name]
    torch.manual_seed(0)
    model, inputs = build()
    assert assert_round_trips(model, inputs, exporter=exporter, folder=str(tmp_path)) is None


def test_an_undescribable_model_fails_at_get_config_with_the_fix(tmp_path):
    """The other allowed outcome: a clear error at get_config that says how to make it storable."""
    class Opaque(nn.Module):
        def forward(self, x):
            return x * 2

    x = tg.Input(shape=(4,))
    error = assert_round_trips(tg.Model(x, Opaque()(x)), torch.randn(2, 4), folder=str(tmp_path))
    assert "register_layer" in str(error)


class _RotaryEmbedding(nn.Module):
    """HF LLaMA's rotary embedding, cut down: reads the input's device, then moves a buffer to it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8), persistent=False)

    def forward(self, x, position_ids):
        device = x.device
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=device, dtype=torch.float32)
        return x * torch.cat((freqs, freqs), dim=-1).cos()


def test_a_device_read_keeps_its_place_in_the_rebuilt_code(tmp_path):
    """`x.device` read before a buffer is: the rebuilt graph reads them in the same order, so its code equals
    the original's (NOTE: [Stand-ins replayed in place]; the buffer came first before, and HF LLaMA failed)."""
    x, positions = tg.Input((5, 8), name="x"), tg.Input((5,), dtype=torch.long, name="position_ids")
    model = tg.from_module(_RotaryEmbedding(), {"x": x, "position_ids": positions})
    inputs = {"x": torch.randn(2, 5, 8), "position_ids": torch.arange(5).expand(2, 5)}
    assert assert_round_trips(model, inputs, folder=str(tmp_path)) is None
