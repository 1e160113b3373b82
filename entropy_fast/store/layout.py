"""The store's folder: marker, where each file of each stage lives, and reading records.

Layout (schema version 3; docs/store.md is the reference)::

    STORE/entropy-fast-store.json                          marker: format and schema version
    STORE/entropy/model=M/run=R/part-sIofN-000001.parquet  one row per (token, layer, alpha)
    STORE/prompts/model=M/run=R/part-sIofN-000001.parquet  one row per prompt of that part
    STORE/manifest/R/sIofN-000001.json                     the commit record of that part
    STORE/runs/R.sIofN.json                                the run record of shard I of N
    STORE/continuations/model=M/run=G/part-sIofN-000001.parquet   stored continuations
    STORE/generation-manifest/G/sIofN-000001.json          the commit record of that part
    STORE/generations/G.sIofN.json                         the generation record of shard I of N
    STORE/locks/...                                        flock files of live writers
    STORE/quarantine/...                                   what `check --repair` set aside

M is the model name percent-encoded, R the run id. Folder names are for people: readers
take model and run from the manifest, never from paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from entropy_fast.store.errors import StoreError
from entropy_fast.store.records import (
    FORMAT,
    MARKER,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    GenerationEntry,
    GenerationInfo,
    ManifestEntry,
    RunInfo,
    now,
    read_json,
    tool_version,
)

Damaged = Callable[[Path, StoreError], None]
"""Called with a damaged record or entry file and its error, when the caller tolerates it."""


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


PROFILE = Stage("profile", ("entropy", "prompts", "top_tokens"), "manifest", "runs", "", RunInfo,
                ManifestEntry)
GENERATION = Stage("generation", ("continuations",), "generation-manifest", "generations",
                   "gen-", GenerationInfo, GenerationEntry)
STAGES = (PROFILE, GENERATION)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp_path), fsync it, rename it to `path`: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """`payload` as JSON at `path`, atomically (see write_atomic)."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Store:
    """A profile store directory: its marker, layout, manifest and run records.

    `Store(path)` opens an existing store; `Store(path, create=True)` creates it when
    missing (an existing non-empty directory that is not a store is refused).
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(path).expanduser()
        marker = self.root / MARKER
        if not marker.is_file():
            if not create:
                self._refuse_missing()
            self._create()
        self.version = self._check_marker(marker)

    def _refuse_missing(self) -> None:
        if not self.root.exists():
            raise StoreError(f"no store at {self.root}: the directory does not exist")
        raise StoreError(f"{self.root} is not an entropy-fast store (it has no {MARKER})")

    def _create(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is a file, not a store directory")
        if self.root.is_dir() and any(p.name != MARKER and not p.name.startswith(".")
                                      for p in self.root.iterdir()):
            raise StoreError(f"{self.root} exists, is not empty and is not an entropy-fast "
                             "store", "choose a new or empty directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{MARKER}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(self._marker_payload(), indent=1))
        except OSError as err:
            raise StoreError(f"cannot create a store at {self.root}: {err.strerror}",
                             "choose a folder you can write to") from None
        try:
            os.link(tmp, self.root / MARKER)  # fails if another process created it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()

    @staticmethod
    def _marker_payload() -> dict[str, Any]:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION,
                "created_by": f"entropy-fast {tool_version()}", "created_at": now()}

    def _check_marker(self, marker: Path) -> int:
        payload = read_json(marker, "store marker")
        if payload.get("format") != FORMAT:
            raise StoreError(f"{marker} does not describe an entropy-fast store")
        version = payload.get("schema_version")
        if version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise StoreError(
                f"{self.root} has store schema version {version}; this entropy-fast reads "
                f"versions {READABLE_VERSIONS}",
                "upgrade entropy-fast" if newer else "profile again into a new store")
        return version

    def upgrade_marker(self) -> None:
        """Mark an older store as the current version before writing current records
        into it (older records and parts stay readable)."""
        if self.version != SCHEMA_VERSION:
            write_json_atomic(self.root / MARKER, self._marker_payload())
            self.version = SCHEMA_VERSION

    # -- layout -----------------------------------------------------------------------

    @staticmethod
    def model_folder(model: str) -> str:
        """The folder name of a model: 'model=' + the percent-encoded name."""
        return "model=" + quote(model, safe="")

    def part_paths(self, stage: Stage, info: Any, seq: int | str) -> list[Path]:
        """The files of part `seq` of a run shard of `stage`, one per data folder.

        `seq` is a sequence number (`000001`) or a part's name (`p000000012-000000345`, the
        prompt range of a part a distributed worker commits).
        """
        name = seq if isinstance(seq, str) else f"{seq:06d}"
        sub = Path(self.model_folder(info.model), f"run={info.run_id}",
                   f"part-{info.shard_key}-{name}.parquet")
        return [self.root / folder / sub for folder in stage.data]

    def entry_path(self, stage: Stage, entry: Any) -> Path:
        """The manifest file of a committed part: named like its files, without `part-`."""
        name = Path(next(iter(entry.files))).stem.removeprefix("part-")
        return self.manifest_dir(stage, entry.run_id) / f"{name}.json"

    def vocab_path(self, info: Any) -> Path:
        """The vocabulary file of a profile run (one per run, whatever its shards)."""
        return self.root / "vocab" / self.model_folder(info.model) / f"run={info.run_id}.parquet"

    def record_path(self, stage: Stage, run_id: str, shard_key: str) -> Path:
        """The record file of one run shard of `stage`."""
        return self.root / stage.records / f"{run_id}.{shard_key}.json"

    def manifest_dir(self, stage: Stage, run_id: str) -> Path:
        """The folder of a run's manifest entries."""
        return self.root / stage.manifest / run_id

    def lock_path(self, stage: Stage, name: str) -> Path:
        """A lock file of `stage` ('R.sIofN' for a shard, 'R' for the whole run)."""
        return self.root / "locks" / f"{stage.lock_prefix}{name}.lock"

    # -- reading ------------------------------------------------------------------------

    def entries(self, stage: Stage, run_id: str | None = None, *,
                on_damage: Damaged | None = None) -> list[Any]:
        """Committed parts of `stage` (of one run, or all), by run, shard and sequence.

        A damaged entry raises StoreError naming it, or is passed to `on_damage` and left
        out.
        """
        pattern = f"{run_id}/*.json" if run_id else "*/*.json"
        paths = (self.root / stage.manifest).glob(pattern)
        entries = self._read_all(paths, stage.entry_type, "manifest entry", on_damage)
        return sorted(entries, key=lambda e: (e.run_id, e.shard, e.seq))

    def records(self, stage: Stage, *, on_damage: Damaged | None = None) -> list[Any]:
        """Every run-shard record of `stage`, ordered by model, run id and shard."""
        paths = (self.root / stage.records).glob("*.json")
        records = self._read_all(paths, stage.record_type, f"{stage.name} record", on_damage)
        return sorted(records, key=lambda r: (r.model, r.run_id, r.shard))

    def record(self, stage: Stage, run_id: str, shard_key: str = "s0of1") -> Any:
        """The record of one run shard of `stage`, or None."""
        path = self.record_path(stage, run_id, shard_key)
        if not path.is_file():
            return None
        return _parse(path, stage.record_type, f"{stage.name} record")

    @staticmethod
    def _read_all(paths: Iterator[Path], kind: type, what: str,
                  on_damage: Damaged | None) -> list[Any]:
        out = []
        for path in paths:
            try:
                out.append(_parse(path, kind, what))
            except FileNotFoundError:  # removed by a concurrent repair: not committed
                continue
            except StoreError as err:
                if on_damage is None:
                    raise
                on_damage(path, err)
        return out

    def manifest(self, run_id: str | None = None) -> list[ManifestEntry]:
        """Committed profile parts (of one run, or all)."""
        return self.entries(PROFILE, run_id)

    def runs(self) -> list[RunInfo]:
        """Every profile run-shard record, ordered by model, run id and shard."""
        return self.records(PROFILE)

    def run(self, run_id: str, shard_key: str = "s0of1") -> RunInfo | None:
        """The record of one profile run shard, or None."""
        return self.record(PROFILE, run_id, shard_key)

    def generations(self) -> list[GenerationInfo]:
        """Every generation-stage shard record, ordered by model, run id and shard."""
        return self.records(GENERATION)

    def committed(self, stage: Stage, info: Any) -> set[int]:
        """Prompt ids committed by the run shard `info` of `stage`."""
        return {i for e in self.entries(stage, info.run_id) if e.shard == info.shard
                for i in e.prompt_ids}

    def pending(self, stage: Stage, info: Any) -> list[int]:
        """Prompt ids of a run shard of `stage` not committed yet, ascending.

        Reads the manifest only: no lock is taken and nothing is written.
        """
        done = self.committed(stage, info)
        return [i for i in info.prompt_ids if i not in done]

    def read_continuations(self, run_id: str, prompt_ids: Collection[int] | None = None
                           ) -> Iterator[list[dict[str, Any]]]:
        """The committed continuation rows of a generation run, one list per part.

        Only the rows of `prompt_ids` (default: all) come back, and only parts that hold
        some of them are read; memory holds one part at a time.
        """
        import pyarrow.parquet as pq

        wanted = None if prompt_ids is None else set(prompt_ids)
        for entry in self.entries(GENERATION, run_id):
            if wanted is not None and wanted.isdisjoint(entry.prompt_ids):
                continue
            rows = pq.read_table(self.root / entry.continuations_file).to_pylist()
            yield [r for r in rows if wanted is None or r["prompt_id"] in wanted]

    def writer(self, info: RunInfo | GenerationInfo, **options: Any) -> Any:
        """A `RunWriter` (or `GenerationWriter`) for one run shard (see `writer.PartWriter`)."""
        from entropy_fast.store.writer import GenerationWriter, RunWriter

        kind = GenerationWriter if isinstance(info, GenerationInfo) else RunWriter
        return kind(self, info, **options)


def _parse(path: Path, kind: type, what: str) -> Any:
    payload = read_json(path, what)
    try:
        return kind.from_json(payload)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise StoreError(f"{what} {path} is damaged ({type(err).__name__}: {err})",
                         "run `entropy-fast check --repair STORE` to set it aside") from None
