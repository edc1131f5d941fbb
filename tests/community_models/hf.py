"""Random-init HuggingFace ``transformers`` models (BERT, GPT-2, Llama, OPT, Falcon, T5, DeBERTa-v2, Bloom) at tiny sizes; never downloads weights.

``transformers`` is imported inside the factories only: importing it costs seconds. ``HAS_TRANSFORMERS`` says
whether it is installed (requirements-dev.txt pins it).
"""

import importlib.util

import torch.nn as nn

__all__ = ["HAS_TRANSFORMERS", "tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_opt", "tiny_falcon", "tiny_t5",
           "tiny_deberta_v2", "tiny_bloom"]

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def tiny_bert(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=128, attn_implementation="sdpa", **config_kwargs) -> nn.Module:
    """``BertModel(BertConfig(...))``, random init; call with ``input_ids`` and ``attention_mask`` (1 = token).

    "sdpa" is transformers' default attention for BERT; pass "eager" for the written-out softmax path.
    """
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=max_position_embeddings, attn_implementation=attn_implementation,
                        **config_kwargs)
    return BertModel(config)


def tiny_gpt2(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128, attn_implementation="sdpa",
              use_cache=False, **config_kwargs) -> nn.Module:
    """``GPT2Model(GPT2Config(...))``, random init; call with ``input_ids`` (and optionally ``attention_mask``).

    ``use_cache=False`` by default: the output is then only ``last_hidden_state`` (with a cache, transformers also
    returns a ``DynamicCache`` object). The bos/eos ids are set inside the small vocabulary.
    """
    from transformers import GPT2Config, GPT2Model

    config_kwargs.setdefault("bos_token_id", vocab_size - 1)
    config_kwargs.setdefault("eos_token_id", vocab_size - 1)
    config = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        n_positions=n_positions, attn_implementation=attn_implementation, use_cache=use_cache,
                        **config_kwargs)
    return GPT2Model(config)


def tiny_llama(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, use_cache=False, **config_kwargs) -> nn.Module:
    """``LlamaModel(LlamaConfig(...))``, random init (grouped-query attention, rotary embeddings, RMSNorm);
    call with ``input_ids``. Its decoder blocks are ``self.layers``, the name of a tg.Model property."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
                         use_cache=use_cache, **config_kwargs)
    return LlamaModel(config)


def tiny_opt(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, dropout=0.1, use_cache=False, **config_kwargs) -> nn.Module:
    """``OPTModel(OPTConfig(...))``, random init; call with ``input_ids``. Its decoder layers call
    ``nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)`` (``dropout`` > 0 here)."""
    from transformers import OPTConfig, OPTModel

    config = OPTConfig(vocab_size=vocab_size, hidden_size=hidden_size, ffn_dim=ffn_dim,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                       max_position_embeddings=max_position_embeddings, dropout=dropout, use_cache=use_cache,
                       **config_kwargs)
    return OPTModel(config)


def tiny_falcon(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=0.1,
                use_cache=False, **config_kwargs) -> nn.Module:
    """``FalconModel(FalconConfig(...))``, random init; call with ``input_ids``. Its decoder layers call a
    ``dropout_add(x, residual, prob, training)`` helper with ``training=self.training``."""
    from transformers import FalconConfig, FalconModel

    config = FalconConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                          num_attention_heads=num_attention_heads, hidden_dropout=hidden_dropout,
                          use_cache=use_cache, **config_kwargs)
    return FalconModel(config)


def tiny_t5(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
            **config_kwargs) -> nn.Module:
    """``T5Model(T5Config(...))``, random init (encoder-decoder, relative position bias); call with
    ``input_ids``, ``attention_mask`` and ``decoder_input_ids``. Its attention masks scores with
    ``torch.finfo(scores.dtype).min``."""
    from transformers import T5Config, T5Model

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                      num_heads=num_heads, dropout_rate=dropout_rate, use_cache=False, **config_kwargs)
    return T5Model(config)


def tiny_deberta_v2(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    **config_kwargs) -> nn.Module:
    """``DebertaV2Model(DebertaV2Config(...))``, random init (disentangled attention); call with ``input_ids`` and
    ``attention_mask``. Its attention fills masked scores with ``torch.finfo(query.dtype).min``."""
    from transformers import DebertaV2Config, DebertaV2Model

    config = DebertaV2Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                             num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                             max_position_embeddings=max_position_embeddings, hidden_dropout_prob=hidden_dropout_prob,
                             attention_probs_dropout_prob=attention_probs_dropout_prob, **config_kwargs)
    return DebertaV2Model(config)


def tiny_bloom(vocab_size=128, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0,
               **config_kwargs) -> nn.Module:
    """``BloomModel(BloomConfig(...))``, random init (ALiBi); call with ``input_ids`` and ``attention_mask``. Its
    causal mask comes from transformers' masking_utils (``torch.finfo(dtype).min`` for eager attention)."""
    from transformers import BloomConfig, BloomModel

    config = BloomConfig(vocab_size=vocab_size, hidden_size=hidden_size, n_layer=n_layer, n_head=n_head,
                         hidden_dropout=hidden_dropout, attention_dropout=attention_dropout, use_cache=False,
                         **config_kwargs)
    return BloomModel(config)
