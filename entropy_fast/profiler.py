"""EntropyProfiler: prompts in, per-token per-layer logit-lens entropy profiles out.

Pipeline for a wave of prompts (waves keep memory bounded on any corpus size):

1. tokenize (ids are kept; nothing is ever decoded and re-tokenized);
2. with the HF generator, generate continuations (`generation`, batched left-padded, KV
   cache) with taps on the residual stream (`forward`) that keep each decoding step's
   newest position: the state that produced a token is the one a teacher-forced forward
   would give (up to float rounding), so no second forward runs. Each generation batch's
   states go through the lens (`lens`) as soon as it is decoded, every layer in one call
   (many-row GEMMs even for one prompt); go to 5;
3. otherwise (text mode, vLLM continuations, continuations given as ids) group sequences
   into length buckets under a token budget (`batching`);
4. run ONE teacher-forced forward of the base model per bucket (`forward`; never the LM
   head, whose logits would repeat the last layer's lens work), with taps on the residual
   stream that reduce each layer's states to entropies as soon as they exist;
5. cut the rows back into one `EntropyProfile` per prompt.

Rows: in generation mode row i is the distribution that produced generated token i; in
text mode (max_new_tokens=0) the rows are the text's tokens 1..T-1. Columns: hidden-state
indices 0, k, 2k, ... for layer_stride=k, and always the last state L (the model output),
or the indices given as `layers`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from entropy_fast.batching import length_buckets
from entropy_fast.cpu_threads import CpuSample, default_threads
from entropy_fast.errors import ConfigError
from entropy_fast.forward import (
    StateTap,
    TeacherForced,
    find_decoder_layers,
    forward_rows,
    to_device,
)
from entropy_fast.generation import (
    Generator,
    HFGenerator,
    context_length,
    generate_continuations,
)
from entropy_fast.lens import Lens
from entropy_fast.models import load_model, model_source, tokenize_many
from entropy_fast.profile import AggregatedProfile, EntropyProfile
from entropy_fast.settings import (
    DEFAULT_MODEL,
    LensSettings,
    ModelSettings,
    SamplingSettings,
    describe,
    split_options,
)

STATISTICS = ("entropy", "top_token", "target_surprisal", "target_rank", "top_tokens",
              "top_probs", "kl_to_final")
"""The columns of a ProfiledBatch (entropy.LensStatistics' fields)."""
IN_RUN_UNIT = ("entropy", "target_surprisal", "kl_to_final")
"""The columns given in the run's unit (nats, or log base `base`); the others are token ids,
ranks and probabilities."""

Progress = Callable[[int, int], None]
"""Called with (prompts, tokens) as each batch of profiles is done."""


def select_layers(n_blocks: int, layer_stride: int,
                  layers: Sequence[int] | None = None) -> list[int]:
    """Hidden-state indices 0, k, 2k, ... plus the last one, L = n_blocks; or `layers`
    (explicit increasing indices in 0..L), which override the stride."""
    if layers is not None:
        chosen = [int(i) for i in layers]
        if not chosen or chosen != sorted(set(chosen)) or not 0 <= chosen[0] <= chosen[-1] \
                <= n_blocks:
            raise ConfigError(f"layers must be increasing hidden-state indices in 0..{n_blocks} "
                              f"(0 = embeddings, {n_blocks} = last block), got {list(layers)}",
                              param="layers")
        return chosen
    indices = list(range(0, n_blocks + 1, layer_stride))
    return indices if indices[-1] == n_blocks else [*indices, n_blocks]


class EntropyProfiler:
    """Logit-lens entropy profiler of one causal LM.

    Args:
        model: built-in alias (default "smollm2-135m"), .gguf file, local HF folder, hub id,
            or a loaded PreTrainedModel (then pass `tokenizer`).
        tokenizer: the tokenizer of a model object (default: loaded with the model).
        generator: "hf" | "vllm" (the default is "hf"), or a `generation.Generator` object.
        generator_options: keyword arguments for the vLLM engine (gpu_memory_utilization,
            max_model_len, ...; see `vllm_generation.VllmGenerator`).
        layers: explicit hidden-state indices to profile instead of every layer_stride-th
            (0 = embeddings, L = last block), e.g. range(1, L + 1) for the block outputs.
        lens, settings: a `LensSettings` and a `ModelSettings`, or give their fields as
            keyword options: alpha (one order or several, the first primary), layer_stride,
            base, top_token, target_stats (LensSettings); dtype, device, load_in_8bit,
            load_in_4bit, backend, batch_tokens, threads (ModelSettings). See
            entropy_fast.settings.

    Example: ``EntropyProfiler("gpt2", alpha=(1.0, 2.0), dtype="bfloat16")``.
    """

    def __init__(self, model: Any = DEFAULT_MODEL, *, tokenizer: Any = None,
                 generator: str | Generator = "hf", generator_options: dict | None = None,
                 lens: LensSettings | None = None, settings: ModelSettings | None = None,
                 layers: Sequence[int] | None = None, **options: Any) -> None:
        custom = None if isinstance(generator, str) else generator
        if settings is None:
            options["generator"] = generator if custom is None else "hf"
        parsed_lens, parsed_model = split_options(options, (LensSettings, ModelSettings))
        if (lens is not None and parsed_lens != LensSettings()) or (
                settings is not None and parsed_model != ModelSettings()):
            raise TypeError("give settings as settings objects or as keyword options, "
                            "not both")
        self.lens_settings: LensSettings = lens or parsed_lens
        self.model_settings: ModelSettings = settings or parsed_model
        ms = self.model_settings
        cpu_before_load = CpuSample.now()  # what other jobs use while the model loads
        self.model, self.tokenizer, self.model_name = load_model(
            model, tokenizer, ms.dtype, ms.device, ms.load_in_8bit, ms.load_in_4bit)
        if ms.threads is not None or self.device.type == "cpu":
            # process-wide in torch: the last profiler's setting wins
            torch.set_num_threads(ms.threads or default_threads(since=cpu_before_load))
        self.layers = find_decoder_layers(self.model)
        self.layer_indices = select_layers(len(self.layers), self.lens_settings.layer_stride,
                                           layers)
        self.lens = Lens.from_model(self.model)
        # KL to the final layer needs the last state even where it is not profiled
        last = [len(self.layers)] if self.lens_settings.kl_to_final else []
        self._tapped = sorted(set(self.layer_indices) | set(last))
        self._generator_options = dict(generator_options or {})
        self._generator: Generator | None = custom
        self._source = model

    # -- settings, as the seed library's attributes ------------------------------------

    @property
    def alphas(self) -> tuple[float, ...]:
        """Every Rényi order computed, the primary one first."""
        return self.lens_settings.alphas

    @property
    def alpha(self) -> float:
        """The primary Rényi order."""
        return self.lens_settings.alpha

    @property
    def layer_stride(self) -> int:
        """Profile hidden states 0, k, 2k, ... and the last."""
        return self.lens_settings.layer_stride

    @property
    def base(self) -> float | None:
        """Logarithm base of the entropies (None = nats)."""
        return self.lens_settings.base

    @property
    def batch_tokens(self) -> int:
        """Token budget of one padded batch."""
        return self.model_settings.batch_tokens

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

    # -- one prompt, many prompts -------------------------------------------------------

    def profile_text(self, prompt: str, max_new_tokens: int = 32, **sampling: Any
                     ) -> EntropyProfile:
        """Profile one prompt (see `iter_profiles` for the sampling options)."""
        return self.profile_batch([prompt], max_new_tokens, **sampling).profiles[0]

    def profile_text_with_states(self, prompt: str, max_new_tokens: int = 32,
                                 **sampling: Any) -> tuple[EntropyProfile, torch.Tensor]:
        """Profile one prompt and return its states (n_layers x n_tokens x d) float32, pre-norm.

        The states are the profiled layers' hidden states at the profile's rows.
        """
        sampling_settings = SamplingSettings(max_new_tokens, **sampling)
        ((_, profile, states),) = self._profile_prompts([prompt], [0], sampling_settings,
                                                        keep_states=True)
        return profile, states

    def profile_batch(self, prompts: Sequence[str], max_new_tokens: int = 32,
                      **sampling: Any) -> AggregatedProfile:
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

    def __exit__(self, *exc: object) -> None:
        self.unload()

    # -- corpus-scale API ----------------------------------------------------------------

    def iter_profiles(self, prompts: Sequence[str], max_new_tokens: int = 32, *,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int | None = None, seed: int | None = None,
                      chat_template: bool = False, on_progress: Progress | None = None,
                      wave_tokens: int = 1 << 16) -> Iterator[tuple[int, EntropyProfile]]:
        """Yield (index into prompts, profile) as batches finish, in no fixed order.

        Prompts are handled in waves of about `wave_tokens` tokens (generate, then profile),
        so memory stays bounded whatever the corpus size and profiles arrive steadily.
        max_new_tokens=0 profiles the texts themselves. `on_progress(prompts, tokens)` is
        called after each profiled batch.
        """
        sampling = SamplingSettings(max_new_tokens, do_sample, temperature, top_p, top_k, seed,
                                    chat_template)
        for index, prompt in enumerate(prompts):  # fail before any work on a bad prompt
            self._check_text(index, prompt)
        ids = self.tokenize_many(prompts, sampling.chat_template)
        for index, prompt_ids in enumerate(ids):
            self.check_length(index, len(prompt_ids), sampling.max_new_tokens,
                              sampling.generating)
        for wave in _waves(ids, sampling, wave_tokens):
            yield from self.iter_prompt_ids([ids[i] for i in wave], sampling,
                                            [prompts[i] for i in wave], wave,
                                            on_progress=on_progress)

    def iter_prompt_ids(self, prompt_ids: Sequence[list[int]], sampling: SamplingSettings,
                        texts: Sequence[str] | None = None,
                        indices: Sequence[int] | None = None, *,
                        on_progress: Progress | None = None
                        ) -> Iterator[tuple[int, EntropyProfile]]:
        """Profile tokenized prompts in one wave: generate (when sampling.generating),
        then profile every sequence. Yields (index, profile); indices default to 0..n-1.

        Lengths are not checked here: callers check them (`check_length`) up front.
        """
        indices = list(range(len(prompt_ids))) if indices is None else list(indices)
        texts = [""] * len(indices) if texts is None else texts
        by_index = dict(zip(indices, texts, strict=True))
        metadata = self._metadata(sampling)
        for batch in self.prompt_id_batches(prompt_ids, sampling, indices,
                                            on_progress=on_progress):
            for index, profile, _ in self._split_batch(batch, by_index, metadata):
                yield index, profile

    def prompt_id_batches(self, prompt_ids: Sequence[list[int]], sampling: SamplingSettings,
                          indices: Sequence[int] | None = None, *,
                          on_progress: Progress | None = None) -> Iterator[ProfiledBatch]:
        """`iter_prompt_ids` without the profiles: each batch's statistics as the device
        stage leaves them (`ProfiledBatch`), for callers that handle a batch at once (a
        store run turns it into rows). Sequence indices default to 0..n-1."""
        indices = list(range(len(prompt_ids))) if indices is None else list(indices)
        yield from self._batches_of_ids(prompt_ids, indices, sampling, on_progress=on_progress)

    def profile_prompt_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 32,
                           *, keep_states: bool = False, **sampling: Any
                           ) -> Iterator[tuple[int, EntropyProfile, torch.Tensor | None]]:
        """Profile prompts given as token ids, as `profile_batch` profiles texts.

        Yields (index, profile, states) in no fixed order; states (n_layers x n_tokens x d,
        float32, pre-norm) with `keep_states`, else None. `sampling` takes the sampling
        options of `iter_profiles` (do_sample, temperature, top_p, top_k, seed).
        """
        settings = SamplingSettings(max_new_tokens, **sampling)
        ids = [[int(t) for t in p] for p in prompt_ids]
        for index, prompt in enumerate(ids):
            self.check_length(index, len(prompt), settings.max_new_tokens, settings.generating)
        indices = list(range(len(ids)))
        metadata = self._metadata(settings)
        for batch in self._batches_of_ids(ids, indices, settings, keep_states):
            yield from self._split_batch(batch, dict.fromkeys(indices, ""), metadata)

    def profile_token_ids(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                          texts: Sequence[str] | None = None, *,
                          on_progress: Progress | None = None,
                          generator: str = "given") -> Iterator[tuple[int, EntropyProfile]]:
        """Profile (prompt ids, continuation ids) pairs that were generated elsewhere.

        Rows are the continuation tokens; an empty continuation profiles the prompt as text
        (rows = tokens 1..T-1). `texts` (the prompts' text) only goes into the metadata.
        """
        texts = texts if texts is not None else [""] * len(sequences)
        longest = max((len(c) for _, c in sequences), default=0)
        metadata = self._metadata(SamplingSettings(longest), generator)
        for batch in self.token_id_batches(sequences, on_progress=on_progress):
            for index, profile, _ in self._split_batch(batch, texts, metadata):
                yield index, profile

    def token_id_batches(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                         on_progress: Progress | None = None) -> Iterator[ProfiledBatch]:
        """`profile_token_ids` without the profiles: each batch's statistics as the device
        stage leaves them (`ProfiledBatch`); sequence i has index i."""
        prepared = []
        for index, (prompt_ids, continuation) in enumerate(sequences):
            prompt_ids, continuation = [int(t) for t in prompt_ids], [int(t) for t in continuation]
            self.check_length(index, len(prompt_ids), len(continuation), bool(continuation))
            first = len(prompt_ids) if continuation else 1
            prepared.append(TeacherForced(index, prompt_ids + continuation, first,
                                          bool(continuation)))
        yield from self._batches(prepared, on_progress=on_progress)

    def check_length(self, index: int, n_prompt: int, n_new: int, generating: bool) -> None:
        """ConfigError unless a prompt of `n_prompt` tokens plus `n_new` fits the model."""
        limit = self.context_length
        total = n_prompt + n_new
        if limit is not None and total > limit:
            hint = ("shorten the prompt or lower max_new_tokens" if generating
                    else "shorten the prompt, or skip or truncate over-long prompts")
            raise ConfigError(
                f"prompt {index} needs {total} positions ({n_prompt} prompt tokens"
                f"{f' + {n_new} new tokens' if generating else ''}) but the model's context "
                f"window is {limit}", hint, param="max_new_tokens" if generating else None)
        if not generating and total < 2:
            raise ConfigError(f"prompt {index} has {total} token; text mode needs at least two "
                              "tokens (rows are tokens 1..T-1)", "set max_new_tokens > 0")

    def tokenize(self, text: str, chat_template: bool = False) -> list[int]:
        """The token ids the profiler uses for `text` (the tokenizer's defaults; with
        chat_template, the tokenizer's chat template around it: `models.tokenize_many`)."""
        return self.tokenize_many([text], chat_template)[0]

    def tokenize_many(self, texts: Sequence[str], chat_template: bool = False
                      ) -> list[list[int]]:
        """`tokenize` of each text, in one call of the tokenizer (a fast tokenizer's batch
        call encodes them in parallel)."""
        return tokenize_many(self.tokenizer, texts, chat_template)

    # -- internals -----------------------------------------------------------------------

    def _metadata(self, sampling: SamplingSettings, generator: str | None = None
                  ) -> dict[str, Any]:
        """The profiles' metadata; `generator` names who generated (default: ours, which
        is only created when it is needed)."""
        if generator is None:
            generator = self.generator.name if sampling.generating else "none"
        return describe(self.lens_settings, sampling, str(self.dtype).removeprefix("torch."),
                        generator)

    @staticmethod
    def _check_text(index: int, prompt: str) -> None:
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt {index} is a {type(prompt).__name__}, not a str")
        if not prompt.strip():
            raise ConfigError(f"prompt {index} is empty", "give some text to profile")

    def _profile_prompts(self, texts: Sequence[str], indices: Sequence[int],
                         sampling: SamplingSettings, keep_states: bool = False):
        """Tokenize, check, generate when asked to, and profile; indices name the prompts."""
        ids = []
        for index, text in zip(indices, texts, strict=True):
            self._check_text(index, text)
            ids.append(self.tokenize(text, sampling.chat_template))
            self.check_length(index, len(ids[-1]), sampling.max_new_tokens, sampling.generating)
        metadata = self._metadata(sampling)
        by_index = dict(zip(indices, texts, strict=True))
        for batch in self._batches_of_ids(ids, indices, sampling, keep_states):
            yield from self._split_batch(batch, by_index, metadata)

    def _batches_of_ids(self, ids: Sequence[list[int]], indices: Sequence[int],
                        sampling: SamplingSettings, keep_states: bool = False,
                        on_progress: Progress | None = None) -> Iterator[ProfiledBatch]:
        """The batches of prompts given as ids: generated first when sampling says so."""
        if sampling.generating and isinstance(self.generator, HFGenerator):
            yield from self._batches_while_generating(ids, indices, sampling, keep_states,
                                                      on_progress)
            return
        if sampling.generating:
            continuations = self.generator.generate(ids, sampling)
            sequences = [TeacherForced(i, [*p, *c], len(p), True)
                         for i, p, c in zip(indices, ids, continuations, strict=True)]
        else:
            sequences = [TeacherForced(i, list(p), 1, False)
                         for i, p in zip(indices, ids, strict=True)]
        yield from self._batches(sequences, keep_states, on_progress)

    def _batches_while_generating(self, ids: Sequence[list[int]], indices: Sequence[int],
                                  sampling: SamplingSettings, keep_states: bool,
                                  on_progress: Progress | None) -> list[ProfiledBatch]:
        """HF generation with taps that keep each decoding step's newest position of every
        profiled layer; each generation batch is reduced as soon as it is decoded.

        Row t of a sequence is the newest position of decoding step t (left padding puts
        every row's newest token last): the state that produced continuation token t.
        """
        captured: dict[int, list[torch.Tensor]] = {i: [] for i in self._tapped}
        finished: list[ProfiledBatch] = []

        def keep_newest(index: int, hidden: torch.Tensor) -> None:
            # a copy: a view would keep the prefill's (batch x prompt x d) states alive
            captured[index].append(hidden[:, -1].clone())

        def reduce_batch(bucket: list[int], continuations: list[list[int]]) -> None:
            started = time.perf_counter()
            batch = [TeacherForced(indices[b], [*ids[b], *c], len(ids[b]), True)
                     for b, c in zip(bucket, continuations, strict=True)]
            steps = [torch.stack(captured[i], dim=1) for i in self._tapped]
            for states in captured.values():
                states.clear()
            rows = torch.cat([torch.cat([s[row, :seq.n_rows] for row, seq in enumerate(batch)])
                              for s in steps])  # (layers * rows) x d
            finished.append(self._reduce(rows, batch, keep_states))
            finished[-1].seconds = time.perf_counter() - started
            _report(on_progress, finished[-1])

        generator = self.generator
        with torch.no_grad(), StateTap(self.layers, self._tapped, keep_newest):
            generate_continuations(self.model, ids, sampling, generator.pad_token_id,
                                   generator.batch_tokens, on_batch=reduce_batch)
        return finished

    @property
    def generator(self) -> Generator:
        """The continuation generator, created on first use (a vLLM engine is costly)."""
        if self._generator is None:
            self._generator = self._make_generator(self.model_settings.generator)
        return self._generator

    def _make_generator(self, choice: str) -> Generator:
        if choice == "vllm":
            from entropy_fast.vllm_generation import VllmGenerator

            return VllmGenerator(model_source(self._source, self.model),
                                 dtype=str(self.dtype).removeprefix("torch."),
                                 **self._generator_options)
        return HFGenerator(self.model, self._pad_id(), self.batch_tokens)

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
                          getattr(self.model.config, "pad_token_id", None)):
            if candidate is not None:
                return int(candidate)
        return 0

    def _batches(self, sequences: list[TeacherForced], keep_states: bool = False,
                 on_progress: Progress | None = None) -> Iterator[ProfiledBatch]:
        """One ProfiledBatch per length bucket of `sequences`."""
        lengths = [len(s.ids) - 1 for s in sequences]  # the last token is never an input
        for bucket in length_buckets(lengths, self.batch_tokens):
            started = time.perf_counter()
            batch = self._forward([sequences[i] for i in bucket], keep_states)
            batch.seconds = time.perf_counter() - started
            _report(on_progress, batch)
            yield batch

    def _split_batch(self, batch: ProfiledBatch, prompts, metadata: dict) -> list[tuple]:
        """(index, profile, states or None) of each sequence of a batch."""
        columns, states = batch.host_columns(), batch.states
        out, offset = [], 0
        for seq in batch.sequences:
            rows = slice(offset, offset + seq.n_rows)
            offset += seq.n_rows
            profile = self._build_profile(seq, columns, rows, prompts[seq.index], metadata)
            profile.metadata["batch_seconds"] = batch.seconds
            out.append((seq.index, profile, None if states is None else states[:, rows]))
        return out

    def _forward(self, batch: list[TeacherForced], keep_states: bool) -> ProfiledBatch:
        """The device stage of a batch: one teacher-forced forward whose taps reduce each
        layer's rows to statistics; the states (layers x rows x d) when asked for.

        With kl_to_final every tapped layer's rows wait in one (layers x rows x d) buffer
        for the last state, then go through the lens in one call (`_reduce`)."""
        targets = self._targets(batch)
        columns: dict[int, Any] = {}
        kept: dict[int, torch.Tensor] = {}
        grouped: torch.Tensor | None = None

        def reduce_layer(index: int, rows: torch.Tensor) -> None:
            nonlocal grouped
            if not self.lens_settings.kl_to_final:
                columns[index] = self._statistics(rows, targets)
                if keep_states:
                    kept[index] = rows.float().cpu()
                return
            if grouped is None:
                grouped = rows.new_empty((len(self._tapped), *rows.shape))
            grouped[self._tapped.index(index)] = rows

        forward_rows(self.model, self.layers, batch, self._tapped, self._pad_id(),
                     reduce_layer)
        if grouped is not None:
            return self._reduce(grouped.view(-1, grouped.shape[-1]), batch, keep_states)
        stats = [columns[i] for i in self.layer_indices]
        states = torch.stack([kept[i] for i in self.layer_indices]) if keep_states else None
        return self._on_host(batch, stats, states)

    def _statistics(self, rows: torch.Tensor, targets: torch.Tensor | None,
                    kl_groups: int = 0):
        """The lens statistics the settings ask for, of rows (n x d)."""
        return self.lens.statistics(
            rows, self.alphas, backend=self.model_settings.backend, targets=targets,
            with_top_token=self.lens_settings.top_token,
            top_k=self.lens_settings.top_tokens, kl_groups=kl_groups)

    def _targets(self, batch: list[TeacherForced]) -> torch.Tensor | None:
        """The tokens the batch's rows predict, when target statistics are asked for."""
        if not self.lens_settings.target_stats:
            return None
        return to_device(torch.tensor([t for s in batch for t in s.ids[s.first_target:]]),
                         self.device)

    def _reduce(self, rows: torch.Tensor, batch: list[TeacherForced], keep_states: bool):
        """`_forward`'s result for states given as (tapped layers * rows) x d,
        layer-major: every layer goes through the lens in one call."""
        n_groups = len(self._tapped)
        targets = self._targets(batch)
        stats = self._statistics(rows, None if targets is None else targets.repeat(n_groups),
                                 kl_groups=n_groups if self.lens_settings.kl_to_final else 0)
        n_rows = len(rows) // n_groups
        profiled = [self._tapped.index(i) for i in self.layer_indices]
        per_layer = [stats.rows(slice(k * n_rows, (k + 1) * n_rows)) for k in profiled]
        states = None
        if keep_states:
            states = rows.float().cpu().view(n_groups, -1, rows.shape[-1])[profiled]
        return self._on_host(batch, per_layer, states)

    def _on_host(self, batch: list[TeacherForced], stats: list[Any],
                 states: torch.Tensor | None) -> ProfiledBatch:
        """Each statistic of every layer stacked on dim 1, in the profiler's unit (`base`),
        and started on its way to the host: one copy per statistic and batch, into pinned
        memory without waiting on CUDA (`ProfiledBatch.host_columns` waits)."""
        scale = 1.0 if self.base is None else 1.0 / math.log(self.base)
        columns: dict[str, torch.Tensor | None] = {}
        for name in STATISTICS:
            values = [getattr(s, name) for s in stats]
            stacked = None if values[0] is None else torch.stack(values, dim=1)
            if stacked is not None and scale != 1.0 and name in IN_RUN_UNIT:
                stacked = stacked * scale
            columns[name] = None if stacked is None else _start_copy_to_host(stacked)
        ready = torch.cuda.Event() if self.device.type == "cuda" else None
        if ready is not None:
            ready.record()
        return ProfiledBatch(batch, columns, states, ready=ready)

    def _build_profile(self, seq: TeacherForced, columns: dict[str, torch.Tensor | None],
                       rows: slice, prompt: str, metadata: dict) -> EntropyProfile:
        entropy = columns["entropy"][rows]                   # (rows x layers x alphas)
        surprisal = columns["target_surprisal"]
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
            top_token_ids=_rows(columns["top_token"], rows),
            target_surprisal=None if surprisal is None else surprisal[rows],
            target_rank=_rows(columns["target_rank"], rows),
            top_tokens=_rows(columns["top_tokens"], rows),
            top_probs=_rows(columns["top_probs"], rows),
            kl_to_final=_rows(columns["kl_to_final"], rows),
        )


def _rows(values: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if values is None else values[rows]


def _start_copy_to_host(values: torch.Tensor) -> torch.Tensor:
    """`values` on the host: itself on CPU; on CUDA a pinned buffer that a non-blocking
    copy fills (read it only after the batch's `ready` event)."""
    if values.device.type != "cuda":
        return values
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    return host


def _report(on_progress: Progress | None, batch: ProfiledBatch) -> None:
    if on_progress is not None:
        on_progress(len(batch.sequences), batch.n_rows)


@dataclass
class ProfiledBatch:
    """What the device stage leaves of one batch: its sequences and, per statistic, the
    (rows x layers [x alphas]) values of their rows concatenated in sequence order, in the
    profiler's unit (entropy, target_surprisal) or as token ids and ranks (top_token,
    target_rank); None for a statistic not asked for. On CUDA the values may still be on
    their way to the host: read them through `host_columns`.

    states: (layers x rows x d) float32 when asked for; seconds: the device stage's time.
    """

    sequences: list[TeacherForced]
    columns: dict[str, torch.Tensor | None]  # STATISTICS
    states: torch.Tensor | None = None
    seconds: float = 0.0
    ready: Any = None  # a torch.cuda.Event recorded after the copies to the host

    @property
    def n_rows(self) -> int:
        """Profile rows (tokens) of the batch."""
        return sum(s.n_rows for s in self.sequences)

    def host_columns(self) -> dict[str, torch.Tensor | None]:
        """`columns`, once their copies to the host are done (waits for them on CUDA)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self.columns


def _waves(ids: Sequence[list[int]], sampling: SamplingSettings,
           wave_tokens: int) -> Iterator[list[int]]:
    """Consecutive index groups of about `wave_tokens` prompt + new tokens each."""
    wave: list[int] = []
    tokens = 0
    for index, prompt_ids in enumerate(ids):
        wave.append(index)
        tokens += len(prompt_ids) + sampling.max_new_tokens
        if tokens >= wave_tokens:
            yield wave
            wave, tokens = [], 0
    if wave:
        yield wave
