"""Scale-out on Ray Data: one call profiles a corpus over every GPU (or CPU worker) of a cluster.

`profile_corpus(..., engine="ray")` (or `engine=RayEngine(...)`) and `entropy-fast profile
--ray` come here once `pipeline.profile_corpus` has read the settings, corpus and store. The
driver (this process) joins or starts the cluster, places the actors (refusing what the
cluster cannot run), settles each run's record and reused generation stage with
`runs.plan_profile_runs` (the dtype being the workers'), then for each run:

1. drops the prompts the manifest holds, tokenizes the rest and applies the long-prompt
   policy exactly as the local engine does, before any model loads (so "fail" still stops
   before any work, and the token ids are the same);
2. registers the run shard (its lock and record, with the layers the model's config
   gives) and keeps the registration for the whole job, as a local writer does;
3. cuts the pending prompts into units of consecutive prompts (about `part_rows` rows,
   at least UNITS_PER_WORKER per worker, so that fast workers take more) and streams
   them through Ray Data (`ray_stages`): a pool of lens actors, one per GPU, each loading
   its model once (HF generation, when asked for, happens there; vLLM generation is a
   `ray.data.llm` engine stage before them), then a Datasink whose write tasks commit one
   part per unit through the store's protocol.

Exactly once: every commit takes the shard's commit lock, leaves out prompts already
committed and names its part after the prompt range it holds (`store.writer.WorkerWriter`),
so a retried task, an actor restarted after a crash or a rerun never commits a prompt twice;
the manifest stays the only commit point. The driver removes an earlier job's leftovers
under the same lock, so a straggling write can never lose a file between its rename and
its manifest entry.

This module does not import ray at import time: `import entropy_fast` and the CLI's
`--help` stay light, and a missing Ray is one line naming the extra.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from entropy_fast.corpus import Corpus
from entropy_fast.errors import ConfigError, EntropyFastError, require
from entropy_fast.settings import LensSettings, ModelSettings, SamplingSettings
from entropy_fast.store import PROFILE, GenerationInfo, RunInfo, Store
from entropy_fast.store.metadata import encode

log = logging.getLogger("entropy_fast")

UNITS_PER_WORKER = 8
"""At least this many units per worker: prompts of unequal lengths then balance out, and a
lost worker loses a small share of the work."""


@dataclass(frozen=True)
class RayEngine:
    """Where a Ray run goes and how wide.

    address: a running cluster ("auto", "HOST:PORT", "ray://HOST:10001"); None joins the
        cluster in $RAY_ADDRESS when it is set, else starts a private one on this machine
        (loopback only) for the call.
    workers: lens actors; default one per GPU of the cluster, or 1 on a cluster without
        GPUs (or with device="cpu").
    cpus_per_worker: Ray CPUs each actor holds; on CPU workers also its torch threads.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool)
                                         or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ConfigError(f"workers must be an integer >= 1, got {self.workers!r}",
                              param="workers")
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}",
                              param="cpus_per_worker")


def as_engine(engine: str | RayEngine) -> RayEngine:
    """A RayEngine from "ray" or a RayEngine, once Ray is known to be installed."""
    if engine == "ray":
        engine = RayEngine()
    if not isinstance(engine, RayEngine):
        raise ConfigError(f"engine must be 'local', 'ray' or a RayEngine, got {engine!r}",
                          param="engine")
    require("ray", "ray", "the Ray engine")
    return engine


def profile_on_ray(engine: RayEngine, models: list[Any], corpus: Corpus, store: Store,
                   lens: LensSettings, sampling: SamplingSettings, settings: ModelSettings, *,
                   shard: tuple[int, int], run_id: str | None, names: Sequence[str] | None,
                   long_prompts: str, part_rows: int, on_progress: Any = None) -> list[Any]:
    """Profile `corpus` with each model on a Ray cluster, one model after another; one
    RunResult per model. Arguments as in `pipeline.profile_corpus`, settings as objects.

    Refuses before any work: models given as objects (each worker loads its own copy), a
    store on a filesystem without locks (before a cluster starts), CUDA asked of a cluster
    without GPUs, more workers than the cluster can place.
    """
    from entropy_fast.runs import plan_profile_runs

    for model in models:
        if not isinstance(model, (str, os.PathLike)):
            raise ConfigError("the Ray engine loads each model on its workers: give the "
                              "model as a name or path, not as a loaded object",
                              param="models")
    _probe_locks(store)
    stages = 2 if settings.generator == "vllm" and sampling.generating else 1
    with ray_cluster(engine, actors_per_worker=stages) as resources:
        placement = _placement(engine, settings, resources, stages)
        # The run's identity takes the workers' dtype, spelled out: the driver may have
        # no GPU, so it cannot resolve the workers' device itself.
        spelled = dataclasses.replace(settings, device="cpu", dtype=placement.settings.dtype)
        runs = plan_profile_runs(models, corpus, store, lens, sampling, spelled, shard=shard,
                                 run_id=run_id, names=names)
        # A run that reuses a stored generation stage starts no engine: its lens actors take
        # whole GPUs, or Ray could pack two of them on one GPU and leave another idle.
        alone = _placement(engine, settings, resources, stages=1)
        return [_profile_run(placement if _has_vllm_stage(info, generation) else alone, store,
                             corpus, info, model, generation, long_prompts, part_rows,
                             on_progress)
                for info, model, generation in runs]


# -- the cluster ----------------------------------------------------------------------------


@contextmanager
def ray_cluster(engine: RayEngine, actors_per_worker: int = 1) -> Iterator[dict[str, float]]:
    """Ray initialized for the duration, as `engine` says (joined, or started on this
    machine); yields the cluster's resources. Inside it, every Ray run of this process
    uses that cluster: wrap several `profile_corpus` calls to start a private one once.
    A cluster this process had already joined is used as it is and left running.
    actors_per_worker: 2 when each worker is a lens actor and a vLLM engine (a private
    cluster then declares CPUs for both).
    """
    import ray

    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    if engine.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=engine.address, logging_level=logging.WARNING)
    else:
        # More logical CPUs than cores: the actors hold theirs for the whole job, and the
        # write tasks need slots beside them or they wait until every unit is profiled.
        workers = engine.workers or 1
        actors = workers * actors_per_worker
        cpus = (os.cpu_count() or 1) + math.ceil(actors * engine.cpus_per_worker) + 1
        ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class _Placement:
    """How many lens actors (and as many vLLM engines, when runs generate with vLLM), with
    what each holds, and the settings they load with."""

    workers: int
    gpus: float
    cpus: float
    settings: ModelSettings


def _placement(engine: RayEngine, settings: ModelSettings, resources: dict[str, float],
               stages: int) -> _Placement:
    """One worker per GPU (or `engine.workers`), or CPU workers; refuses what cannot run.
    stages: actors per worker (2: a vLLM engine shares each worker's GPU with its lens
    actor, half a GPU each)."""
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0.0)
    device = settings.device or ""
    if device.startswith("cuda") and not gpus:
        raise ConfigError(f"device={device!r} asks for GPUs but the Ray cluster has none "
                          f"({cpus:g} CPUs)", "start the cluster's GPU nodes, or give "
                          "device='cpu' to profile on CPU workers", param="device")
    on_gpu = gpus > 0 and device != "cpu"
    workers = engine.workers or (gpus if on_gpu else 1)
    if on_gpu and workers > gpus:
        raise ConfigError(f"workers={workers} but the Ray cluster has {gpus} GPU(s), one per "
                          "worker", f"ask for at most {gpus} workers", param="workers")
    if workers * stages * engine.cpus_per_worker > cpus:
        engines = " (and as many vLLM engines)" if stages > 1 else ""
        raise ConfigError(f"workers={workers}{engines} x cpus_per_worker="
                          f"{engine.cpus_per_worker:g} is more than the cluster's {cpus:g} "
                          "CPUs", param="workers")
    # Inside an actor the GPU Ray gave it is cuda:0. The device does not change a run's
    # identity, but the default dtype follows it (bfloat16 on CUDA, float32 on CPU).
    import torch

    from entropy_fast.models import resolve_dtype

    device = "cuda" if on_gpu else "cpu"
    dtype = str(resolve_dtype(settings.dtype, torch.device(device))).removeprefix("torch.")
    own = dataclasses.replace(settings, device=device, dtype=dtype)
    return _Placement(workers, 1.0 / stages if on_gpu else 0.0, engine.cpus_per_worker, own)


def _probe_locks(store: Store) -> None:
    """StoreError now, naming the filesystem, when the store cannot hold locks."""
    from entropy_fast.store.writer import FileLock

    FileLock(store.lock_path(PROFILE, "probe"), "the store's lock probe", wait=True).release()


# -- one run --------------------------------------------------------------------------------


def _profile_run(placement: _Placement, store: Store, corpus: Corpus, info: RunInfo,
                 model: Any, generation: GenerationInfo | None, long_prompts: str,
                 part_rows: int, on_progress: Any) -> Any:
    from entropy_fast.models import model_label
    from entropy_fast.runs import resume, start_run

    result, pending = start_run(store, info, generation)
    if not pending:
        return result
    source = model_label(model)  # local paths made absolute: workers have their own cwd
    layers, revision, tokens, vocab = _model_files(source, info, corpus, pending, generation,
                                                   long_prompts)
    with store.writer(info, rows_per_part=part_rows, shared=True) as writer:
        writer.register_layers(layers, revision)
        writer.store_vocabulary(vocab)
        pending = resume(writer, result)
        prompts = _pending_prompts(store, corpus, pending, tokens, generation)
        result.skipped = tuple(sorted(set(pending) - {p["prompt_id"] for p in prompts}))
        rows_per_token = len(layers) * len(info.lens.alphas)
        units = _units(prompts, info.sampling, max(1, part_rows // rows_per_token),
                       placement.workers)
        if on_progress is not None:  # the bar's clock starts with the job
            on_progress(info.model, result.done_before, 0, len(info.prompt_ids))
        start = time.perf_counter()
        try:
            result.prompts, result.tokens = _run_units(units, source, writer.info, generation,
                                                       placement, store, on_progress is not None)
        finally:
            result.seconds = time.perf_counter() - start
    if on_progress is not None:
        on_progress(info.model, result.done_before + result.prompts, result.tokens,
                    len(info.prompt_ids))
    return result


def _model_files(source: str, info: RunInfo, corpus: Corpus, pending: list[int],
                 generation: GenerationInfo | None, long_prompts: str
                 ) -> tuple[list[int], str | None, dict[int, list[int]] | None, list[str]]:
    """(layers, revision, tokens, vocabulary) from the model's tokenizer and config,
    weights unread.

    tokens: prompt_id -> token ids of the pending prompts after the long-prompt policy (as
    the local engine tokenizes them); None when a stored generation gives the ids.
    """
    from entropy_fast.models import TokenizerOnly, vocabulary
    from entropy_fast.profiler import select_layers
    from entropy_fast.runs import tokenize_pending  # the local engine's tokens and policy

    with TokenizerOnly(source) as files:
        n_blocks = files.config.get_text_config().num_hidden_layers
        layers = select_layers(n_blocks, info.lens.layer_stride)
        tokens = None if generation else tokenize_pending(files, corpus, pending, info.sampling,
                                                    long_prompts)
        text_config = files.config.get_text_config()
        return (layers, files.revision, tokens,
                vocabulary(files.tokenizer, text_config.vocab_size))


def _pending_prompts(store: Store, corpus: Corpus, pending: list[int],
                     tokens: dict[int, list[int]] | None, generation: GenerationInfo | None
                     ) -> list[dict[str, Any]]:
    """The work of each pending prompt, by prompt id: text, line, metadata (JSON text, from
    the corpus), token ids and, from a stored generation, its continuation. Prompts the
    policy skipped are left out."""
    def meta(i: int) -> str | None:
        return encode(corpus.prompts[i].metadata)

    if generation is None:
        return [{"prompt_id": i, "text": corpus.prompts[i].text,
                 "source_line": corpus.prompts[i].source_line, "metadata": meta(i),
                 "token_ids": tokens[i], "continuation": None} for i in pending if i in tokens]
    stored = [{"prompt_id": r["prompt_id"], "text": r["text"], "source_line": r["source_line"],
               "metadata": meta(r["prompt_id"]), "token_ids": r["prompt_token_ids"],
               "continuation": r["continuation_token_ids"]}
              for rows in store.read_continuations(generation.run_id, pending) for r in rows]
    return sorted(stored, key=lambda p: p["prompt_id"])


def _units(prompts: list[dict[str, Any]], sampling: SamplingSettings, max_tokens: int,
           workers: int) -> list[list[dict[str, Any]]]:
    """Consecutive prompts grouped into units of about `max_tokens` profiled tokens, and at
    least UNITS_PER_WORKER units per worker when there are prompts enough."""
    sizes = [_profiled_tokens(p, sampling) for p in prompts]
    target = max(1, min(max_tokens, math.ceil(sum(sizes) / (UNITS_PER_WORKER * workers))))
    units: list[list[dict[str, Any]]] = [[]]
    size = 0
    for prompt, n in zip(prompts, sizes, strict=True):
        if size >= target:
            units.append([])
            size = 0
        units[-1].append(prompt)
        size += n
    return [u for u in units if u]


def _profiled_tokens(prompt: dict[str, Any], sampling: SamplingSettings) -> int:
    """Rows of a prompt's profile (at most, when continuations are still to generate)."""
    if prompt["continuation"]:
        return len(prompt["continuation"])
    if prompt["continuation"] is None and sampling.generating:
        return sampling.max_new_tokens
    return len(prompt["token_ids"]) - 1


def _run_units(units: list[list[dict[str, Any]]], source: str, info: RunInfo,
               generation: GenerationInfo | None, placement: _Placement, store: Store,
               progress: bool) -> tuple[int, int]:
    """Stream the units through lens actors into the store; (prompts, tokens) committed.

    progress: show Ray Data's progress and log (else only its errors). A Ray error whose
    cause is an entropy-fast error (a bad store, other weights on a node) is raised as that
    error, so that the user reads its one line.
    """
    import ray

    from entropy_fast.ray_stages import LensWorker, StoreSink, worker_env

    env = worker_env()
    sink = StoreSink(str(store.root), info)
    try:
        with _ray_data_output(progress):  # a dataset copies the context when it is made
            dataset, per_call, lens_options = _lens_input(units, source, info, generation,
                                                          placement)
            dataset = dataset.map_batches(
                LensWorker, batch_size=per_call, batch_format="pyarrow",
                num_gpus=placement.gpus, num_cpus=placement.cpus, runtime_env=env,
                # Two units in flight per actor: the next one is at hand when a unit ends,
                # and the last units balance across the actors.
                compute=ray.data.ActorPoolStrategy(size=placement.workers,
                                                   max_tasks_in_flight_per_actor=2),
                fn_constructor_kwargs={
                    "source": source, "root": str(store.root), "info": info,
                    "settings": placement.settings, "threads": max(1, int(placement.cpus)),
                    **lens_options})
            dataset.write_datasink(sink, ray_remote_args={"runtime_env": env} if env else None)
    except Exception as err:
        cause = _user_error(err)
        if cause is None:
            raise
        raise cause from None
    return sink.prompts, sink.tokens


def _lens_input(units: list[list[dict[str, Any]]], source: str, info: RunInfo,
                generation: GenerationInfo | None, placement: _Placement
                ) -> tuple[Any, int, dict[str, Any]]:
    """(dataset, rows per lens call, the lens actors' extra options) for the units.

    Without a vLLM stage a dataset row is a unit (the actors generate with HF, or profile
    the text or a stored generation's continuations). A run that generates with vLLM gets
    one row per prompt through `ray_stages.vllm_stage`, and each lens call takes a unit's
    worth of them. from_items builds the blocks here (one per unit): no remote task runs
    before the actors start.
    """
    import ray

    from entropy_fast.ray_stages import generation_rows, unit_row, vllm_stage, worker_env

    if not _has_vllm_stage(info, generation):
        dataset = ray.data.from_items([unit_row(u) for u in units],
                                      override_num_blocks=len(units))
        return dataset, 1, {}
    from entropy_fast.models import model_source
    from entropy_fast.vllm_generation import cpu_engine_environment, hf_stop_ids

    folder = model_source(source)  # what vLLM loads (a .gguf is dequantized once, here)
    stops = hf_stop_ids(folder)
    per_call = max(1, round(sum(map(len, units)) / len(units)))
    dataset = ray.data.from_items(generation_rows(units, info.sampling, stops),
                                  override_num_blocks=len(units))
    on_gpu = placement.gpus > 0
    env = worker_env(None if on_gpu else cpu_engine_environment())
    dataset = vllm_stage(dataset, folder, placement.settings.dtype, placement.workers,
                         placement.cpus, placement.gpus, per_call, env)
    return dataset, per_call, {"stop_ids": stops}


def _has_vllm_stage(info: RunInfo, generation: GenerationInfo | None) -> bool:
    """Whether a run generates with vLLM engines on the cluster (not from a stored stage)."""
    return generation is None and info.sampling.generating and info.generator == "vllm"


@contextmanager
def _ray_data_output(progress: bool) -> Iterator[None]:
    """Ray Data's progress bars and INFO logs on, or off (errors only), for the duration."""
    import ray

    context, logger = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    saved = (context.enable_progress_bars, context.enable_operator_progress_bars, logger.level)
    context.enable_progress_bars = context.enable_operator_progress_bars = progress
    logger.setLevel(logging.INFO if progress else logging.ERROR)
    try:
        yield
    finally:
        context.enable_progress_bars, context.enable_operator_progress_bars, level = saved
        logger.setLevel(level)


def _user_error(err: BaseException) -> EntropyFastError | None:
    """The entropy-fast error that a chain of Ray errors wraps, if any."""
    from ray.exceptions import RayError

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EntropyFastError) and not isinstance(current, RayError):
            return current
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return None


__all__ = ["RayEngine", "as_engine", "profile_on_ray", "ray_cluster"]
