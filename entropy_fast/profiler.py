"""EntropyProfiler: prompts in, per-token per-layer logit-lens entropy profiles out.

Pipeline for a wave of prompts (waves keep memory bounded on any corpus size):

1. tokenize (ids are kept; nothing is ever decoded and re-tokenized);
2. with the HF generator, generate continuations (`generation`, batched left-padded HF)
   with taps on the residual stream (`hooks`) that keep each step's newest position, and
   send each generation batch's states through the lens (`lens`) when it is decoded: the
   state that produced a token is the one a teacher-forced forward would give (up to
   float rounding), so no second forward is run; go to 5;
3. otherwise (text mode, continuations from vLLM or given as ids) group sequences into
   length buckets under a token budget (`batching`);
4. run ONE teacher-forced forward of the base model per bucket (never the LM head: the
   model's own full-vocabulary logits would repeat the last layer's lens work), with
   taps that reduce each layer's states to entropies as soon as they exist;
5. cut the rows back into one `EntropyProfile` per prompt.

Rows: in generation mode row i is the distribution that produced generated token i; in
text mode (max_new_tokens=0) the rows are the text's tokens 1..T-1. Columns: hidden-state
indices 0, k, 2k, ... for layer_stride=k, and always the last state L (the model output),
or the indices given as `layers`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from entropy_fast.batching import length_buckets
from entropy_fast.entropy import LensStatistics, validate_alphas
from entropy_fast.generation import (
    Generator,
    HFGenerator,
    SamplingConfig,
    context_length,
    generate_continuations,
)
from entropy_fast.hooks import StateTap, find_decoder_layers
from entropy_fast.lens import BACKENDS, Lens
from entropy_fast.loading import DEFAULT_MODEL, load_model, model_source
from entropy_fast.profile import AggregatedProfile, EntropyProfile


def select_layers(n_blocks: int, layer_stride: int,
                  layers: Sequence[int] | None = None) -> list[int]:
    """Hidden-state indices 0, k, 2k, ... plus the last one, L = n_blocks; or `layers`.

    `layers` (explicit hidden-state indices in 0..L, increasing) overrides the stride.
    """
    if not isinstance(layer_stride, int) or layer_stride < 1:
        raise ValueError(f"layer_stride must be an integer >= 1, got {layer_stride!r}")
    if layers is not None:
        layers = [int(i) for i in layers]
        if not layers or layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] \
                <= n_blocks:
            raise ValueError(f"layers must be increasing hidden-state indices in 0..{n_blocks} "
                             f"(0 = embeddings, {n_blocks} = last block), got {layers}")
        return layers
    indices = list(range(0, n_blocks + 1, layer_stride))
    return indices if indices[-1] == n_blocks else [*indices, n_blocks]


def _take_rows(stats: LensStatistics, rows: slice) -> LensStatistics:
    """The statistics of some rows."""
    return LensStatistics(**{name: None if value is None else value[rows]
                             for name, value in vars(stats).items()})


@dataclass
class _Sequence:
    """One teacher-forced sequence: rows predict ids[first_target:]."""

    index: int
    ids: list[int]
    first_target: int
    generated: bool

    @property
    def n_rows(self) -> int:
        return len(self.ids) - self.first_target


class EntropyProfiler:
    """Logit-lens entropy profiler of one causal LM.

    Args:
        model: built-in alias (default "smollm2-135m"), .gguf file, local HF folder, hub id,
            or a loaded PreTrainedModel (then pass `tokenizer`).
        dtype: model dtype; None = bfloat16 on CUDA, float32 on CPU. Entropies are float32.
        alpha: Rényi order, or several orders computed in one pass (the first is primary).
        layer_stride: profile hidden states 0, k, 2k, ... and the last.
        layers: explicit hidden-state indices to profile instead (0 = embeddings, L = last
            block), e.g. range(1, L + 1) for the block outputs only.
        load_in_8bit, load_in_4bit: bitsandbytes quantized loading (extra "quantize").
        device: None = cuda when present, else cpu.
        backend: lens backend, "auto" | "torch" | "triton".
        batch_tokens: token budget of one padded batch (forward and generation).
        base: logarithm base of the entropies; None = nats, 2 = bits.
        top_token, target_stats: also record the lens argmax token, and the surprisal and
            rank of the actual next token, at every layer.
        generator: who generates continuations: "hf" (batched HF decoding), "vllm" (a vLLM
            engine, extra "vllm"; created on first use), or a `generation.Generator`.
        generator_options: keyword arguments for the vLLM engine (gpu_memory_utilization,
            max_model_len, ...; see `vllm_generation.VllmGenerator`).
    """

    def __init__(self, model=DEFAULT_MODEL, dtype: str | torch.dtype | None = None,
                 alpha: float | Sequence[float] = 1.0, layer_stride: int = 1,
                 load_in_8bit: bool = False, load_in_4bit: bool = False, *,
                 device: str | torch.device | None = None, tokenizer=None,
                 backend: str = "auto", batch_tokens: int = 8192, base: float | None = None,
                 top_token: bool = False, target_stats: bool = False,
                 generator: str | Generator = "hf",
                 generator_options: dict | None = None,
                 layers: Sequence[int] | None = None) -> None:
        self.alphas = validate_alphas(alpha)
        if generator == "vllm" and (load_in_8bit or load_in_4bit):
            raise ValueError("generator='vllm' would generate with the unquantized weights of a "
                             "model profiled in 8/4 bits: use generator='hf' with quantization")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be an integer >= 1, got {batch_tokens!r}")
        if base is not None and (base <= 0 or base == 1):
            raise ValueError(f"base must be > 0 and != 1 (2 for bits), got {base}")
        self.model, self.tokenizer, self.model_name = load_model(
            model, tokenizer, dtype, device, load_in_8bit, load_in_4bit)
        self.layers = find_decoder_layers(self.model)
        self.layer_indices = select_layers(len(self.layers), layer_stride, layers)
        self.layer_stride = layer_stride
        self.lens = Lens.from_model(self.model)
        self.backend = backend
        self.batch_tokens = batch_tokens
        self.base = base
        self.top_token = top_token
        self.target_stats = target_stats
        self._generator_choice = generator
        self._generator_options = dict(generator_options or {})
        self._generator: Generator | None = None
        self._source = model

    # -- seed-compatible API -------------------------------------------------------------

    @property
    def alpha(self) -> float:
        """The primary Rényi order."""
        return self.alphas[0]

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The model's parameter dtype."""
        return next(self.model.parameters()).dtype

    @property
    def context_length(self) -> int | None:
        """Longest sequence the model accepts (prompt + continuation), if it says."""
        return context_length(self.model.config)

    def profile_text(self, prompt: str, max_new_tokens: int = 32, **sampling) -> EntropyProfile:
        """Profile one prompt (see `iter_profiles` for the sampling options)."""
        return self.profile_batch([prompt], max_new_tokens, **sampling).profiles[0]

    def profile_text_with_states(self, prompt: str, max_new_tokens: int = 32,
                                 **sampling) -> tuple[EntropyProfile, torch.Tensor]:
        """Profile one prompt and return its states (n_layers x n_tokens x d) float32, pre-norm.

        The states are the profiled layers' hidden states at the profile's rows.
        """
        sampling = SamplingConfig(max_new_tokens, **sampling)
        ((_, profile, states),) = self._profile_prompts([prompt], [0], sampling, keep_states=True)
        return profile, states

    def profile_batch(self, prompts: Sequence[str], max_new_tokens: int = 32,
                      **sampling) -> AggregatedProfile:
        """Profile many prompts; profiles come back in the order of `prompts`."""
        profiles: list[EntropyProfile | None] = [None] * len(prompts)
        for index, profile in self.iter_profiles(prompts, max_new_tokens, **sampling):
            profiles[index] = profile
        return AggregatedProfile(profiles, model_name=self.model_name)

    def unload(self) -> None:
        """Free the model's memory (the profiler is unusable afterwards)."""
        self.model = None
        self.lens = None
        self.layers = None
        close = getattr(self._generator, "close", None)
        if close is not None:
            close()
        self._generator = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> EntropyProfiler:
        return self

    def __exit__(self, *exc) -> None:
        self.unload()

    # -- corpus-scale API ----------------------------------------------------------------

    def iter_profiles(self, prompts: Sequence[str], max_new_tokens: int = 32, *,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int | None = None, seed: int | None = None,
                      progress: bool = False,
                      wave_tokens: int = 1 << 20) -> Iterator[tuple[int, EntropyProfile]]:
        """Yield (index into prompts, profile) as batches finish, in no fixed order.

        Prompts are handled in waves of about `wave_tokens` tokens, so memory stays bounded
        whatever the corpus size. max_new_tokens=0 profiles the texts themselves.
        """
        sampling = SamplingConfig(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
        for index, prompt in enumerate(prompts):  # fail before any work on a bad prompt
            self._check_text(index, prompt)
        bar = tqdm(total=len(prompts), unit="prompt", disable=not progress)
        try:
            for wave in self._waves(prompts, sampling, wave_tokens):
                texts = [prompts[i] for i in wave]
                for index, profile, _ in self._profile_prompts(texts, wave, sampling, bar=bar):
                    yield index, profile
        finally:
            bar.close()

    def profile_token_ids(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                          texts: Sequence[str] | None = None, *, progress: bool = False,
                          generator: str = "given") -> Iterator[tuple[int, EntropyProfile]]:
        """Profile (prompt ids, continuation ids) pairs that were generated elsewhere.

        Rows are the continuation tokens; an empty continuation profiles the prompt as text
        (rows = tokens 1..T-1). `texts` (the prompts' text) only goes into the metadata.
        """
        prepared = []
        for index, (prompt_ids, continuation) in enumerate(sequences):
            prompt_ids, continuation = [int(t) for t in prompt_ids], [int(t) for t in continuation]
            self._check_length(index, len(prompt_ids) + len(continuation), len(prompt_ids),
                               bool(continuation))
            first = len(prompt_ids) if continuation else 1
            prepared.append(_Sequence(index, prompt_ids + continuation, first, bool(continuation)))
        texts = texts if texts is not None else [""] * len(prepared)
        metadata = {**self._metadata(SamplingConfig(0)), "generator": generator,
                    "max_new_tokens": max(len(c) for _, c in sequences) if sequences else 0}
        bar = tqdm(total=len(prepared), unit="prompt", disable=not progress)
        try:
            for index, profile, _ in self._profile_sequences(prepared, texts, metadata, bar=bar):
                yield index, profile
        finally:
            bar.close()

    def profile_prompt_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 32,
                           *, keep_states: bool = False, **sampling) -> Iterator[tuple]:
        """Profile prompts given as token ids (e.g. tokenized differently), like profile_batch.

        Yields (index, profile), or (index, profile, states) with `keep_states` (states as
        profile_text_with_states returns them), in no fixed order. `sampling` takes
        iter_profiles' options (do_sample, temperature, top_p, top_k, seed).
        """
        sampling = SamplingConfig(max_new_tokens, **sampling)
        ids = [[int(t) for t in p] for p in prompt_ids]
        for index, prompt in enumerate(ids):
            self._check_length(index, len(prompt) + max_new_tokens, len(prompt),
                               sampling.max_new_tokens > 0)
        indices = list(range(len(ids)))
        results = self._profile_ids(ids, indices, dict.fromkeys(indices, ""), sampling,
                                    keep_states)
        for index, profile, states in results:
            yield (index, profile, states) if keep_states else (index, profile)

    # -- internals -----------------------------------------------------------------------

    def _metadata(self, sampling: SamplingConfig) -> dict:
        return {
            "mode": "generation" if sampling.max_new_tokens else "text",
            "generator": self.generator.name if sampling.max_new_tokens else "none",
            **sampling.to_dict(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "layer_stride": self.layer_stride,
            "alphas": list(self.alphas),
            "base": self.base,
        }

    def _waves(self, prompts: Sequence[str], sampling: SamplingConfig,
               wave_tokens: int) -> Iterator[list[int]]:
        wave: list[int] = []
        tokens = 0
        for index, prompt in enumerate(prompts):
            wave.append(index)
            tokens += len(prompt) // 3 + sampling.max_new_tokens  # rough; only sizes waves
            if tokens >= wave_tokens:
                yield wave
                wave, tokens = [], 0
        if wave:
            yield wave

    @staticmethod
    def _check_text(index: int, prompt: str) -> None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {index} is a {type(prompt).__name__}, not a str")
        if not prompt.strip():
            raise ValueError(f"prompt {index} is empty: give some text to profile")

    def _check_length(self, index: int, total: int, n_prompt: int, generating: bool) -> None:
        limit = self.context_length
        if limit is not None and total > limit:
            raise ValueError(
                f"prompt {index} needs {total} positions ({n_prompt} prompt tokens"
                f"{' + new tokens' if generating else ''}) but the model's context window is "
                f"{limit}: shorten the prompt or lower max_new_tokens"
            )
        if not generating and total < 2:
            raise ValueError(
                f"prompt {index} has {total} token; text mode needs at least two tokens (rows "
                "are tokens 1..T-1), or set max_new_tokens > 0"
            )

    def _profile_prompts(self, texts: Sequence[str], indices: Sequence[int],
                         sampling: SamplingConfig, keep_states: bool = False, bar=None):
        """Tokenize, generate when asked to, and profile; indices name the prompts."""
        generating = sampling.max_new_tokens > 0
        ids = []
        for index, text in zip(indices, texts, strict=True):
            self._check_text(index, text)
            ids.append(list(self.tokenizer(text)["input_ids"]))
            self._check_length(index, len(ids[-1]) + sampling.max_new_tokens, len(ids[-1]),
                               generating)
        by_index = dict(zip(indices, texts, strict=True))
        yield from self._profile_ids(ids, indices, by_index, sampling, keep_states, bar)

    def _profile_ids(self, ids: list[list[int]], indices: Sequence[int], prompts: dict,
                     sampling: SamplingConfig, keep_states: bool = False, bar=None):
        """Generate when asked to, and profile; yields (index, profile, states or None)."""
        metadata = self._metadata(sampling)
        if sampling.max_new_tokens == 0:
            sequences = [_Sequence(i, p, 1, False) for i, p in zip(indices, ids, strict=True)]
        elif isinstance(self.generator, HFGenerator):
            yield from self._profile_while_generating(ids, indices, prompts, sampling, metadata,
                                                      keep_states, bar)
            return
        else:
            continuations = self.generator.generate(ids, sampling)
            sequences = [_Sequence(i, p + c, len(p), True)
                         for i, p, c in zip(indices, ids, continuations, strict=True)]
        yield from self._profile_sequences(sequences, prompts, metadata, keep_states, bar)

    def _profile_while_generating(self, ids: list[list[int]], indices: Sequence[int],
                                  prompts: dict, sampling: SamplingConfig, metadata: dict,
                                  keep_states: bool, bar):
        """HF generation with taps on the profiled layers, reduced batch by batch.

        Row t of a sequence is the last position of decoding step t, the state that produced
        continuation token t: the same state a teacher-forced forward would give (up to
        float rounding), so no second forward is run. Each generation batch's states are
        sent through the lens as soon as the batch is decoded.
        """
        captured: dict[int, list[torch.Tensor]] = {i: [] for i in self.layer_indices}
        finished: list[tuple] = []

        def keep_last_position(index: int, hidden: torch.Tensor) -> None:
            captured[index].append(hidden[:, -1])  # left padding: every row's newest token

        def reduce_batch(bucket: list[int], continuations: list[list[int]]) -> None:
            started = time.perf_counter()
            batch = [_Sequence(indices[b], ids[b] + c, len(ids[b]), True)
                     for b, c in zip(bucket, continuations, strict=True)]
            steps = {i: torch.stack(states, dim=1) for i, states in captured.items()}
            for states in captured.values():
                states.clear()
            rows = {i: torch.cat([s[row, :seq.n_rows] for row, seq in enumerate(batch)])
                    for i, s in steps.items()}
            columns, states = self._reduce(rows, batch, keep_states)
            finished.extend(self._split_batch(batch, columns, states, prompts, metadata,
                                              started, bar))

        with torch.no_grad(), StateTap(self.layers, self.layer_indices, keep_last_position):
            generate_continuations(self.model, ids, sampling, self._pad_id(), self.batch_tokens,
                                   on_batch=reduce_batch)
        yield from finished

    @property
    def generator(self) -> Generator:
        """The continuation generator, created on first use (a vLLM engine is costly)."""
        if self._generator is None:
            self._generator = self._make_generator(self._generator_choice)
        return self._generator

    def _make_generator(self, choice: str | Generator) -> Generator:
        if choice == "hf":
            return HFGenerator(self.model, self._pad_id(), self.batch_tokens)
        if choice == "vllm":
            from entropy_fast.vllm_generation import VllmGenerator

            return VllmGenerator(model_source(self._source, self.model),
                                 dtype=str(self.dtype).removeprefix("torch."),
                                 **self._generator_options)
        if isinstance(choice, str):
            raise ValueError(f"generator must be 'hf' or 'vllm', got {choice!r}")
        return choice

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
                          getattr(self.model.config, "pad_token_id", None)):
            if candidate is not None:
                return int(candidate)
        return 0

    def _profile_sequences(self, sequences: list[_Sequence], prompts, metadata: dict,
                           keep_states: bool = False, bar=None):
        """Yield (index, profile, states or None) per sequence, bucket by bucket."""
        lengths = [len(s.ids) - 1 for s in sequences]  # the last token is never an input
        for bucket in length_buckets(lengths, self.batch_tokens):
            started = time.perf_counter()
            batch = [sequences[i] for i in bucket]
            columns, states = self._forward(batch, keep_states)
            yield from self._split_batch(batch, columns, states, prompts, metadata, started,
                                         bar)

    def _split_batch(self, batch: list[_Sequence], columns, states, prompts, metadata: dict,
                     started: float, bar) -> list[tuple]:
        """(index, profile, states or None) of each sequence of a reduced batch."""
        elapsed = time.perf_counter() - started
        out, offset = [], 0
        for seq in batch:
            rows = slice(offset, offset + seq.n_rows)
            offset += seq.n_rows
            profile = self._build_profile(seq, columns, rows, prompts[seq.index], metadata)
            profile.metadata["batch_seconds"] = elapsed
            out.append((seq.index, profile, None if states is None else states[:, rows]))
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{offset / max(elapsed, 1e-9):.0f}")
        return out

    @torch.no_grad()
    def _forward(self, batch: list[_Sequence], keep_states: bool):
        """One teacher-forced forward; returns per-layer statistics of the batch's rows."""
        width = max(len(s.ids) - 1 for s in batch)
        input_ids = torch.full((len(batch), width), self._pad_id(), dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        positions = []
        for row, seq in enumerate(batch):
            n = len(seq.ids) - 1
            input_ids[row, :n] = torch.tensor(seq.ids[:-1])
            attention_mask[row, :n] = 1  # right padding: real tokens never see the pads
            positions.append(torch.arange(seq.first_target - 1, n) + row * width)
        device = self.device
        flat_positions = torch.cat(positions).to(device)
        targets = self._targets(batch)
        columns: dict[int, object] = {}
        kept: dict[int, torch.Tensor] = {}

        def reduce_layer(index: int, hidden: torch.Tensor) -> None:
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_positions)
            columns[index] = self.lens.statistics(rows, self.alphas, backend=self.backend,
                                                  targets=targets,
                                                  with_top_token=self.top_token)
            if keep_states:
                kept[index] = rows.float().cpu()

        with StateTap(self.layers, self.layer_indices, reduce_layer):
            self.model.base_model(input_ids=input_ids.to(device),
                                  attention_mask=attention_mask.to(device), use_cache=False)
        states = torch.stack([kept[i] for i in self.layer_indices]) if keep_states else None
        return [columns[i] for i in self.layer_indices], states

    def _targets(self, batch: list[_Sequence]) -> torch.Tensor | None:
        """The tokens the batch's rows predict, when target statistics are asked for."""
        if not self.target_stats:
            return None
        return torch.tensor([t for s in batch for t in s.ids[s.first_target:]],
                            device=self.device)

    def _reduce(self, rows: dict[int, torch.Tensor], batch: list[_Sequence], keep_states: bool):
        """Lens statistics of each layer's rows (n_rows x d); states stacked if kept.

        Every layer's rows go through the lens in one call ([n_layers * n_rows, d] against
        the head), so a small batch still makes GEMMs of many rows.
        """
        targets = self._targets(batch)
        n_layers, n_rows = len(self.layer_indices), len(rows[self.layer_indices[0]])
        stacked = torch.cat([rows[i] for i in self.layer_indices])
        stats = self.lens.statistics(
            stacked, self.alphas, backend=self.backend, with_top_token=self.top_token,
            targets=None if targets is None else targets.repeat(n_layers))
        columns = [_take_rows(stats, slice(k * n_rows, (k + 1) * n_rows))
                   for k in range(n_layers)]
        states = stacked.float().cpu().view(n_layers, n_rows, -1) if keep_states else None
        return columns, states

    def _build_profile(self, seq: _Sequence, columns, rows: slice, prompt: str,
                       metadata: dict) -> EntropyProfile:
        scale = 1.0 if self.base is None else 1.0 / math.log(self.base)

        def stack(name: str) -> torch.Tensor | None:
            values = [getattr(c, name) for c in columns]
            if values[0] is None:
                return None
            return torch.stack([v[rows] for v in values], dim=1).cpu()

        entropy = torch.stack([c.entropy[rows] for c in columns], dim=1).cpu() * scale
        surprisal = stack("target_surprisal")
        by_alpha = {a: entropy[:, :, k] for k, a in enumerate(self.alphas)}
        return EntropyProfile(
            entropy=by_alpha[self.alpha],
            token_ids=torch.tensor(seq.ids[seq.first_target:]),
            layer_indices=self.layer_indices,
            alpha=self.alpha,
            model_name=self.model_name,
            metadata={**metadata, "prompt": prompt, "prompt_index": seq.index,
                      "mode": "generation" if seq.generated else "text",
                      "prompt_token_ids": seq.ids[:seq.first_target] if seq.generated
                      else seq.ids},
            entropies=by_alpha,
            top_token_ids=stack("top_token"),
            target_surprisal=None if surprisal is None else surprisal * scale,
            target_rank=stack("target_rank"),
        )
