"""Random-init HuggingFace ``transformers`` models through tg.from_module, tg.save/tg.load and tg.optimize.

A sweep for finding where torchgraph fails on code it did not write: each architecture (tiny config, never
downloaded weights) is recorded with ``tg.from_module``, compared with eager, saved and loaded
(safetensors), optimized in float32 and bfloat16. One line per model: ``OK`` with the count of layers that
stayed opaque and the errors (max abs against eager; bf16 relative), or ``FAIL`` with the step and the
message. Needs ``transformers`` (requirements-dev.txt). Takes 2-4 minutes on 2 cores. Swin and Segformer
(``drop_path_rate=0.1`` by default) keep one drop path layer each ("opaque layers 1"), saved as
``tg.layers.DropPath`` (NOTE: [Drop path at save time] in torchgraph/drop_paths.py).

Usage: python scripts/sweep_transformers.py [NAME ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import torch

# the torchgraph of this checkout (not an installed one: `pip install -e` of another worktree would win)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torchgraph as tg  # noqa: E402


def _text(cache: bool = True) -> dict:
    inputs = {"input_ids": tg.Input(shape=(tg.Dim("seq", max=64),), dtype=torch.long, name="input_ids")}
    return dict(inputs, use_cache=False) if cache else inputs


def _ids() -> dict:
    return {"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))}


def _image() -> tuple:
    return (lambda: {"pixel_values": tg.Input(shape=(3, 32, 32), name="pixel_values")},
            lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))})


def cases() -> dict:
    """name -> (make the module, its tg inputs, real inputs)."""
    import transformers as T

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    decoder = dict(small, vocab_size=128, max_position_embeddings=64, use_cache=False)
    encoder = dict(small, vocab_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    text, no_cache = (_text, _ids), (lambda: _text(cache=False), _ids)
    return {
        "llama": (lambda: T.LlamaModel(T.LlamaConfig(num_key_value_heads=2, **decoder)), *text),
        "mistral": (lambda: T.MistralModel(T.MistralConfig(num_key_value_heads=2, **decoder)), *text),
        "qwen2": (lambda: T.Qwen2Model(T.Qwen2Config(num_key_value_heads=2, **decoder)), *text),
        "gemma": (lambda: T.GemmaModel(T.GemmaConfig(num_key_value_heads=2, head_dim=8, **decoder)), *text),
        "gpt_neox": (lambda: T.GPTNeoXModel(T.GPTNeoXConfig(**decoder)), *text),
        "phi": (lambda: T.PhiModel(T.PhiConfig(resid_pdrop=0.0, embd_pdrop=0.0, **decoder)), *text),
        "gptj": (lambda: T.GPTJModel(T.GPTJConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                  n_positions=64, use_cache=False)), *text),
        "gpt2": (lambda: T.GPT2Model(T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                  use_cache=False)), *text),
        "opt": (lambda: T.OPTModel(T.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=64, dropout=0.0,
                                               attention_dropout=0.0, use_cache=False)), *text),
        "falcon": (lambda: T.FalconModel(T.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, use_cache=False)), *text),
        "bloom": (lambda: T.BloomModel(T.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4,
                                                     use_cache=False)), *text),
        "bert": (lambda: T.BertModel(T.BertConfig(**encoder)), *no_cache),
        "roberta": (lambda: T.RobertaModel(T.RobertaConfig(**encoder)), *no_cache),
        "electra": (lambda: T.ElectraModel(T.ElectraConfig(embedding_size=16, **encoder)), *no_cache),
        "albert": (lambda: T.AlbertModel(T.AlbertConfig(embedding_size=16, **encoder)), *no_cache),
        "deberta_v2": (lambda: T.DebertaV2Model(T.DebertaV2Config(**encoder)), *no_cache),
        "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=128, dim=32, hidden_dim=64,
                                                                    n_layers=2, n_heads=4, dropout=0.0,
                                                                    attention_dropout=0.0)), *no_cache),
        "t5_encoder": (lambda: T.T5EncoderModel(T.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64,
                                                           num_layers=2, num_heads=4, dropout_rate=0.0)),
                       *no_cache),
        "clip_text": (lambda: T.CLIPTextModel(T.CLIPTextConfig(vocab_size=128, max_position_embeddings=64,
                                                               **small)), *no_cache),
        "vit": (lambda: T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0, **small)), *_image()),
        "deit": (lambda: T.DeiTModel(T.DeiTConfig(image_size=32, patch_size=8, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0, **small)), *_image()),
        "resnet": (lambda: T.ResNetModel(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                        layer_type="bottleneck")), *_image()),
        "convnext": (lambda: T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                                              image_size=32)), *_image()),
        "swin": (lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                  num_heads=[2, 2], window_size=4)), *_image()),
        "segformer": (lambda: T.SegformerModel(T.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                                 hidden_sizes=[16, 32], patch_sizes=[7, 3],
                                                                 strides=[4, 2], num_attention_heads=[1, 2],
                                                                 mlp_ratios=[2, 2])), *_image()),
    }


def _first(out) -> torch.Tensor:
    if isinstance(out, dict):
        return out["last_hidden_state"]
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def check(name: str, make, inputs, data) -> str:
    step = "make"
    try:
        torch.manual_seed(0)
        net = make().eval()
        step = "build"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = tg.from_module(net, inputs())
        opaque = sum("stays one opaque layer" in str(w.message) for w in caught)
        real = data()
        with torch.no_grad():
            ref = _first(net(**real))
            step = "run"
            errors = [(_first(model(**real)) - ref).abs().max().item()]
            step = "save/load"
            with tempfile.TemporaryDirectory() as tmp:
                tg.save(model, os.path.join(tmp, "m.safetensors"))
                loaded = tg.load(os.path.join(tmp, "m.safetensors")).eval()
                errors.append((_first(loaded(**real)) - ref).abs().max().item())
            step = "optimize"
            errors.append((_first(tg.optimize(model)(**real)) - ref).abs().max().item())
            step = "optimize bf16"
            out = _first(tg.optimize(model, dtype=torch.bfloat16)(**real)).float()
            errors.append(((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item())
        shown = ", ".join(f"{e:.1e}" for e in errors)
        return f"{name:12s} OK   opaque layers {opaque}; errors (eager, loaded, optimized, bf16 rel): {shown}"
    except Exception as exc:  # noqa: BLE001 - a sweep reports every failure and goes on
        return f"{name:12s} FAIL at {step}: {type(exc).__name__}: {str(exc)[:400]}"


def main() -> None:
    warnings.filterwarnings("ignore")
    table = cases()
    for name in sys.argv[1:] or list(table):
        print(check(name, *table[name]), flush=True)


if __name__ == "__main__":
    main()
