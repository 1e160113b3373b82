"""Corpus runs into a store: resumable, sharded, several models, exactly once.

`profile_corpus` profiles a corpus with one or more models into a profile store;
`generate_corpus` stores continuations (a generation stage) that a later
`profile_corpus` with the same model, corpus and sampling profiles instead of generating.
Both are what `entropy-fast profile` / `generate` run, and what a scheduler (SLURM, Ray)
calls per shard; `engine="ray"` hands the same runs to `distributed`. Each run shard
(steps 1-3 are `runs`', the same for every engine):

1. settles its record (identity: model label and weights fingerprint, corpus, settings)
   and whether a stored generation stage serves it, before any model loads;
2. tokenizes its pending prompts with the model's tokenizer and checks their lengths
   against the context window (fail, skip or truncate), before any model loads;
3. takes the shard's lock and registers in the store, then loads the model;
4. profiles in waves sized to about half of `flush_seconds` each, the device's batches
   handed to a background writer stage (`host_stage`) that turns each into rows and
   commits a part at the end of a wave when half of `flush_seconds` has passed (up to
   `PART_ENCODERS` parts are encoded at once): a kill loses at most `flush_seconds` of
   work, and a rerun resumes where the manifest says.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from entropy_fast.corpus import Corpus, read_corpus
from entropy_fast.errors import ConfigError
from entropy_fast.host_stage import WriterStage
from entropy_fast.runs import (
    LONG_PROMPTS,
    RunResult,
    is_profiler,
    model_names,
    plan_profile_runs,
    resume,
    run_identity,
    settle_record,
    start_run,
    tokenize_pending,
)
from entropy_fast.settings import LensSettings, ModelSettings, SamplingSettings, split_options
from entropy_fast.store import GENERATION, GenerationInfo, RunInfo, Store

log = logging.getLogger("entropy_fast")

PART_ENCODERS = 2
"""Parts a store run's writer encodes at once: Parquet encoding, the host's largest cost per
row, releases the GIL, so a second part encodes on another core while the first is written
(bench/RESULTS.md, "Host side of a store run")."""

Progress = Callable[[str, int, int, int], None]
"""on_progress(label, prompts done, tokens done, prompts in all), called once as a run starts
and then per batch. Prompts count the whole run shard (those a resumed run found committed
included), tokens only what this call profiled."""


def as_corpus(corpus: Corpus | str | Path | Sequence[str] | None, **read_options: Any
              ) -> Corpus:
    """A Corpus from a Corpus, a file path, a list of texts, or None (the bundled sample)."""
    if isinstance(corpus, Corpus):
        return corpus
    if corpus is None:
        from entropy_fast.data import sample_corpus_path

        corpus = sample_corpus_path()
    if isinstance(corpus, (str, Path)):
        return read_corpus(corpus, **read_options)
    return Corpus.from_texts(list(corpus))


def profile_corpus(models: Any | Sequence[Any], corpus: Corpus | str | Path | Sequence[str]
                   | None, store: Store | str | Path, *, lens: LensSettings | None = None,
                   sampling: SamplingSettings | None = None,
                   settings: ModelSettings | None = None, shard: tuple[int, int] = (0, 1),
                   run_id: str | None = None, names: Sequence[str] | None = None,
                   long_prompts: str = "fail", part_rows: int = 1 << 20,
                   flush_seconds: float = 60.0, on_progress: Progress | None = None,
                   engine: Any = "local", **options: Any) -> list[RunResult]:
    """Profile `corpus` with each of `models` into `store`; returns one RunResult per model.

    Args:
        models: one model or several: alias, folder, .gguf file, hub id, or an
            EntropyProfiler (used as it is; its settings are the run's).
        corpus: a Corpus, a corpus file, a list of texts, or None for the bundled sample.
        store: a Store or a folder (created if missing).
        lens, sampling, settings: LensSettings, SamplingSettings, ModelSettings; or give
            their fields as keyword options (alpha=..., max_new_tokens=..., dtype=...).
        shard: (I, N): only prompts with prompt_id % N == I.
        run_id: a fixed run id (default: a hash of model, weights, corpus and settings).
        names: labels to file the models under (default: alias, hub id or absolute path).
        long_prompts: over-long prompts: "fail" (before any work), "skip",
            "truncate_left" (keep their end) or "truncate_right" (keep their start).
        part_rows, flush_seconds: commit a part at this many rows, and at least this often.
        on_progress: called as batches finish (see `Progress`).
        engine: "local" (this process), or "ray" / a `distributed.RayEngine` to run on the
            GPUs of a Ray cluster (`pip install 'entropy-fast[ray]'`; see docs/scale-out.md).

    A run whose prompts are all committed is not redone; an interrupted one resumes. Runs
    that generate reuse a matching stored generation stage (see `generate_corpus`).
    """
    ray_engine = None if engine == "local" else _ray_engine(engine)
    lens, sampling, settings = _settings(lens, sampling, settings, options)
    models = _as_list(models)
    corpus = as_corpus(corpus)
    _check_long_prompts(long_prompts)
    _check_generator(settings)
    store = store if isinstance(store, Store) else Store(store, create=True)
    if ray_engine is not None:
        from entropy_fast.distributed import profile_on_ray

        return profile_on_ray(ray_engine, models, corpus, store, lens, sampling, settings,
                              shard=shard, run_id=run_id, names=names,
                              long_prompts=long_prompts, part_rows=part_rows,
                              on_progress=on_progress)
    runs = plan_profile_runs(models, corpus, store, lens, sampling, settings, shard=shard,
                             run_id=run_id, names=names)
    return [_profile_run(store, info, model, corpus, generation, settings, long_prompts,
                         part_rows, flush_seconds, on_progress)
            for info, model, generation in runs]


def generate_corpus(models: Any | Sequence[Any], corpus: Corpus | str | Path | Sequence[str]
                    | None, store: Store | str | Path, *,
                    sampling: SamplingSettings | None = None,
                    settings: ModelSettings | None = None, shard: tuple[int, int] = (0, 1),
                    names: Sequence[str] | None = None, long_prompts: str = "fail",
                    part_prompts: int = 1024, on_progress: Progress | None = None,
                    generator_options: dict | None = None, **options: Any) -> list[RunResult]:
    """Generate continuations of `corpus` with each model and store them (a generation
    stage); `profile_corpus` with the same model, corpus, sampling, dtype and generator
    then profiles them. Arguments as in `profile_corpus`; `part_prompts` prompts are
    generated per call and committed per part."""
    _, sampling, settings = _settings(None, sampling, settings, options)
    if not sampling.generating:
        raise ConfigError("a generation stage needs max_new_tokens >= 1",
                          "max_new_tokens=0 profiles the text itself: use profile_corpus",
                          param="max_new_tokens")
    if part_prompts < 1:
        raise ConfigError(f"part_prompts must be >= 1, got {part_prompts}",
                          param="part_prompts")
    models = _as_list(models)
    corpus = as_corpus(corpus)
    _check_long_prompts(long_prompts)
    _check_generator(settings)
    store = store if isinstance(store, Store) else Store(store, create=True)
    infos = [GenerationInfo(**run_identity(model, name, corpus, sampling, settings, shard))
             for model, name in zip(models, model_names(names, models), strict=True)]
    return [_generate_run(store, info, model, corpus, settings, long_prompts, part_prompts,
                          on_progress, generator_options or {})
            for info, model in zip(infos, models, strict=True)]


# -- one profile run ----------------------------------------------------------------------


def _profile_run(store: Store, info: RunInfo, model: Any, corpus: Corpus,
                 generation: GenerationInfo | None, settings: ModelSettings,
                 long_prompts: str, part_rows: int, flush_seconds: float,
                 on_progress: Progress | None) -> RunResult:
    result, pending = start_run(store, info, generation)
    if not pending:
        return result
    work = None
    if generation is None:  # over-long prompts are found before anything heavy loads
        with _tokenizer(model) as tokenizer:
            work = tokenize_pending(tokenizer, corpus, pending, info.sampling, long_prompts)
    with store.writer(info, rows_per_part=part_rows, flush_seconds=flush_seconds,
                      encoders=PART_ENCODERS) as writer:
        pending = resume(writer, result)
        with _profiler(model, info.lens, settings) as profiler, \
                WriterStage(writer, corpus.prompts.__getitem__, profiler.layer_indices,
                            info.lens.alphas) as stage:
            writer.info.revision = getattr(profiler.model.config, "_commit_hash", None)
            from entropy_fast.models import vocabulary

            writer.store_vocabulary(vocabulary(profiler.tokenizer, profiler.lens.vocab_size))
            tick = _ticker(result, on_progress)
            if work is not None:
                result.skipped = tuple(i for i in pending if i not in work)
                work = {i: work[i] for i in pending if i in work}
                stream = _profile_waves(profiler, work, info.sampling, flush_seconds,
                                        stage.commit, tick)
            else:
                log.info("%s: profiling the continuations of generation %s", info.model,
                         generation.run_id)
                stream = _stored_batches(store, profiler, generation, pending, tick)
            _write_batches(stream, stage, result)
    return result


@contextmanager
def _tokenizer(model: Any) -> Iterator[Any]:
    """Something with tokenize_many() and context_length: a given profiler, or the model's
    tokenizer and config alone."""
    if is_profiler(model):
        yield model
        return
    from entropy_fast.models import TokenizerOnly

    with TokenizerOnly(model) as tokenizer:
        yield tokenizer


@contextmanager
def _profiler(model: Any, lens: LensSettings, settings: ModelSettings) -> Iterator[Any]:
    """A profiler of `model` with these settings: a given one as it is (it must match),
    or one loaded now and unloaded afterwards."""
    if is_profiler(model):
        if model.lens_settings != lens:
            raise ConfigError("the given EntropyProfiler profiles with other lens settings "
                              f"({model.lens_settings}) than the run ({lens})")
        yield model
        return
    from entropy_fast.profiler import EntropyProfiler  # torch loads here, not at import

    with EntropyProfiler(model, lens=lens, settings=settings) as profiler:
        yield profiler


def _ticker(result: RunResult, on_progress: Progress | None) -> Callable[[int, int], None]:
    """The profiler's per-batch callback (prompts, tokens of a batch) as `on_progress`
    events of the run; the first event (nothing profiled yet) is sent now, so that a
    bar's clock starts with the run, not after its first batch."""
    info, profiled = result.info, [result.done_before, 0]

    def tick(prompts: int, tokens: int) -> None:
        profiled[0] += prompts
        profiled[1] += tokens
        if on_progress is not None:
            on_progress(info.model, profiled[0], profiled[1], len(info.prompt_ids))

    tick(0, 0)
    return tick


Batches = Iterator[tuple[Any, list[int]]]
"""(profiler.ProfiledBatch, the prompt id of each of its sequences), as the device stage
hands them over."""


def _write_batches(stream: Batches, stage: WriterStage, result: RunResult) -> None:
    """Hand every batch to the writer stage, counting what was profiled."""
    start = time.perf_counter()
    try:
        for batch, prompt_ids in stream:
            stage.put(batch, prompt_ids)
            result.prompts += len(prompt_ids)
            result.tokens += batch.n_rows
        stage.close()  # the time includes writing the last batches
    finally:
        result.seconds = time.perf_counter() - start


def _profile_waves(profiler: Any, work: dict[int, list[int]], sampling: SamplingSettings,
                   flush_seconds: float, commit: Callable[[], None],
                   tick: Callable[[int, int], None]) -> Batches:
    """The batches of `work` (prompt_id -> token ids), wave by wave.

    Waves are sized to take about half of `flush_seconds` at the rate measured so far
    (the first has one prompt; each may grow 4x), and a part is committed at the end of a
    wave once half of `flush_seconds` has passed since the last commit.
    """
    ids = list(work)
    target = flush_seconds / 2
    size, position, last_commit = 1, 0, time.monotonic()
    while position < len(ids):
        wave = ids[position:position + size]
        position += len(wave)
        started = time.monotonic()
        for batch in profiler.prompt_id_batches([work[i] for i in wave], sampling, wave,
                                                on_progress=tick):
            yield batch, [s.index for s in batch.sequences]
        elapsed = max(time.monotonic() - started, 1e-3)
        if time.monotonic() - last_commit >= target:
            commit()
            last_commit = time.monotonic()
        size = max(1, min(4 * size, math.floor(len(wave) * target / elapsed)))


def _stored_batches(store: Store, profiler: Any, generation: GenerationInfo,
                    pending: list[int], tick: Callable[[int, int], None]) -> Batches:
    """The batches of stored continuations, one committed generation part at a time."""
    for rows in store.read_continuations(generation.run_id, pending):
        pairs = [(r["prompt_token_ids"], r["continuation_token_ids"]) for r in rows]
        for batch in profiler.token_id_batches(pairs, on_progress=tick):
            yield batch, [rows[s.index]["prompt_id"] for s in batch.sequences]


# -- one generation run -------------------------------------------------------------------


def _generate_run(store: Store, info: GenerationInfo, model: Any, corpus: Corpus,
                  settings: ModelSettings, long_prompts: str, part_prompts: int,
                  on_progress: Progress | None, generator_options: dict) -> RunResult:
    pending = store.pending(GENERATION, info)
    result = RunResult(info, done_before=len(info.prompt_ids) - len(pending))
    if not pending:
        log.info("%s: generation %s is complete in %s; nothing to do", info.model,
                 info.run_id, store.root)
        settle_record(store, GENERATION, info)
        return result
    with _tokenizer(model) as tokenizer:
        work = tokenize_pending(tokenizer, corpus, pending, info.sampling, long_prompts)
    with store.writer(info, rows_per_part=part_prompts, flush_seconds=math.inf) as writer, \
            _load_generation(model, info, settings, generator_options) as loaded:
        pending = resume(writer, result)
        writer.info.revision = loaded.revision
        result.skipped = tuple(i for i in pending if i not in work)
        work = {i: work[i] for i in pending if i in work}
        ids = list(work)
        tick = _ticker(result, on_progress)
        start = time.perf_counter()
        for first in range(0, len(ids), part_prompts):
            chunk = ids[first:first + part_prompts]
            continuations = loaded.generator.generate([work[i] for i in chunk], info.sampling)
            for prompt_id, new in zip(chunk, continuations, strict=True):
                writer.add(corpus.prompts[prompt_id], work[prompt_id], new,
                           loaded.tokenizer.decode(new))
                result.tokens += len(new)
            writer.commit()
            result.prompts += len(chunk)
            tick(len(chunk), sum(len(work[i]) for i in chunk))
        result.seconds = time.perf_counter() - start
    return result


def _load_generation(model: Any, info: GenerationInfo, settings: ModelSettings,
                     generator_options: dict) -> Any:
    """What generation runs on: the HF profiler, or for vLLM only its tokenizer, config and
    engine (a vLLM engine loads the weights itself; an HF copy as well would take memory
    that the engine's KV cache needs)."""
    if info.generator != "vllm":
        from entropy_fast.profiler import EntropyProfiler

        return _HFGeneration(EntropyProfiler(model, settings=settings))
    from entropy_fast.vllm_generation import VllmGenerationModel

    return VllmGenerationModel(info.source or info.model, dtype=info.dtype or "auto",
                               **generator_options)


class _HFGeneration:
    """An EntropyProfiler seen as what `_generate_run` needs (tokenizer, generator, ...)."""

    def __init__(self, profiler: Any) -> None:
        self.profiler = profiler
        self.tokenizer = profiler.tokenizer
        self.generator = profiler.generator
        self.context_length = profiler.context_length
        self.revision = getattr(profiler.model.config, "_commit_hash", None)

    def tokenize_many(self, texts: Sequence[str], chat_template: bool = False
                      ) -> list[list[int]]:
        return self.profiler.tokenize_many(texts, chat_template)

    def __enter__(self) -> _HFGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.profiler.unload()


# -- shared steps -------------------------------------------------------------------------


def _settings(lens: LensSettings | None, sampling: SamplingSettings | None,
              settings: ModelSettings | None, options: dict[str, Any]
              ) -> tuple[LensSettings, SamplingSettings, ModelSettings]:
    parsed = split_options(options, (LensSettings, SamplingSettings, ModelSettings))
    given = (lens, sampling, settings)
    for mine, theirs in zip(given, parsed, strict=True):
        if mine is not None and theirs != type(theirs)():
            raise TypeError("give settings as settings objects or as keyword options, "
                            "not both")
    return tuple(g or p for g, p in zip(given, parsed, strict=True))


def _check_generator(settings: ModelSettings) -> None:
    """Fail before any model loads when the chosen generator is not installed."""
    if settings.generator == "vllm":
        from entropy_fast.vllm_generation import require_vllm

        require_vllm()


def _ray_engine(engine: Any) -> Any:
    """The RayEngine of engine="ray" or a RayEngine (Ray must be installed)."""
    from entropy_fast.distributed import as_engine

    return as_engine(engine)


def _check_long_prompts(long_prompts: str) -> None:
    if long_prompts not in LONG_PROMPTS:
        raise ConfigError(f"long_prompts must be one of {LONG_PROMPTS}, got {long_prompts!r}",
                          param="long_prompts")


def _as_list(models: Any) -> list[Any]:
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not models:
        raise ConfigError("no models given", "name at least one model")
    for model in models:
        if hasattr(model, "parameters") and not is_profiler(model):
            raise ConfigError("a corpus run takes model names or paths, or EntropyProfiler "
                              "objects, not a bare model object",
                              "wrap it: EntropyProfiler(model, tokenizer=tokenizer)")
    return models


