"""The profile store: a directory of Parquet files in long format, and its commit protocol.

This module owns the on-disk layout, writing profiles into it (streaming, resumable,
safe against a kill at any moment), the manifest of committed files, the run records,
and reading profiles back into `EntropyProfile` objects. Queries live in
`entropy_fast.sql`; this module never imports the profiler.

Layout (schema version 1; `docs/store.md` is the reference)::

    STORE/entropy-fast-store.json                        marker: format and schema version
    STORE/entropy/model=M/run=R/part-sIofN-000001.parquet  one row per (token, layer, alpha)
    STORE/prompts/model=M/run=R/part-sIofN-000001.parquet  one row per prompt of that part
    STORE/manifest/R/sIofN-000001.json                   the commit record of that part
    STORE/runs/R.sIofN.json                              the run record of shard I of N
    STORE/locks/R.sIofN.lock                             held (flock) while a shard is written
    STORE/continuations/model=M/run=G/part-sIofN-000001.parquet  stored continuations
    STORE/generation-manifest/G/sIofN-000001.json        the commit record of that part
    STORE/generations/G.sIofN.json                       the generation record of shard I of N
    STORE/locks/gen-G.sIofN.lock                         held while a generation shard is written

M is the model name percent-encoded (DuckDB and pyarrow decode it back), R the run id.
A part holds whole prompts. It is written under a dot-prefixed ``.tmp`` name that no
``*.parquet`` glob matches, fsynced, renamed into place, and only then recorded in the
manifest: the manifest entry is the commit. Readers list files from the manifest, so a
file renamed but not recorded (a kill between the two steps) is invisible; the next
writer of that shard deletes it and redoes its prompts.

Two stages share that machinery (`Stage`, `PartWriter`): profiling (`RunInfo`,
`RunWriter`: entropy and prompt parts) and generation (`GenerationInfo`,
`GenerationWriter`: continuation parts that `entropy-fast profile` reuses). Each stage
has its own records, manifest and locks, so each resumes on its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from entropy_fast.corpus import Prompt
from entropy_fast.profile import AggregatedProfile, EntropyProfile

SCHEMA_VERSION = 1
MARKER = "entropy-fast-store.json"
FORMAT = "entropy-fast profile store"
ROWS_PER_PART = 1 << 20
FLUSH_SECONDS = 60.0

ENTROPY_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int32()),
        ("pos", pa.int32()),
        ("token_id", pa.int32()),
        ("layer", pa.int16()),
        ("alpha", pa.float64()),
        ("entropy", pa.float32()),
        ("top_token_id", pa.int32()),
        ("target_surprisal", pa.float32()),
        ("target_rank", pa.int32()),
    ],
    metadata={"entropy_fast.schema_version": str(SCHEMA_VERSION)},
)
"""Entropy rows; model and run come from the hive folders. The last three are nullable."""

PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int32()),
        ("text", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("source", pa.string()),
        ("source_line", pa.int32()),
    ],
    metadata={"entropy_fast.schema_version": str(SCHEMA_VERSION)},
)
"""One row per profiled prompt; n_tokens is the number of profile rows (tokens)."""

CONTINUATIONS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int32()),
        ("text", pa.string()),
        ("source_line", pa.int32()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("continuation_token_ids", pa.list_(pa.int32())),
        ("continuation_text", pa.string()),
        ("generator", pa.string()),
    ],
    metadata={"entropy_fast.schema_version": str(SCHEMA_VERSION)},
)
"""One row per prompt of a generation stage; continuation_text is decoded for humans only
(profiling reads continuation_token_ids and never re-tokenizes it)."""

_KEY_COLUMNS = ["prompt_id", "pos", "token_id", "layer", "alpha"]
_OPTIONAL = {
    "top_token_id": ("top_token_ids", np.int32, torch.int64),
    "target_surprisal": ("target_surprisal", np.float32, torch.float32),
    "target_rank": ("target_rank", np.int32, torch.int64),
}
"""Nullable column -> (EntropyProfile attribute, stored dtype, dtype read back)."""

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class StoreError(ValueError):
    """A store is missing, not a store, of another version, or used inconsistently."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("entropy-fast")
    except PackageNotFoundError:
        return "unknown"


def _write_atomic(path: Path, write: Any) -> None:
    """Call write(tmp_path), fsync it, rename it to `path`: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))


@dataclass
class _Record:
    """What the run records of both stages share: the fields of one run shard (identity,
    generation settings, progress), its identity hash, shard arithmetic and JSON.

    A stage adds its own fields and names its identity fields in `IDENTITY`; they
    determine `run_id` unless one is given.
    """

    IDENTITY: ClassVar[tuple[str, ...]] = ()

    model: str
    run_id: str
    corpus: str
    corpus_sha256: str
    n_prompts: int
    max_new_tokens: int
    dtype: str | None
    generator: str
    settings: dict[str, Any] = field(default_factory=dict)
    shard: int = 0
    n_shards: int = 1
    revision: str | None = None
    status: str = "running"
    error: str | None = None
    tool_version: str = field(default_factory=_tool_version)
    schema_version: int = SCHEMA_VERSION
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)

    def identity(self) -> dict[str, Any]:
        """The fields that define what the run computes (JSON-ready)."""
        return {name: getattr(self, name) for name in self.IDENTITY}

    def identity_hash(self) -> str:
        """16 hex digits of sha256 over the identity fields."""
        canonical = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def shard_key(self) -> str:
        """'sIofN', used in file names."""
        return f"s{self.shard}of{self.n_shards}"

    @property
    def prompt_ids(self) -> range:
        """The corpus prompt ids this shard owns (prompt_id % n_shards == shard)."""
        return range(self.shard, self.n_prompts, self.n_shards)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists; inf kept as JSON's Infinity)."""
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Any:
        """Inverse of `to_json`; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})


def _check_shard(shard: int, n_shards: int, run_id: str | None) -> None:
    if not 0 <= shard < n_shards:
        raise StoreError(f"shard must be in 0..{n_shards - 1}, got {shard}")
    if run_id and not _SAFE_ID.fullmatch(run_id):
        raise StoreError(f"run id {run_id!r} may use only letters, digits, '.', '_', '-'")


@dataclass(kw_only=True)  # keyword-only: they follow the shared fields, which have defaults
class RunInfo(_Record):
    """The record of one profile run (one shard of it): identity, settings and progress.

    The identity fields (model, corpus_sha256, alphas, layer_stride, max_new_tokens,
    dtype, generator, settings) determine `run_id` unless one is given.
    """

    alphas: tuple[float, ...]
    layer_stride: int
    layer_indices: list[int] | None = None

    IDENTITY = ("model", "corpus_sha256", "alphas", "layer_stride", "max_new_tokens",
                "dtype", "generator", "settings")
    _JSON_AFTER: ClassVar[dict[str, tuple[str, ...]]] = {
        "n_prompts": ("alphas", "layer_stride"), "revision": ("layer_indices",)}
    """Where this stage's fields go among the shared ones in a record file: the key order
    the files had before the shared fields moved to `_Record`, kept byte for byte."""

    @classmethod
    def new(cls, model: str, corpus_name: str, corpus_sha256: str, n_prompts: int, *,
            alphas: Sequence[float], layer_stride: int, max_new_tokens: int,
            dtype: str | None, generator: str, settings: dict[str, Any] | None = None,
            run_id: str | None = None, shard: int = 0, n_shards: int = 1) -> RunInfo:
        """A fresh record; `run_id` defaults to a hash of the identity fields."""
        _check_shard(shard, n_shards, run_id)
        info = cls(model, run_id or "", corpus_name, corpus_sha256, n_prompts,
                   int(max_new_tokens), dtype, generator, dict(settings or {}), shard, n_shards,
                   alphas=tuple(dict.fromkeys(float(a) for a in alphas)),
                   layer_stride=int(layer_stride))
        if not run_id:
            info.run_id = info.identity_hash()
        return info

    def identity(self) -> dict[str, Any]:
        """The fields that define what the run computes (JSON-ready)."""
        ident = super().identity()
        ident["alphas"] = [repr(a) for a in self.alphas]  # inf-safe, exact
        return ident

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (alphas as a list; inf kept as JSON's Infinity)."""
        record = super().to_json()
        record["alphas"] = list(self.alphas)
        order = [name for f in fields(_Record)
                 for name in (f.name, *self._JSON_AFTER.get(f.name, ()))]
        return {**{name: record[name] for name in order}, **record}  # unplaced fields last

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RunInfo:
        """Inverse of `to_json`; unknown keys are ignored."""
        info = super().from_json(record)
        info.alphas = tuple(float(a) for a in info.alphas)
        return info


@dataclass
class GenerationInfo(_Record):
    """The record of one generation stage (one shard of it): continuations, not entropies.

    The identity fields (model, corpus_sha256, max_new_tokens, dtype, generator, settings:
    do_sample, temperature, top_p, seed) determine `run_id`, so `profile` finds the stage
    that matches its own arguments.
    """

    IDENTITY = ("kind", "model", "corpus_sha256", "max_new_tokens", "dtype", "generator",
                "settings")
    kind = "generation"  # in the hash only: keeps generation ids apart from profile run ids

    @classmethod
    def new(cls, model: str, corpus_name: str, corpus_sha256: str, n_prompts: int, *,
            max_new_tokens: int, dtype: str | None, generator: str,
            settings: dict[str, Any] | None = None, shard: int = 0,
            n_shards: int = 1) -> GenerationInfo:
        """A fresh record whose `run_id` is a hash of the identity fields."""
        _check_shard(shard, n_shards, None)
        if max_new_tokens < 1:
            raise StoreError("a generation stage needs max_new_tokens >= 1")
        info = cls(model, "", corpus_name, corpus_sha256, n_prompts, int(max_new_tokens),
                   dtype, generator, dict(settings or {}), shard, n_shards)
        info.run_id = info.identity_hash()
        return info


def _entry_from_json(cls: type[Any], record: dict[str, Any]) -> Any:
    """Read a manifest entry written by `dataclasses.asdict`."""
    record = dict(record)
    record["prompt_ids"] = tuple(record["prompt_ids"])
    return cls(**record)


@dataclass(frozen=True)
class ManifestEntry:
    """The commit record of one profile part: its files (relative to the store) and counts."""

    run_id: str
    model: str
    shard: int
    n_shards: int
    seq: int
    entropy_file: str
    prompts_file: str
    n_rows: int
    n_prompts: int
    n_tokens: int
    n_nan: int
    n_inf: int
    prompt_ids: tuple[int, ...]
    committed_at: str

    @property
    def files(self) -> dict[str, int]:
        """Each file of the part (relative path) and the rows it must hold."""
        return {self.entropy_file: self.n_rows, self.prompts_file: self.n_prompts}

    from_json = classmethod(_entry_from_json)


@dataclass(frozen=True)
class GenerationEntry:
    """The commit record of one continuations part; n_tokens counts continuation tokens."""

    run_id: str
    model: str
    shard: int
    n_shards: int
    seq: int
    continuations_file: str
    n_prompts: int
    n_tokens: int
    prompt_ids: tuple[int, ...]
    committed_at: str

    @property
    def files(self) -> dict[str, int]:
        """Each file of the part (relative path) and the rows it must hold."""
        return {self.continuations_file: self.n_prompts}

    from_json = classmethod(_entry_from_json)


@dataclass(frozen=True)
class Stage:
    """Where the runs of one stage live in a store, and what their records are."""

    name: str
    data: tuple[str, ...]
    """Top folders of its part files, one file per folder per part."""
    manifest: str
    records: str
    lock_prefix: str
    record_type: type[Any]
    entry_type: type[Any]


PROFILE = Stage("profile", ("entropy", "prompts"), "manifest", "runs", "", RunInfo,
                ManifestEntry)
GENERATION = Stage("generation", ("continuations",), "generation-manifest", "generations",
                   "gen-", GenerationInfo, GenerationEntry)


class Store:
    """A profile store directory: its marker, layout, manifest, run records and readers.

    `Store(path)` opens an existing store; `Store(path, create=True)` creates it when
    missing (an existing non-empty directory that is not a store is refused).
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(path)
        marker = self.root / MARKER
        if not marker.is_file():
            if not create:
                self._refuse_missing()
            self._create()
        self._check_marker(marker)

    def _refuse_missing(self) -> None:
        if not self.root.exists():
            raise FileNotFoundError(f"no store at {self.root}: the directory does not exist")
        raise StoreError(f"{self.root} is not an entropy-fast store (it has no {MARKER})")

    def _create(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is a file, not a store directory")
        if self.root.is_dir() and any(p.name != MARKER and not p.name.startswith(".")
                                      for p in self.root.iterdir()):
            raise StoreError(
                f"{self.root} exists, is not empty and is not an entropy-fast store; "
                "choose a new or empty directory"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
                   "created_by": f"entropy-fast {_tool_version()}", "created_at": _now()}
        tmp = self.root / f".{MARKER}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        try:
            os.link(tmp, self.root / MARKER)  # fails if another process created it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()

    def _check_marker(self, marker: Path) -> None:
        try:
            payload = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(f"{marker} is unreadable ({err}); is this a store?") from err
        if payload.get("format") != FORMAT:
            raise StoreError(f"{marker} does not describe an entropy-fast store")
        version = payload.get("schema_version")
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            hint = "upgrade entropy-fast" if newer else "re-run the profile into a new store"
            raise StoreError(
                f"{self.root} has store schema version {version}; this entropy-fast reads "
                f"version {SCHEMA_VERSION}: {hint}"
            )

    # -- layout -----------------------------------------------------------------------

    @staticmethod
    def model_folder(model: str) -> str:
        """The hive folder name of a model: 'model=' + the percent-encoded name."""
        return "model=" + quote(model, safe="")

    def stage_part_paths(self, stage: Stage, info: Any, seq: int) -> list[Path]:
        """The files of part `seq` of a run shard of `stage`, one per data folder."""
        name = f"part-{info.shard_key}-{seq:06d}.parquet"
        sub = Path(self.model_folder(info.model), f"run={info.run_id}", name)
        return [self.root / folder / sub for folder in stage.data]

    def part_paths(self, info: RunInfo, seq: int) -> tuple[Path, Path]:
        """(entropy file, prompts file) of part `seq` of a profile run shard."""
        entropy, prompts = self.stage_part_paths(PROFILE, info, seq)
        return entropy, prompts

    def record_path(self, stage: Stage, run_id: str, shard_key: str) -> Path:
        """The record file of one run shard of `stage`."""
        return self.root / stage.records / f"{run_id}.{shard_key}.json"

    def run_path(self, run_id: str, shard_key: str) -> Path:
        """The run record file of one profile run shard."""
        return self.record_path(PROFILE, run_id, shard_key)

    def manifest_dir(self, run_id: str, stage: Stage | None = None) -> Path:
        """The folder of a run's manifest entries (profile runs unless `stage` says)."""
        return self.root / (stage or PROFILE).manifest / run_id

    # -- reading ------------------------------------------------------------------------

    def entries(self, stage: Stage, run_id: str | None = None) -> list[Any]:
        """Committed parts of `stage` (of one run, or all), by run, shard and sequence."""
        pattern = f"{run_id}/*.json" if run_id else "*/*.json"
        entries = [stage.entry_type.from_json(json.loads(p.read_text()))
                   for p in (self.root / stage.manifest).glob(pattern)]
        return sorted(entries, key=lambda e: (e.run_id, e.shard, e.seq))

    def records(self, stage: Stage) -> list[Any]:
        """Every run-shard record of `stage`, ordered by model, run id and shard."""
        records = [stage.record_type.from_json(json.loads(p.read_text()))
                   for p in (self.root / stage.records).glob("*.json")]
        return sorted(records, key=lambda r: (r.model, r.run_id, r.shard))

    def record(self, stage: Stage, run_id: str, shard_key: str = "s0of1") -> Any:
        """The record of one run shard of `stage`, or None."""
        path = self.record_path(stage, run_id, shard_key)
        return stage.record_type.from_json(json.loads(path.read_text())) if path.is_file() else None

    def manifest(self, run_id: str | None = None) -> list[ManifestEntry]:
        """Committed profile parts (of one run, or all), ordered by run, shard and sequence."""
        return self.entries(PROFILE, run_id)

    def runs(self) -> list[RunInfo]:
        """Every profile run-shard record, ordered by model, run id and shard."""
        return self.records(PROFILE)

    def run(self, run_id: str, shard_key: str = "s0of1") -> RunInfo | None:
        """The record of one profile run shard, or None."""
        return self.record(PROFILE, run_id, shard_key)

    def pending(self, stage: Stage, info: Any) -> list[int]:
        """Prompt ids of a run shard of `stage` not committed yet, ascending.

        Reads the manifest only: no lock is taken and nothing is written, so a caller can
        decide whether a run can start before a writer records it.
        """
        done = {i for e in self.entries(stage, info.run_id) if e.shard == info.shard
                for i in e.prompt_ids}
        return [i for i in info.prompt_ids if i not in done]

    def generations(self) -> list[GenerationInfo]:
        """Every generation-stage shard record, ordered by model, run id and shard."""
        return self.records(GENERATION)

    def read_continuations(self, run_id: str,
                           prompt_ids: Collection[int] | None = None
                           ) -> Iterator[list[dict[str, Any]]]:
        """The committed continuation rows of a generation run, one list per part.

        Only the rows of `prompt_ids` (default: all) come back, and only parts that hold
        some of them are read; memory holds one part at a time.
        """
        wanted = None if prompt_ids is None else set(prompt_ids)
        for entry in self.entries(GENERATION, run_id):
            if wanted is not None and wanted.isdisjoint(entry.prompt_ids):
                continue
            rows = pq.read_table(self.root / entry.continuations_file).to_pylist()
            yield [r for r in rows if wanted is None or r["prompt_id"] in wanted]

    def read_profiles(self, model: str | None = None, run_id: str | None = None, *,
                      alpha: float | None = None) -> Iterator[tuple[int, EntropyProfile]]:
        """Yield (prompt_id, profile) for the committed prompts of the matching runs.

        Profiles carry every alpha of their run in `entropies`; the primary order is
        `alpha` (default: the run's first). Memory holds one part (~1M rows) at a time.
        """
        runs = {r.run_id: r for r in self.runs()
                if (model is None or r.model == model) and (run_id is None or r.run_id == run_id)}
        if not runs:
            raise StoreError(f"no run in {self.root} matches model={model!r} run_id={run_id!r}")
        for entry in self.manifest():
            if entry.run_id in runs:
                yield from _part_profiles(self.root, entry, runs[entry.run_id], alpha)

    def aggregated(self, model: str, run_id: str | None = None, *,
                   alpha: float | None = None) -> AggregatedProfile:
        """All committed profiles of a model (one run) as an AggregatedProfile, by prompt_id."""
        pairs = sorted(self.read_profiles(model, run_id, alpha=alpha), key=lambda p: p[0])
        return AggregatedProfile([p for _, p in pairs], model_name=model)

    def writer(self, info: RunInfo | GenerationInfo, **options: Any) -> PartWriter:
        """A `RunWriter` (or `GenerationWriter`) for one run shard (see there for options)."""
        kind = GenerationWriter if isinstance(info, GenerationInfo) else RunWriter
        return kind(self, info, **options)


def _part_profiles(root: Path, entry: ManifestEntry, info: RunInfo,
                   alpha: float | None) -> Iterator[tuple[int, EntropyProfile]]:
    """The profiles of one committed part."""
    rows = pq.read_table(root / entry.entropy_file).sort_by(
        [(c, "ascending") for c in ("prompt_id", "alpha", "pos", "layer")])
    prompts = pq.read_table(root / entry.prompts_file).to_pylist()
    ids = rows.column("prompt_id").to_numpy()
    starts = np.searchsorted(ids, [p["prompt_id"] for p in prompts], side="left")
    stops = np.searchsorted(ids, [p["prompt_id"] for p in prompts], side="right")
    for prompt, start, stop in zip(prompts, starts, stops, strict=True):
        block = rows.slice(start, stop - start)
        yield prompt["prompt_id"], _block_profile(block, prompt, info, alpha)


def _block_profile(block: pa.Table, prompt: dict[str, Any], info: RunInfo,
                   alpha: float | None) -> EntropyProfile:
    """Rebuild one prompt's profile from its rows, sorted by (alpha, pos, layer)."""
    n_tok, layers = prompt["n_tokens"], info.layer_indices or []
    by_value = sorted(info.alphas)
    shape = (len(by_value), n_tok, len(layers))
    values = block.column("entropy").to_numpy().reshape(shape)
    entropies = {a: torch.from_numpy(values[by_value.index(a)].copy()) for a in info.alphas}
    primary = info.alphas[0] if alpha is None else float(alpha)
    if primary not in entropies:
        raise StoreError(f"run {info.run_id} has alphas {info.alphas}, not {primary}")
    token_ids = block.column("token_id").to_numpy()[: n_tok * len(layers): len(layers) or 1]
    extra = {attr: _optional(block, column, shape, dtype)
             for column, (attr, _, dtype) in _OPTIONAL.items()}
    metadata = {"prompt": prompt["text"], "prompt_token_ids": prompt["prompt_token_ids"],
                "mode": "generation" if info.max_new_tokens > 0 else "text",
                "generator": info.generator, "max_new_tokens": info.max_new_tokens,
                "dtype": info.dtype, "layer_stride": info.layer_stride, "run_id": info.run_id,
                "source": prompt["source"], "source_line": prompt["source_line"]}
    return EntropyProfile(entropy=entropies[primary], token_ids=torch.as_tensor(token_ids.copy()),
                          layer_indices=layers, alpha=primary, model_name=info.model,
                          metadata=metadata, entropies=entropies, **extra)


def _optional(block: pa.Table, column: str, shape: tuple[int, int, int],
              dtype: torch.dtype) -> torch.Tensor | None:
    """The (n_tokens x n_layers) values of a nullable column, or None when all null."""
    col = block.column(column)
    if len(col) == 0 or col.null_count == len(col):
        return None
    values = col.to_numpy(zero_copy_only=False).reshape(shape)[0]
    return torch.from_numpy(values.copy()).to(dtype)


# -- writing ------------------------------------------------------------------------------


def profile_rows(prompt_id: int, profile: EntropyProfile,
                 alphas: Sequence[float]) -> pa.RecordBatch:
    """The long-format rows of one profile, ordered by (alpha, pos, layer).

    (n_alphas * n_tokens * n_layers) rows in ENTROPY_SCHEMA; the optional statistics,
    which do not depend on alpha, repeat for each alpha.
    """
    missing = [a for a in alphas if a not in profile.entropies]
    if missing:
        raise StoreError(f"profile of prompt {prompt_id} lacks alphas {missing}")
    n_a, (n_t, n_l) = len(alphas), profile.entropy.shape
    n = n_a * n_t * n_l
    values = np.stack([profile.entropies[a].detach().cpu().numpy() for a in alphas])
    token_ids = profile.token_ids.cpu().numpy().astype(np.int32)
    columns = {
        "prompt_id": np.full(n, prompt_id, dtype=np.int32),
        "pos": np.tile(np.repeat(np.arange(n_t, dtype=np.int32), n_l), n_a),
        "token_id": np.tile(np.repeat(token_ids, n_l), n_a),
        "layer": np.tile(np.asarray(profile.layer_indices, dtype=np.int16), n_a * n_t),
        "alpha": np.repeat(np.asarray(alphas, dtype=np.float64), n_t * n_l),
        "entropy": values.astype(np.float32).reshape(-1),
    }
    for column, (attr, dtype, _) in _OPTIONAL.items():
        extra = getattr(profile, attr)
        columns[column] = (pa.nulls(n, ENTROPY_SCHEMA.field(column).type) if extra is None
                           else np.tile(extra.detach().cpu().numpy().reshape(-1), n_a)
                           .astype(dtype))
    arrays = [c if isinstance(c := columns[f.name], pa.Array) else pa.array(c)
              for f in ENTROPY_SCHEMA]
    return pa.RecordBatch.from_arrays(arrays, schema=ENTROPY_SCHEMA)


class PartWriter:
    """Streams one run shard of a stage into a store, committing whole parts.

    Opening takes the shard's lock (another live writer of the same shard is refused),
    deletes files an earlier killed writer left uncommitted, and reads the stage's
    manifest to learn which prompts are done (`done`, `pending`). Subclasses buffer one
    row dict per prompt (`_append`); a part is committed when `rows_per_part` rows are
    buffered or `flush_seconds` have passed since the last commit, and at `close`. Used
    as a context manager, an exception commits what is buffered (all of it is valid) and
    records the run as failed.

    Args:
        store: the store.
        info: the run record (identity and settings); an existing record of the same
            run shard must have the same identity.
        rows_per_part: rows per part file (= one Parquet row group).
        flush_seconds: commit at least this often while rows arrive.
    """

    stage: Stage
    part_options: tuple[dict[str, Any], ...]
    """Parquet options of each file of a part, in the order of `stage.data`."""

    def __init__(self, store: Store, info: Any, *, rows_per_part: int = ROWS_PER_PART,
                 flush_seconds: float = FLUSH_SECONDS) -> None:
        self.store, self.info = store, info
        self.rows_per_part, self.flush_seconds = rows_per_part, flush_seconds
        self._lock = self._acquire_lock()
        self._check_compatible()
        entries = [e for e in store.entries(self.stage, info.run_id) if e.shard == info.shard]
        self.done: set[int] = {i for e in entries for i in e.prompt_ids}
        self._seq = max((e.seq for e in entries), default=0)
        self._remove_uncommitted({f for e in entries for f in e.files})
        self._reset()
        self._last_commit = time.monotonic()
        self.info.status, self.info.error, self.info.updated_at = "running", None, _now()
        self._write_record()

    def _acquire_lock(self) -> int:
        info = self.info
        name = f"{self.stage.lock_prefix}{info.run_id}.{info.shard_key}.lock"
        path = self.store.root / "locks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"{self.stage.name} run {info.run_id} shard {info.shard_key} of {info.model} "
                "is being written by another process; wait for it or stop it first"
            ) from None
        return fd

    def _check_compatible(self) -> None:
        info = self.info
        old = self.store.record(self.stage, info.run_id, info.shard_key)
        if old is not None:
            if old.identity() != info.identity():
                raise StoreError(
                    f"run {info.run_id} already exists in {self.store.root} with other "
                    "settings; drop --run-id (run ids then follow the settings) or pick another"
                )
            info.created_at, info.revision = old.created_at, info.revision or old.revision
            self._merge(old)
        others = {r.n_shards for r in self.store.records(self.stage) if r.run_id == info.run_id}
        if others - {info.n_shards}:
            raise StoreError(f"run {info.run_id} was written with {sorted(others)} shards, "
                             f"not {info.n_shards}; use the same --shard I/N")

    def _merge(self, old: Any) -> None:
        """Take over what an earlier writer of this shard learned (hook)."""

    def _remove_uncommitted(self, committed: set[str]) -> None:
        """Delete this shard's temp files and parts renamed but never recorded."""
        key, root, run_id = self.info.shard_key, self.store.root, self.info.run_id
        folders = [p.parent for p in self.store.stage_part_paths(self.stage, self.info, 0)]
        leftovers = [*(p for folder in folders for p in folder.glob(f"*part-{key}-*")),
                     *self.store.manifest_dir(run_id, self.stage).glob(f".{key}-*.tmp"),
                     *(root / self.stage.records).glob(f".{run_id}.{key}.json.*.tmp")]
        for path in leftovers:
            if str(path.relative_to(root)) not in committed:
                path.unlink()

    @property
    def pending(self) -> list[int]:
        """Prompt ids of this shard not committed yet, ascending."""
        return [i for i in self.info.prompt_ids if i not in self.done]

    def _check_new(self, prompt_id: int) -> None:
        if prompt_id in self.done:
            raise StoreError(f"prompt {prompt_id} is already committed in run "
                             f"{self.info.run_id}")

    def _append(self, row: dict[str, Any], n_rows: int) -> None:
        """Buffer one prompt's row (and `n_rows` data rows); commit at a threshold."""
        self._prompts.append(row)
        self._n_rows += n_rows
        if (self._n_rows >= self.rows_per_part
                or time.monotonic() - self._last_commit >= self.flush_seconds):
            self.commit()

    def _reset(self) -> None:
        """Empty the buffers after a commit (subclasses clear theirs too)."""
        self._prompts: list[dict[str, Any]] = []
        self._n_rows = 0

    def _record_state(self) -> tuple[Any, ...]:
        """What readers need in the run record before the first part (hook)."""
        return (self.info.revision,)

    def _tables(self) -> list[pa.Table]:
        """The buffered rows as one table per file of a part, as `stage.data` (hook)."""
        raise NotImplementedError

    def _entry(self, files: list[str], tables: list[pa.Table], ids: list[int]) -> Any:
        """The manifest entry of a part (hook)."""
        raise NotImplementedError

    def commit(self) -> None:
        """Write the buffered prompts as one part and record it in the manifest."""
        if not self._prompts:
            return
        if self._recorded != self._record_state():
            self._write_record()  # readers need e.g. the layers before the first part
        self._seq += 1
        paths = self.store.stage_part_paths(self.stage, self.info, self._seq)
        tables = self._tables()
        for path, table, options in zip(paths, tables, self.part_options, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, lambda tmp, t=table, o=options: pq.write_table(
                t, tmp, row_group_size=max(t.num_rows, 1), **o))
        ids = sorted(p["prompt_id"] for p in self._prompts)
        entry = self._entry([str(p.relative_to(self.store.root)) for p in paths], tables, ids)
        folder = self.store.manifest_dir(self.info.run_id, self.stage)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(folder / f"{self.info.shard_key}-{self._seq:06d}.json",
                           asdict(entry))
        self.done.update(ids)
        self._reset()
        self._last_commit = time.monotonic()

    def _write_record(self) -> None:
        self._recorded = self._record_state()
        self.info.updated_at = _now()
        path = self.store.record_path(self.stage, self.info.run_id, self.info.shard_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, self.info.to_json())

    def close(self, error: str | None = None) -> None:
        """Commit what is buffered, record the final status and release the lock."""
        if self._lock < 0:
            return
        try:
            self.commit()
            complete = error is None and not self.pending
            self.info.status = "complete" if complete else ("failed" if error else "incomplete")
            self.info.error = error
            self._write_record()
        finally:
            os.close(self._lock)
            self._lock = -1

    def __enter__(self) -> Any:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 _tb: object) -> None:
        self.close(None if err is None else f"{kind.__name__}: {err}")


_ENTROPY_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": [*_KEY_COLUMNS, "top_token_id"],
    "use_byte_stream_split": ["entropy", "target_surprisal"],
}
"""Parquet options of entropy parts: zstd, dictionary keys, byte-stream-split floats."""


class RunWriter(PartWriter):
    """Streams the profiles of one profile run shard into a store (see `PartWriter`)."""

    stage = PROFILE
    part_options = (_ENTROPY_OPTIONS, {"compression": "zstd"})
    info: RunInfo

    def _merge(self, old: RunInfo) -> None:
        self.info.layer_indices = self.info.layer_indices or old.layer_indices

    def _reset(self) -> None:
        super()._reset()
        self._batches: list[pa.RecordBatch] = []

    def _record_state(self) -> tuple[Any, ...]:
        return (self.info.layer_indices, self.info.revision)

    def add(self, prompt: Prompt, profile: EntropyProfile) -> None:
        """Buffer one prompt's profile; commits a part when a threshold is reached."""
        self._check_new(prompt.prompt_id)
        layers = list(profile.layer_indices)
        if self.info.layer_indices is None:
            self.info.layer_indices = layers
        elif layers != self.info.layer_indices:
            raise StoreError(f"profile of prompt {prompt.prompt_id} has layers {layers}, the "
                             f"run has {self.info.layer_indices}")
        batch = profile_rows(prompt.prompt_id, profile, self.info.alphas)
        self._batches.append(batch)
        self._append({
            "prompt_id": prompt.prompt_id, "text": prompt.text,
            "prompt_token_ids": list(profile.metadata.get("prompt_token_ids") or []),
            "n_tokens": profile.n_tokens, "source": self.info.corpus,
            "source_line": prompt.source_line}, batch.num_rows)

    def _tables(self) -> list[pa.Table]:
        return [pa.Table.from_batches(self._batches, schema=ENTROPY_SCHEMA),
                pa.Table.from_pylist(self._prompts, schema=PROMPTS_SCHEMA)]

    def _entry(self, files: list[str], tables: list[pa.Table], ids: list[int]) -> ManifestEntry:
        rows, info = tables[0], self.info
        values = rows.column("entropy").to_numpy()
        return ManifestEntry(
            info.run_id, info.model, info.shard, info.n_shards, self._seq, files[0], files[1],
            rows.num_rows, len(ids), sum(p["n_tokens"] for p in self._prompts),
            int(np.isnan(values).sum()), int(np.isinf(values).sum()), tuple(ids), _now())


class GenerationWriter(PartWriter):
    """Streams the continuations of one generation shard into a store (see `PartWriter`).

    A row is a prompt; the CLI commits one part per generate call (`commit()`).
    """

    stage = GENERATION
    part_options = ({"compression": "zstd"},)
    info: GenerationInfo

    def add(self, prompt: Prompt, prompt_token_ids: Sequence[int],
            continuation_token_ids: Sequence[int], continuation_text: str) -> None:
        """Buffer one prompt's continuation; commits a part when a threshold is reached."""
        self._check_new(prompt.prompt_id)
        self._append({
            "prompt_id": prompt.prompt_id, "text": prompt.text,
            "source_line": prompt.source_line,
            "prompt_token_ids": [int(t) for t in prompt_token_ids],
            "continuation_token_ids": [int(t) for t in continuation_token_ids],
            "continuation_text": continuation_text, "generator": self.info.generator}, 1)

    def _tables(self) -> list[pa.Table]:
        return [pa.Table.from_pylist(self._prompts, schema=CONTINUATIONS_SCHEMA)]

    def _entry(self, files: list[str], tables: list[pa.Table],
               ids: list[int]) -> GenerationEntry:
        info = self.info
        n_tokens = sum(len(p["continuation_token_ids"]) for p in self._prompts)
        return GenerationEntry(info.run_id, info.model, info.shard, info.n_shards, self._seq,
                               files[0], len(ids), n_tokens, tuple(ids), _now())
