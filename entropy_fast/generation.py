"""Generating continuations with HF: batched, left-padded, KV-cached decoding.

Generation only produces token ids; the profiler computes entropies afterwards in one
teacher-forced forward (the hidden state at a position is the same either way). Prompts
are grouped by length so that little of each batch is padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from entropy_fast.batching import length_buckets
from entropy_fast.settings import SamplingSettings


def stop_token_ids(model) -> set[int]:
    """The ids that end a continuation of `model` (see `stop_ids`)."""
    generation_config = getattr(model, "generation_config", None)
    return stop_ids(getattr(generation_config, "eos_token_id", None),
                    getattr(model.config.get_text_config(), "eos_token_id", None))


def stop_ids(generation_eos: Any, config_eos: Any) -> set[int]:
    """What HF `generate` stops on: the generation config's eos_token_id, else the model
    config's (each an id, a list of ids, or None)."""
    eos = config_eos if generation_eos is None else generation_eos
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def context_length(config) -> int | None:
    """Longest sequence (prompt + continuation) a model config allows, if it says."""
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def _cut_at_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]  # the stop token was generated: it keeps its row
    return tokens


class Generator(Protocol):
    """Anything that turns prompt ids into continuation ids (HF here, vLLM as an extra)."""

    name: str

    def generate(self, prompts: Sequence[list[int]],
                 sampling: SamplingSettings) -> list[list[int]]: ...


class HFGenerator:
    """HF `generate`: length-bucketed batches, left padding, KV cache."""

    name = "hf"

    def __init__(self, model, pad_token_id: int, batch_tokens: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.batch_tokens = batch_tokens

    def generate(self, prompts: Sequence[list[int]],
                 sampling: SamplingSettings) -> list[list[int]]:
        """Continuation ids of each prompt (up to and including a stop token)."""
        return generate_continuations(self.model, prompts, sampling, self.pad_token_id,
                                      self.batch_tokens)


@torch.no_grad()
def generate_continuations(model, prompts: Sequence[list[int]], sampling: SamplingSettings,
                           pad_token_id: int, batch_tokens: int,
                           on_batch: Callable[[list[int], list[list[int]]], None] | None = None,
                           ) -> list[list[int]]:
    """Continuation ids of each prompt (up to and including a stop token).

    Prompts are decoded in length buckets, left-padded, with the model's KV cache.
    `on_batch(indices, continuations)` is called after each bucket with its prompts'
    indices and continuations (the profiler reduces states it captured meanwhile).
    """
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    stops = stop_token_ids(model)
    results: list[list[int]] = [[] for _ in prompts]
    lengths = [len(p) + sampling.max_new_tokens for p in prompts]
    for bucket in length_buckets(lengths, batch_tokens):
        width = max(len(prompts[i]) for i in bucket)
        input_ids = torch.full((len(bucket), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(bucket), width), dtype=torch.long)
        for row, i in enumerate(bucket):
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention_mask[row, width - len(prompts[i]):] = 1
        output = model.generate(input_ids=input_ids.to(device),
                                attention_mask=attention_mask.to(device),
                                pad_token_id=pad_token_id, **sampling.generate_kwargs())
        for row, i in enumerate(bucket):
            results[i] = _cut_at_stop(output[row, width:].tolist(), stops)
        if on_batch is not None:
            on_batch(bucket, [results[i] for i in bucket])
    return results
