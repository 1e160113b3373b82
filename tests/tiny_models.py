"""Tiny random-weight causal LMs of every supported architecture, built from configs.

A large initializer_range makes the lens distributions peaked, so that entropy tests can
tell right from wrong (the default 0.02 gives near-uniform rows at every layer).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 211  # not a power of two, not a multiple of any chunk size
HIDDEN = 48
N_LAYERS = 3
MAX_POSITIONS = 128

_COMMON = dict(vocab_size=VOCAB, initializer_range=0.3, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
_DECODER = dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=N_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS)

ARCHITECTURES: dict[str, dict] = {
    "gpt2": dict(n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, n_positions=MAX_POSITIONS),
    "llama": dict(_DECODER, tie_word_embeddings=False),
    "mistral": dict(_DECODER, sliding_window=None),
    "gemma": dict(_DECODER, head_dim=12),
    "gemma2": dict(_DECODER, head_dim=12, final_logit_softcapping=2.0,
                   attn_logit_softcapping=50.0, query_pre_attn_scalar=12),
    "qwen2": dict(_DECODER, tie_word_embeddings=False),
    "qwen3": dict(_DECODER, head_dim=12),
    "opt": dict(hidden_size=HIDDEN, ffn_dim=96, num_hidden_layers=N_LAYERS,
                num_attention_heads=4, word_embed_proj_dim=32, enable_bias=True,
                max_position_embeddings=MAX_POSITIONS),
    "gpt_neox": dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=N_LAYERS,
                     num_attention_heads=4, max_position_embeddings=MAX_POSITIONS),
    "phi": dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=N_LAYERS,
                num_attention_heads=4, max_position_embeddings=MAX_POSITIONS),
}


def tiny_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random-weight model of architecture `kind`, in eval mode; `overrides` set config
    fields (e.g. a longer context)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, **_COMMON, **{**ARCHITECTURES[kind], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tiny_tokenizer():
    """An offline character-level tokenizer whose ids fit every tiny model's vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    characters = [chr(c) for c in range(32, 127)]
    vocab = {token: i for i, token in enumerate(specials + characters)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def forbid_hf_weights(monkeypatch) -> None:
    """Make any load of HF model weights (profiler, models, transformers) fail the test."""
    import transformers

    from entropy_fast import models, profiler

    def no_weights(*args, **kwargs):
        raise AssertionError("HF model weights were loaded")

    monkeypatch.setattr(profiler, "EntropyProfiler", no_weights)
    monkeypatch.setattr(profiler, "load_model", no_weights)
    monkeypatch.setattr(models, "load_model", no_weights)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
