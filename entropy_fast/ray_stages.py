"""The Ray Data stages of a distributed run: units in, lens actors, a Datasink into the store.

`distributed` drives them; this module imports ray and runs on the cluster's processes.

- A *unit* is one dataset row (`unit_row`): the ids, texts, lines, metadata (JSON text,
  `store.metadata`) and token ids of
  consecutive pending prompts, and their stored continuations when a generation stage is
  reused. One unit is one actor call and one committed part.
- `vllm_stage` (runs that generate with vLLM) replaces units by one row per prompt and
  sends them through a `ray.data.llm` vLLM engine stage, which adds the continuation ids;
  the lens actors then take a unit's worth of generated prompts per call.
- `LensWorker` is the map_batches actor: it checks that it sees the store and the same
  weights as the driver, loads the model once, and turns each unit into one row per device
  batch (its long-format rows, made by the local engine's host stage, as Arrow IPC bytes).
- `StoreSink` is the Datasink: each write task commits its units through
  `store.writer.WorkerWriter` (commit lock, already committed prompts left out, parts named
  by prompt range), so retried tasks never commit a prompt twice.

FAULTS is a test hook that injects failures into workers (see `_Faults`); it is never set
in production.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import BlockAccessor

from entropy_fast.corpus import Prompt
from entropy_fast.settings import ModelSettings, SamplingSettings
from entropy_fast.store import PROFILE, RunInfo, Store, StoreError
from entropy_fast.store.metadata import decode
from entropy_fast.store.schema import ENTROPY_SCHEMA, TOP_TOKENS_SCHEMA
from entropy_fast.store.writer import WorkerWriter

PROFILED_SCHEMA = pa.schema([
    ("prompt_ids", pa.list_(pa.int32())),
    ("texts", pa.list_(pa.string())),
    ("source_lines", pa.list_(pa.int32())),
    ("metadata", pa.list_(pa.string())),
    ("prompt_token_ids", pa.list_(pa.list_(pa.int32()))),
    ("n_tokens", pa.list_(pa.int32())),
    ("layers", pa.list_(pa.int16())),
    ("rows", pa.binary()),  # the batch's ENTROPY_SCHEMA rows, an Arrow IPC record batch
    ("top_rows", pa.binary()),  # its TOP_TOKENS_SCHEMA rows, the same way (or null)
])
"""What a LensWorker returns: one row per device batch, its prompts' fields as lists, its
rows as `host_stage.batch_rows` makes them (the local engine's host stage)."""

ENGINE_GPU_MEMORY = 0.45
"""Fraction of a GPU's total memory a vLLM engine of a Ray run takes: the engine shares the
GPU with a lens actor (half a GPU each, in Ray's accounting), which keeps the rest."""

FAULTS = "ENTROPY_FAST_RAY_FAULTS"
"""Test hook: a JSON object of failures to inject, each at most once per `dir`:
{"dir": PATH, "lens_exit": K, "write_exit": true, "write_raise": K}. lens_exit: an actor's
process exits at its K-th unit; write_exit: a write task's process exits after a part's
files are renamed, before its manifest entry; write_raise: there, once K parts are
committed, a write task raises. Each actor also creates `dir`/actor-PID."""


def unit_row(prompts: list[dict[str, Any]]) -> dict[str, Any]:
    """One unit (a dataset row) from the driver's pending prompts: their prompt_ids, texts,
    source_lines, metadata, token_ids, and continuations (None: generate, or profile the
    text)."""
    generated = prompts[0]["continuation"] is not None
    return {"prompt_ids": [p["prompt_id"] for p in prompts],
            "texts": [p["text"] for p in prompts],
            "source_lines": [p["source_line"] for p in prompts],
            "metadata": [p["metadata"] for p in prompts],
            "token_ids": [p["token_ids"] for p in prompts],
            "continuations": [p["continuation"] for p in prompts] if generated else None}


def worker_env(extra: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The runtime_env of the workers: `extra` variables, and the test hook when it is set."""
    variables = dict(extra or {})
    if os.environ.get(FAULTS):
        variables[FAULTS] = os.environ[FAULTS]
    return {"env_vars": variables} if variables else None


def generation_rows(units: list[list[dict[str, Any]]], sampling: SamplingSettings,
                    stop_ids: set[int]) -> list[dict[str, Any]]:
    """One row per prompt of the units, as a `ray.data.llm` vLLM stage takes it: the token
    ids and the request's sampling options (prompt p's random stream is seeded with
    seed + p), beside the prompt's id, text, line and metadata, which pass through the
    stage."""
    from entropy_fast.vllm_generation import sampling_options

    return [{"prompt_id": p["prompt_id"], "text": p["text"], "source_line": p["source_line"],
             "metadata": p["metadata"], "tokenized_prompt": p["token_ids"],
             "sampling_params": sampling_options(sampling, stop_ids, p["prompt_id"])}
            for unit in units for p in unit]


def vllm_stage(dataset: Any, source: str, dtype: str, workers: int, cpus: float, gpus: float,
               batch_size: int, env: dict[str, Any] | None) -> Any:
    """`dataset` (`generation_rows`) through `workers` vLLM engines of `ray.data.llm`, one per
    actor holding `cpus` CPUs and `gpus` GPUs (a share of the one its lens actor uses); adds
    each prompt's `generated_tokens`. Engines start as the local generator's do
    (`vllm_generation.engine_options`)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from entropy_fast.vllm_generation import engine_options

    engine = engine_options(dtype, on_cpu=not gpus)
    if gpus:
        engine["gpu_memory_utilization"] = ENGINE_GPU_MEMORY
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    config = vLLMEngineProcessorConfig(
        model_source=source, engine_kwargs=engine, placement_group_config={"bundles": [bundle]},
        concurrency=(workers, workers), batch_size=batch_size, runtime_env=env,
        tokenize_stage=False, detokenize_stage=False, chat_template_stage=False,
        log_engine_metrics=False)  # Ray's metrics need extras that ray[data] lacks
    return build_processor(config)(dataset)


class LensWorker:
    """A lens actor: the profiler of one model, built once, applied to unit after unit.

    Args:
        source: what to load (alias, hub id, absolute path); the weights must be the ones
            the driver fingerprinted (`info.weights`).
        root, info: the store and the run record the driver registered.
        settings: how to load the model (device "cuda" on a GPU actor, else "cpu").
        threads: torch threads on a CPU actor.
        stop_ids: after `vllm_stage`: the ids a continuation ends at (what is generated
            after one is dropped, as the local vLLM generator does).
    """

    def __init__(self, source: str, root: str, info: RunInfo, settings: ModelSettings,
                 threads: int, stop_ids: set[int] | None = None) -> None:
        self._faults = _Faults(actor=True)
        _check_node(source, root, info)
        import torch

        from entropy_fast.profiler import EntropyProfiler

        if settings.device == "cpu":
            torch.set_num_threads(threads)
        self.profiler = EntropyProfiler(source, lens=info.lens, settings=settings)
        if self.profiler.layer_indices != info.layer_indices:
            raise StoreError(f"{source} has layers {self.profiler.layer_indices} on this "
                             f"node; run {info.run_id} has {info.layer_indices}")
        self.sampling, self.stop_ids = info.sampling, stop_ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._faults.unit_started()
        unit = _unit(batch, self.stop_ids)
        if unit["continuations"] is None:
            batches = self.profiler.prompt_id_batches(unit["token_ids"], self.sampling)
        else:
            batches = self.profiler.token_id_batches(
                list(zip(unit["token_ids"], unit["continuations"], strict=True)))
        return pa.Table.from_pylist([self._row(unit, batch) for batch in batches],
                                    schema=PROFILED_SCHEMA)

    def _row(self, unit: dict[str, Any], batch: Any) -> dict[str, Any]:
        """One device batch of a unit (sequence k: the unit's k-th prompt) as a row."""
        from entropy_fast.host_stage import batch_rows, prompt_token_ids

        at = [s.index for s in batch.sequences]
        prompt_ids = [unit["prompt_ids"][k] for k in at]
        layers = self.profiler.layer_indices
        rows, top_rows = batch_rows(batch, prompt_ids, layers, self.profiler.alphas)
        return {"prompt_ids": prompt_ids, "texts": [unit["texts"][k] for k in at],
                "source_lines": [unit["source_lines"][k] for k in at],
                "metadata": [unit["metadata"][k] for k in at],
                "prompt_token_ids": [prompt_token_ids(s) for s in batch.sequences],
                "n_tokens": [s.n_rows for s in batch.sequences], "layers": layers,
                "rows": rows.serialize().to_pybytes(),
                "top_rows": None if top_rows is None else top_rows.serialize().to_pybytes()}


def _unit(batch: pa.Table, stop_ids: set[int] | None) -> dict[str, Any]:
    """The unit a lens call profiles: a `unit_row`, or a batch of `vllm_stage` rows."""
    if "prompt_ids" in batch.column_names:
        (unit,) = batch.to_pylist()
        return unit
    from entropy_fast.generation import _cut_at_stop

    column = batch.column
    return {"prompt_ids": column("prompt_id").to_pylist(), "texts": column("text").to_pylist(),
            "source_lines": column("source_line").to_pylist(),
            "metadata": column("metadata").to_pylist(),
            "token_ids": column("prompt_token_ids").to_pylist(),
            "continuations": [_cut_at_stop(list(ids), stop_ids)
                              for ids in column("generated_tokens").to_pylist()]}


def _check_node(source: str, root: str, info: RunInfo) -> None:
    """StoreError unless this node sees the driver's store and the same weights."""
    from entropy_fast.models import weights_fingerprint

    hint = ("put the store on a filesystem every node of the cluster mounts at the same "
            "path (NFS, Lustre, GPFS, ...)")
    try:
        store = Store(root)
    except StoreError as err:
        raise StoreError(f"a Ray worker cannot open the store: {err.message}", hint) from None
    if store.record(PROFILE, info.run_id, info.shard_key) is None:
        raise StoreError(f"a Ray worker does not see run {info.run_id} in {root}", hint)
    if info.weights is None:
        return
    found = weights_fingerprint(source)
    if found != info.weights:
        what = (f"has no local copy of {source}" if found is None
                else f"holds other weights for {source} than the driver's")
        raise StoreError(f"a Ray worker's node {what}",
                         "give every node the same model files (or put them on the shared "
                         "filesystem)")


class StoreSink(Datasink):
    """Commits the profiled prompts into the store, one part per block (one unit).

    Runs in Ray's write tasks; `prompts` and `tokens` (what the job committed) are filled
    in on the driver when the write completes.
    """

    def __init__(self, root: str, info: RunInfo) -> None:
        self.root, self.info = root, info
        self.prompts = self.tokens = 0

    def write(self, blocks: Iterable[Any], ctx: Any) -> tuple[int, int]:
        del ctx
        store, faults = Store(self.root), _Faults(store=self.root)
        prompts = tokens = 0
        for block in blocks:
            writer = WorkerWriter(store, self.info)
            writer.step_hook = faults.commit_step
            for row in BlockAccessor.for_block(block).to_arrow().to_pylist():
                rows = pa.ipc.read_record_batch(pa.py_buffer(row["rows"]), ENTROPY_SCHEMA)
                top_rows = None if row["top_rows"] is None else pa.ipc.read_record_batch(
                    pa.py_buffer(row["top_rows"]), TOP_TOKENS_SCHEMA)
                of_rows = [Prompt(i, text, line, decode(meta)) for i, text, line, meta in zip(
                    row["prompt_ids"], row["texts"], row["source_lines"], row["metadata"],
                    strict=True)]
                writer.add_batch(of_rows, rows, row["n_tokens"], row["layers"],
                                 row["prompt_token_ids"], top_rows)
            writer.commit()
            prompts += sum(e.n_prompts for e in writer.entries)
            tokens += sum(e.n_tokens for e in writer.entries)
        return prompts, tokens

    def on_write_complete(self, write_result: Any) -> None:
        self.prompts = sum(p for p, _ in write_result.write_returns)
        self.tokens = sum(t for _, t in write_result.write_returns)


class _Faults:
    """The failures FAULTS asks for, each fired once per `dir` (a marker file claims it)."""

    def __init__(self, actor: bool = False, store: str | None = None) -> None:
        spec = json.loads(os.environ.get(FAULTS) or "{}")
        self.dir = Path(spec["dir"]) if spec else None
        self.spec, self.store, self.units = spec, store, 0
        if self.dir is not None and actor:  # tests kill actors by these pids
            (self.dir / f"actor-{os.getpid()}").touch()

    def unit_started(self) -> None:
        self.units += 1
        if self.spec.get("lens_exit") == self.units and self._claim("lens_exit"):
            os._exit(1)

    def commit_step(self, step: str) -> None:
        if step != "files":
            return
        if self.spec.get("write_exit") and self._claim("write_exit"):
            os._exit(1)
        after = self.spec.get("write_raise")
        if (after is not None and len(list(Path(self.store).glob("manifest/*/*.json"))) >= after
                and self._claim("write_raise")):
            raise RuntimeError("injected fault: a write task failed")

    def _claim(self, fault: str) -> bool:
        try:
            os.close(os.open(self.dir / f"fired-{fault}", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True
