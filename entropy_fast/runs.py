"""One run shard's bookkeeping, the same for every engine (this process, shards, Ray).

- planning: each model's run record (identity: model label and weights fingerprint, corpus,
  settings) and the stored generation stage that serves it, before any model loads
  (`plan_profile_runs`, `reusable_generation`);
- tokenizing the pending prompts with the long-prompt policy, before any model loads
  (`tokenize_pending`);
- starting and resuming: which prompts remain, what a resumed run had done, and the record
  of a run found complete (`start_run`, `resume`, `settle_record`).

`pipeline` runs shards in this process and `distributed` on a Ray cluster; both call these.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from entropy_fast.corpus import Corpus, Prompt
from entropy_fast.errors import ConfigError
from entropy_fast.models import identify
from entropy_fast.settings import LensSettings, ModelSettings, SamplingSettings
from entropy_fast.store import GENERATION, PROFILE, GenerationInfo, RunInfo, Store, StoreError

log = logging.getLogger("entropy_fast")

LONG_PROMPTS = ("fail", "skip", "truncate_left", "truncate_right")
"""What to do with a prompt longer than the context window allows."""

@dataclass
class RunResult:
    """What one run shard of `profile_corpus` / `generate_corpus` did.

    info: its record. done_before: prompts already committed when it started (a resume).
    prompts, tokens: profiled (or generated) by this call. skipped: prompt ids left out as
    too long (with long_prompts="skip"). seconds: time spent profiling (generating),
    model loading excluded. generation: the stored generation stage it profiled, if any.
    """

    info: RunInfo | GenerationInfo
    done_before: int = 0
    prompts: int = 0
    tokens: int = 0
    skipped: tuple[int, ...] = ()
    seconds: float = 0.0
    generation: str | None = None

    @property
    def tokens_per_second(self) -> float:
        """Tokens profiled per second of profiling (0 when nothing was done)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


PlannedRun = tuple[RunInfo, Any, "GenerationInfo | None"]
"""A profile run as `plan_profile_runs` settles it: its record, its model, and the stored
generation stage whose continuations it profiles (None: it generates, or profiles text)."""


def plan_profile_runs(models: list[Any], corpus: Corpus, store: Store, lens: LensSettings,
                      sampling: SamplingSettings, settings: ModelSettings, *,
                      shard: tuple[int, int] = (0, 1), run_id: str | None = None,
                      names: Sequence[str] | None = None) -> list[PlannedRun]:
    """Each model's run record and source, before any model loads or anything is written.

    This is what an engine (this module's, or `distributed`'s on Ray) then runs; arguments
    as in `profile_corpus`, settings as objects.
    """
    infos = [RunInfo(**run_identity(model, name, corpus, sampling,
                                    own_settings(model, settings), shard),
                     lens=own_settings(model, lens), run_id=run_id or "")
             for model, name in zip(models, model_names(names, models), strict=True)]
    # Every run's source is settled before any model loads or any record is written: a
    # run that cannot start (an unfinished generation stage) leaves the store as it was.
    sources = [reusable_generation(store, info) for info in infos]
    return list(zip(infos, models, sources, strict=True))


def reusable_generation(store: Store, info: RunInfo) -> GenerationInfo | None:
    """The stored generation stage whose continuations this profile run should use.

    None when the run does not generate, has nothing pending, or no stage with its model,
    weights, corpus, sampling, dtype and generator exists. A stage that lacks some of the
    run's pending prompts is an error (finish it first) rather than a silent mix of stored
    and fresh continuations. Reads the store only: prompts committed later by another
    process only shrink what is pending, so the answer stays right.
    """
    if not info.sampling.generating:
        return None
    pending = store.pending(PROFILE, info)
    wanted = info.generation_identity()
    if not pending or all(r.run_id != wanted.run_id for r in store.generations()):
        return None
    stored = {i for e in store.entries(GENERATION, wanted.run_id) for i in e.prompt_ids}
    missing = [i for i in pending if i not in stored]
    if missing:
        raise StoreError(
            f"generation {wanted.run_id} of {info.model} in {store.root} lacks {len(missing)} "
            f"of the prompts to profile (e.g. prompt {missing[0]})",
            "run `entropy-fast generate` again with the same model, corpus and generation "
            "settings to finish it first")
    return wanted


def start_run(store: Store, info: RunInfo, generation: GenerationInfo | None
              ) -> tuple[RunResult, list[int]]:
    """The result of a run before it starts, and its pending prompts (none: it is
    complete, which is logged). Every engine starts a run this way."""
    pending = store.pending(PROFILE, info)
    result = RunResult(info, done_before=len(info.prompt_ids) - len(pending),
                       generation=generation.run_id if generation else None)
    if not pending:
        log.info("%s: run %s is complete in %s; nothing to do", info.model, info.run_id,
                 store.root)
        settle_record(store, PROFILE, info)
    return result, pending


def settle_record(store: Store, stage: Any, info: RunInfo | GenerationInfo) -> None:
    """Record as complete a shard whose prompts are all committed but whose record says
    otherwise: a kill after the last commit and before the final status left it "running".
    A shard another process holds is left to that process, which records its status."""
    record = store.record(stage, info.run_id, info.shard_key)
    if record is None or record.status == "complete":
        return
    try:
        store.writer(info).close()  # nothing pending: closing records "complete"
    except StoreError as err:
        log.info("%s: %s; it records the status itself", info.model, err.message)
        return
    log.info("%s: %s %s said %r with every prompt committed; recorded it complete",
             info.model, stage.name, info.run_id, record.status)


def resume(writer: Any, result: RunResult) -> list[int]:
    """The prompts still pending once `writer` holds the run shard (another process may
    have committed some since `start_run`), with `result.done_before` set to match and a
    log line when the run resumes."""
    info, pending = writer.info, writer.pending
    result.done_before = len(info.prompt_ids) - len(pending)
    if result.done_before:
        what = "generation" if writer.stage is GENERATION else "run"
        log.info("%s: resuming %s %s: %d of %d prompts already committed", info.model, what,
                 info.run_id, result.done_before, len(info.prompt_ids))
    return pending


def own_settings(model: Any, settings: Any) -> Any:
    """A given profiler's own settings of the kind of `settings`, else `settings`."""
    if not is_profiler(model):
        return settings
    return model.lens_settings if isinstance(settings, LensSettings) else model.model_settings


def is_profiler(model: Any) -> bool:
    """Whether `model` is an EntropyProfiler (checked by shape: importing the class would
    load torch, and tests replace it)."""
    return hasattr(model, "lens_settings") and hasattr(model, "iter_prompt_ids")


def tokenize_pending(model: Any, corpus: Corpus, pending: Sequence[int],
               sampling: SamplingSettings, long_prompts: str) -> dict[int, list[int]]:
    """prompt_id -> token ids of the pending prompts, over-long ones handled per
    `long_prompts` (all checked before any work); skipped prompts are left out."""
    limit = model.context_length
    budget = None if limit is None else limit - sampling.max_new_tokens
    minimum = 1 if sampling.generating else 2
    work: dict[int, list[int]] = {}
    tokenized = model.tokenize_many([corpus.prompts[i].text for i in pending],
                                    sampling.chat_template)
    for prompt_id, ids in zip(pending, tokenized, strict=True):
        prompt = corpus.prompts[prompt_id]
        if budget is not None and len(ids) > budget:
            if long_prompts == "fail":
                raise _too_long(corpus, prompt, len(ids), limit, sampling)
            if long_prompts == "skip":
                log.warning("skipping %s line %d: %d tokens, over the %d the context window "
                            "leaves", corpus.path, prompt.source_line, len(ids), budget)
                continue
            ids = ids[-budget:] if long_prompts == "truncate_left" else ids[:budget]
        if len(ids) < minimum:
            raise ConfigError(f"{corpus.path} line {prompt.source_line}: the prompt has "
                              f"{len(ids)} token; text mode needs at least 2 (rows are "
                              "tokens 1..T-1)", "use max_new_tokens > 0",
                              param="max_new_tokens")
        work[prompt_id] = ids
    return work


def _too_long(corpus: Corpus, prompt: Prompt, n_tokens: int, limit: int,
              sampling: SamplingSettings) -> ConfigError:
    new = f" + {sampling.max_new_tokens} new tokens" if sampling.generating else ""
    hint = ("skip or truncate over-long prompts (long_prompts='skip', 'truncate_left' or "
            "'truncate_right')")
    if sampling.generating:
        hint += ", or lower max_new_tokens"
    return ConfigError(f"{corpus.path} line {prompt.source_line} (prompt {prompt.prompt_id}) "
                       f"has {n_tokens} tokens{new}: more than the model's context window of "
                       f"{limit}", hint, param="long_prompts")


def model_names(names: Sequence[str] | None, models: list[Any]) -> list[str | None]:
    if names is None:
        return [None] * len(models)
    if len(names) != len(models):
        raise ConfigError(f"{len(names)} names for {len(models)} models", param="names")
    return list(names)


def run_identity(model: Any, name: str | None, corpus: Corpus, sampling: SamplingSettings,
              settings: ModelSettings, shard: tuple[int, int]) -> dict[str, Any]:
    """The record fields every stage shares, computed without loading the model."""
    if is_profiler(model):
        model = model._source if isinstance(model._source, str) else model.model
    identity = identify(model, name)
    return {"model": identity.label, "source": identity.source, "weights": identity.weights,
            "corpus": corpus.path, "corpus_sha256": corpus.fingerprint,
            "n_prompts": len(corpus), "sampling": sampling, "dtype": _dtype_name(settings),
            "generator": settings.generator, "quantization": settings.quantization,
            "shard": shard[0], "n_shards": shard[1]}


def _dtype_name(settings: ModelSettings) -> str:
    """The dtype the model will run in ('float32', 'bfloat16', ...)."""
    from entropy_fast.models import resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    return str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")
