"""Inputs shared by the distance, analysis and plot tests: synthetic profiles and one
tiny random GPT-2 profiled once per session (no downloads)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from entropy_fast.profile import EntropyProfile

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "log", "and", "then", "slept",
         "big", "small", "red", "blue", "fast", "slow", "home", "away"]


def make_profile(n_tokens: int, n_layers: int = 6, seed: int = 0, shift: float = 0.0,
                 alpha: float = 1.0) -> EntropyProfile:
    """A synthetic profile shaped like a real one: entropy falling with depth, plus noise.

    Built from the dataclass fields only, as the Parquet store hands profiles back.
    """
    rng = np.random.default_rng(seed)
    trend = np.linspace(6.0, 1.0, n_layers) + shift
    values = np.clip(trend + rng.normal(0.0, 0.8, (n_tokens, n_layers)), 0.0, None)
    return EntropyProfile(entropy=torch.tensor(values, dtype=torch.float32),
                          token_ids=torch.arange(n_tokens), layer_indices=list(range(n_layers)),
                          alpha=alpha, model_name="synthetic")


def word_tokenizer():
    """An offline word-level tokenizer over WORDS (ids 4..), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@lru_cache(maxsize=1)
def tiny_run():
    """(profiler, profile, hidden_states, aggregated) of a random 3-block GPT-2, built once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from entropy_fast.profiler import EntropyProfiler

    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", n_layer=3, n_embd=32, n_head=2, vocab_size=101,
                                  n_positions=64, initializer_range=0.3, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    profiler = EntropyProfiler(model, tokenizer=word_tokenizer())
    profile, states = profiler.profile_text_with_states("the cat sat on a mat", max_new_tokens=10)
    aggregated = profiler.profile_batch(["the dog ran", "a big red cat", "then slept home",
                                         "blue fast log"], max_new_tokens=8)
    return profiler, profile, states, aggregated
