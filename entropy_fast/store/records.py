"""The store's JSON records: run shards of both stages, and the manifest entries of parts.

A run record (`RunInfo` for profiling, `GenerationInfo` for generation) says what one
shard of a run computes (identity: model, weights fingerprint, corpus, settings) and how
far it got; its `run_id` defaults to a hash of the identity, so the same command finds
its own run again and different settings never share one. A manifest entry
(`ManifestEntry`, `GenerationEntry`) commits one part: its files, their row counts, sizes
and sha256 checksums, and the prompts it holds.

Settings are the dataclasses of `entropy_fast.settings`, nested as they are; records of
schema version 1 (flat alphas/layer_stride/settings) are read into the same classes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from entropy_fast.settings import LensSettings, SamplingSettings
from entropy_fast.store.errors import StoreError

SCHEMA_VERSION = 3
"""Version 2: settings nested per settings class, weights fingerprint, checksums.
Version 3: kl_to_final, top-token files, a vocabulary per run (store.schema), prompt
metadata (a `metadata` column of prompts parts, `metadata_fields` in manifest entries)."""
READABLE_VERSIONS = (1, 2, 3)
MARKER = "entropy-fast-store.json"
FORMAT = "entropy-fast profile store"

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def now() -> str:
    """UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tool_version() -> str:
    """The installed entropy-fast version ('unknown' from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("entropy-fast")
    except PackageNotFoundError:
        return "unknown"


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`, or StoreError naming the file and what to do."""
    try:
        payload = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{what} {path} is damaged ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'empty'})",
                         "run `entropy-fast check --repair STORE` to set it aside") from None
    if not isinstance(payload, dict):
        raise StoreError(f"{what} {path} is damaged (not a JSON object)",
                         "run `entropy-fast check --repair STORE` to set it aside")
    return payload


@dataclass(kw_only=True)
class _Record:
    """What the run records of both stages share: identity, settings and progress of one
    run shard. A stage names its identity fields in `IDENTITY`."""

    IDENTITY: ClassVar[tuple[str, ...]] = ()
    KIND: ClassVar[str] = ""

    model: str
    run_id: str = ""
    corpus: str
    corpus_sha256: str
    n_prompts: int
    sampling: SamplingSettings
    dtype: str | None
    generator: str
    quantization: str | None = None
    source: str | None = None
    weights: str | None = None
    shard: int = 0
    n_shards: int = 1
    revision: str | None = None
    status: str = "running"
    error: str | None = None
    tool_version: str = field(default_factory=tool_version)
    schema_version: int = SCHEMA_VERSION
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.n_shards:
            raise StoreError(f"shard must be in 0..{self.n_shards - 1}, got {self.shard}")
        if self.run_id and not _SAFE_ID.fullmatch(self.run_id):
            raise StoreError(f"run id {self.run_id!r} may use only letters, digits, '.', "
                             "'_' and '-' (at most 64)")
        if not self.run_id:
            self.run_id = self.identity_hash()

    def identity(self) -> dict[str, Any]:
        """The fields that define what the run computes (JSON-ready, inf-safe)."""
        ident: dict[str, Any] = {"kind": self.KIND} if self.KIND else {}
        for name in self.IDENTITY:
            value = getattr(self, name)
            ident[name] = value.identity() if hasattr(value, "identity") else value
        return ident

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
        """JSON-ready dict, settings nested."""
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """One row for the store's views: settings flattened, dicts as JSON text."""
        row: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                row.update(value.to_dict())
            else:
                row[f.name] = json.dumps(value, sort_keys=True) if isinstance(value, dict) \
                    else value
        return row

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Any:
        """Inverse of `to_json` (also reads schema-1 records); unknown keys are ignored."""
        record = _upgrade_v1(dict(record)) if "sampling" not in record else dict(record)
        record["sampling"] = SamplingSettings.from_dict(record["sampling"])
        if "lens" in record:
            record["lens"] = LensSettings.from_dict(record["lens"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})


def _upgrade_v1(record: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 record (flat alphas, layer_stride, settings dict) in schema-2 form."""
    extra = record.pop("settings", None) or {}
    record["sampling"] = {"max_new_tokens": record.pop("max_new_tokens", 0),
                          **{k: extra[k] for k in ("do_sample", "temperature", "top_p",
                                                   "top_k", "seed") if k in extra}}
    if "alphas" in record:
        record["lens"] = {"alphas": tuple(record.pop("alphas")),
                          "layer_stride": record.pop("layer_stride", 1),
                          **{k: extra[k] for k in ("top_token", "target_stats") if k in extra}}
    return record


@dataclass(kw_only=True)
class RunInfo(_Record):
    """The record of one shard of a profile run.

    `layer_indices` are hidden-state indices (`layer_numbering` "hidden_state": 0 = the
    embedding output, L = the last block), known once the model has loaded.
    """

    IDENTITY = ("model", "weights", "corpus_sha256", "lens", "sampling", "dtype",
                "generator", "quantization")

    lens: LensSettings
    layer_indices: list[int] | None = None
    layer_numbering: str = "hidden_state"
    vocab_file: str | None = None
    """The run's vocabulary (VOCAB_SCHEMA), relative to the store; None before schema 3."""
    vocab_sha256: str | None = None

    def generation_identity(self) -> GenerationInfo:
        """The generation stage whose continuations this run would profile (shard 0/1)."""
        return GenerationInfo(model=self.model, corpus=self.corpus,
                              corpus_sha256=self.corpus_sha256, n_prompts=self.n_prompts,
                              sampling=self.sampling, dtype=self.dtype,
                              generator=self.generator, quantization=self.quantization,
                              source=self.source, weights=self.weights)


@dataclass(kw_only=True)
class GenerationInfo(_Record):
    """The record of one shard of a generation stage: continuations, not entropies."""

    IDENTITY = ("model", "weights", "corpus_sha256", "sampling", "dtype", "generator",
                "quantization")
    KIND = "generation"  # in the hash only: keeps generation ids apart from profile run ids

    def __post_init__(self) -> None:
        if self.sampling.max_new_tokens < 1:
            raise StoreError("a generation stage needs max_new_tokens >= 1 (0 profiles the "
                             "text itself and generates nothing)")
        super().__post_init__()


@dataclass(frozen=True)
class _Entry:
    """What the commit records of both stages share."""

    run_id: str
    model: str
    shard: int
    n_shards: int
    seq: int
    n_prompts: int
    n_tokens: int
    prompt_ids: tuple[int, ...]
    committed_at: str
    checksums: dict[str, str] | None = None
    """sha256 of each file of the part, by relative path (None in schema-1 entries)."""
    sizes: dict[str, int] | None = None

    @property
    def files(self) -> dict[str, int]:
        """Each file of the part (relative path) and the rows it must hold."""
        raise NotImplementedError

    @property
    def shard_key(self) -> str:
        return f"s{self.shard}of{self.n_shards}"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (`dataclasses.asdict` without its deep copy of every prompt id)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Any:
        """Inverse of `dataclasses.asdict`; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        values["prompt_ids"] = tuple(values.get("prompt_ids", ()))
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class ManifestEntry(_Entry):
    """The commit record of one profile part: entropy rows and the prompts they belong to."""

    entropy_file: str
    prompts_file: str
    n_rows: int
    n_nan: int = 0
    n_inf: int = 0
    top_tokens_file: str | None = None
    """The part's top tokens (runs with top_tokens > 0 only)."""
    n_top_rows: int = 0
    metadata_fields: dict[str, str] | None = None
    """{field: SQL type} of the prompt metadata the part holds (`store.metadata`; None in
    entries before schema version 3)."""

    @property
    def files(self) -> dict[str, int]:
        files = {self.entropy_file: self.n_rows, self.prompts_file: self.n_prompts}
        if self.top_tokens_file is not None:
            files[self.top_tokens_file] = self.n_top_rows
        return files


@dataclass(frozen=True, kw_only=True)
class GenerationEntry(_Entry):
    """The commit record of one continuations part; n_tokens counts continuation tokens."""

    continuations_file: str

    @property
    def files(self) -> dict[str, int]:
        return {self.continuations_file: self.n_prompts}
