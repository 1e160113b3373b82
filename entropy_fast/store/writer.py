"""Writing into a store: streaming whole prompts into committed parts, exactly once.

Commit protocol of one part (see docs/store.md for the guarantees):

1. every file of the part is written under a dot-prefixed temporary name, fsynced, its
   size and sha256 taken, and renamed into place;
2. the manifest entry naming those files, checksums and prompt ids is written the same
   way. That rename is the commit: readers list files from the manifest only, so a file
   renamed but never recorded (a kill between 1 and 2) is invisible, and the next writer
   of that shard deletes it and redoes its prompts.

A writer holds its shard's lock (flock) for its whole life, so one process writes a run
shard at a time; it registers under the run's lock, so two processes cannot start one run
with two shard layouts. The buffer of a part is taken out before the part is written, so
an interrupt at any step (even between the manifest entry and the bookkeeping after it)
never commits the same prompts twice. Parts are independent (each its own files, entry and
sequence number), so a writer may encode several at once (`encoders`): Parquet encoding
releases the GIL, and a part is committed whatever the others do.

A distributed run is the exception to one writer per shard: its driver holds the shard's
lock and record, and its workers commit parts with `WorkerWriter`, each commit under the
shard's `commit_lock` and without the prompts that committed parts already hold. The
driver's writer (`shared=True`) takes that lock too, to remove leftovers and to record the
final status, and a worker commits only while the record says "running": once the driver
has closed the run (a failed job whose write tasks are still finishing), what is committed
stays as the driver counted it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from entropy_fast.store import metadata
from entropy_fast.store.errors import StoreError
from entropy_fast.store.layout import (
    GENERATION,
    PROFILE,
    Stage,
    Store,
    fsync_dir,
    write_atomic,
    write_json_atomic,
)
from entropy_fast.store.records import (
    GenerationEntry,
    GenerationInfo,
    ManifestEntry,
    RunInfo,
    now,
    read_json,
)
from entropy_fast.store.schema import (
    CONTINUATIONS_SCHEMA,
    ENTROPY_SCHEMA,
    KEY_COLUMNS,
    PROMPTS_SCHEMA,
    TOP_TOKENS_SCHEMA,
    VOCAB_SCHEMA,
)
from entropy_fast.store.verify import sha256_file

ROWS_PER_PART = 1 << 20
FLUSH_SECONDS = 60.0

_ENTROPY_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": [*KEY_COLUMNS, "top_token_id"],
    "use_byte_stream_split": ["entropy", "target_surprisal"],
    "write_page_checksum": True,
}
"""Parquet options of entropy parts: zstd, dictionary keys, byte-stream-split floats, and
page CRCs that pyarrow readers verify."""
_PLAIN_OPTIONS: dict[str, Any] = {"compression": "zstd", "write_page_checksum": True}


def _not_writable(root: Path, err: OSError) -> StoreError:
    return StoreError(f"cannot write into the store {root}: {err.strerror or err}",
                      "free disk space or make it writable; everything committed so far is "
                      "kept, and the same command resumes")


class FileLock:
    """An exclusive flock on a file, held from construction to `release()`.

    wait=False: a lock held by another process is a StoreError naming `what`.
    """

    def __init__(self, path: Path, what: str, *, wait: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise StoreError(f"{what} is being written by another process",
                             "wait for it to finish or stop it first") from None
        except OSError as err:
            self.release()
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise StoreError(f"the filesystem of {path.parent} does not support file "
                                 "locks, so concurrent writers cannot be kept apart",
                                 "put the store on a local or lock-capable filesystem"
                                 ) from None
            raise

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def commit_lock(store: Store, stage: Stage, info: Any) -> FileLock:
    """The lock that serializes commits into a run shard written by several processes
    (`WorkerWriter`), taken by every commit and by the registering process while it
    removes leftovers and records the final status. Waits for it; refuses a filesystem
    without locks."""
    return FileLock(store.lock_path(stage, f"{info.run_id}.{info.shard_key}.commit"),
                    f"the commits of {stage.name} run {info.run_id} shard {info.shard_key}",
                    wait=True)


class PartWriter:
    """Streams one run shard of a stage into a store, committing whole parts.

    Opening takes the shard's lock, registers the run shard (its record) under the run's
    lock, deletes files an earlier killed writer left uncommitted, and reads the stage's
    manifest to learn which prompts are done (`done`, `pending`). Subclasses buffer their
    rows and name the prompts they belong to (`_append`); a part is committed when
    `rows_per_part` rows are buffered or `flush_seconds` have passed since the last commit,
    and at `close`. Used as a context manager, an exception commits what is buffered (all of
    it is valid) and records the run as failed (or interrupted, for Ctrl-C).

    Args:
        store: the store.
        info: the run record (identity and settings); an existing record of the same
            run shard must have the same identity.
        rows_per_part: rows per part file (= one Parquet row group).
        flush_seconds: commit at least this often while rows arrive.
        shared: other processes commit parts into this shard (`WorkerWriter`): leftovers
            are removed and the final status recorded under their `commit_lock`.
        encoders: parts written at once. With more than one, `commit` hands the part to a
            background thread and returns (it waits while `encoders` parts are in flight);
            `flush` and `close` wait for them, and a failed part's error is raised by the
            next `commit`, `flush` or `close`.
    """

    stage: Stage
    part_options: tuple[dict[str, Any], ...]
    """Parquet options of each file of a part, in the order of `stage.data`."""
    step_hook: Callable[[str], None] | None = None
    """Called after each commit step ('files', 'entry'); tests inject interrupts here."""

    def __init__(self, store: Store, info: Any, *, rows_per_part: int = ROWS_PER_PART,
                 flush_seconds: float = FLUSH_SECONDS, shared: bool = False,
                 encoders: int = 1) -> None:
        if encoders < 1:
            raise ValueError(f"encoders must be >= 1, got {encoders}")
        self.store, self.info = store, info
        self.rows_per_part, self.flush_seconds = rows_per_part, flush_seconds
        self.shared = shared
        self._start_encoders(encoders)
        shard = f"{self.stage.name} run {info.run_id} shard {info.shard_key} of {info.model}"
        try:
            self._lock = FileLock(store.lock_path(self.stage, f"{info.run_id}.{info.shard_key}"),
                                  shard, wait=False)
        except PermissionError as err:
            raise _not_writable(store.root, err) from None
        try:
            self._register()
            with self._no_worker_commits():  # a straggler's files are not leftovers
                entries = [e for e in store.entries(self.stage, info.run_id)
                           if e.shard == info.shard]
                self._remove_uncommitted({f for e in entries for f in e.files})
            self.done: set[int] = {i for e in entries for i in e.prompt_ids}
            self._seq = max((e.seq for e in entries), default=0)
        except OSError as err:
            self._lock.release()
            raise _not_writable(store.root, err) from None
        except BaseException:
            self._lock.release()
            raise
        self._reset()
        self._last_commit = time.monotonic()

    def _start_encoders(self, encoders: int) -> None:
        self._encoders = encoders
        self._in_flight: deque[Future] = deque()
        self._pool = (ThreadPoolExecutor(encoders, thread_name_prefix="entropy-fast-part")
                      if encoders > 1 else None)
        self._done_lock = threading.Lock()

    def _register(self) -> None:
        """Check the run's other records and write this shard's, under the run's lock."""
        info = self.info
        with FileLock(self.store.lock_path(self.stage, info.run_id),
                      f"{self.stage.name} run {info.run_id}", wait=True):
            old = self.store.record(self.stage, info.run_id, info.shard_key)
            if old is not None:
                if old.identity() != info.identity():
                    raise StoreError(f"run {info.run_id} already exists in {self.store.root} "
                                     "with other settings or other model weights",
                                     "drop --run-id (run ids then follow the settings and "
                                     "the weights) or pick another")
                info.created_at, info.revision = old.created_at, info.revision or old.revision
                self._merge(old)
            layouts = {r.n_shards for r in self.store.records(self.stage)
                       if r.run_id == info.run_id}
            if layouts - {info.n_shards}:
                raise StoreError(f"run {info.run_id} is written with {sorted(layouts)} "
                                 f"shard(s), not {info.n_shards}",
                                 "use the same --shard I/N as the rest of the run")
            self.store.upgrade_marker()
            info.status, info.error = "running", None
            self._write_record()

    def _merge(self, old: Any) -> None:
        """Take over what an earlier writer of this shard learned (hook)."""

    def _no_worker_commits(self) -> contextlib.AbstractContextManager[Any]:
        """Held, no `WorkerWriter` commits into a shared shard."""
        if not self.shared:
            return contextlib.nullcontext()
        return commit_lock(self.store, self.stage, self.info)

    def _remove_uncommitted(self, committed: set[str]) -> None:
        """Delete this shard's temp files and parts renamed but never recorded."""
        key, root, run_id = self.info.shard_key, self.store.root, self.info.run_id
        folders = [p.parent for p in self.store.part_paths(self.stage, self.info, 0)]
        leftovers = [*(p for folder in folders for p in folder.glob(f"*part-{key}-*")),
                     *self.store.manifest_dir(self.stage, run_id).glob(f".{key}-*.tmp"),
                     *(root / self.stage.records).glob(f".{run_id}.{key}.json.*.tmp")]
        for path in leftovers:
            if str(path.relative_to(root)) not in committed:
                path.unlink(missing_ok=True)

    @property
    def pending(self) -> list[int]:
        """Prompt ids of this shard not committed yet, ascending."""
        return [i for i in self.info.prompt_ids if i not in self.done]

    def _check_new(self, prompt_ids: Sequence[int]) -> None:
        new = set(prompt_ids)
        if len(new) != len(prompt_ids) or not new.isdisjoint(self.done) \
                or not new.isdisjoint(self._buffered):
            again = sorted(i for i in prompt_ids if i in self.done or i in self._buffered
                           or prompt_ids.count(i) > 1)
            raise StoreError(f"prompt {again[0]} is already committed or buffered in run "
                             f"{self.info.run_id}")
        owned = self.info.prompt_ids
        outside = [i for i in prompt_ids if i not in owned]
        if outside:
            raise StoreError(f"prompt {outside[0]} does not belong to shard "
                             f"{self.info.shard_key} of run {self.info.run_id}")

    def _append(self, prompt_ids: Sequence[int], n_rows: int) -> None:
        """Count buffered prompts (their rows are in the subclass's buffer) and their
        `n_rows` data rows; commit at a threshold."""
        self._ids.extend(prompt_ids)
        self._buffered.update(prompt_ids)
        self._n_rows += n_rows
        if (self._n_rows >= self.rows_per_part
                or time.monotonic() - self._last_commit >= self.flush_seconds):
            self.commit()

    def _reset(self) -> None:
        """Empty the buffers (subclasses clear theirs too)."""
        self._ids: list[int] = []
        self._buffered: set[int] = set()
        self._n_rows = 0

    def _record_state(self) -> tuple[Any, ...]:
        """What readers need in the run record before the first part (hook)."""
        return (self.info.revision,)

    def _tables(self) -> list[pa.Table | None]:
        """The buffered rows as one table per file of a part, as `stage.data`; None for a
        file this run's parts do not have (hook)."""
        raise NotImplementedError

    def _entry(self, files: dict[str, str], sums: dict[str, tuple[str, int]],
               tables: list[pa.Table], ids: list[int], seq: int) -> Any:
        """The manifest entry of part number `seq` holding prompts `ids` (hook)."""
        raise NotImplementedError

    def commit(self) -> None:
        """Write the buffered prompts as one part and record it in the manifest (with
        `encoders` > 1, in the background: see `flush`)."""
        self._raise_failed()
        if not self._ids:
            return
        tables, ids = self._tables(), self._ids
        self._reset()  # taken out first: an interrupt from here on never commits them twice
        self._last_commit = time.monotonic()
        try:
            self._prepare_record()
        except OSError as err:
            raise _not_writable(self.store.root, err) from None
        self._seq += 1
        if self._pool is None:
            self._commit_part(tables, ids, self._seq)
            return
        while len(self._in_flight) >= self._encoders:
            self._in_flight.popleft().result()
        self._in_flight.append(self._pool.submit(self._commit_part, tables, ids, self._seq))

    def _prepare_record(self) -> None:
        """Write the record when readers need more of it before this part (the layers
        before the first part)."""
        if self._recorded != self._record_state():
            self._write_record()

    def flush(self) -> None:
        """Commit what is buffered and wait until every part in flight is committed."""
        self.commit()
        while self._in_flight:
            self._in_flight.popleft().result()

    def _raise_failed(self) -> None:
        """Raise the error of a part in flight that failed (its prompts stay pending)."""
        while self._in_flight and self._in_flight[0].done():
            self._in_flight.popleft().result()

    def _commit_part(self, tables: list[pa.Table], ids: list[int], seq: int) -> None:
        try:
            self._commit(tables, ids, seq)
        except OSError as err:
            raise _not_writable(self.store.root, err) from None

    def _commit(self, tables: list[pa.Table], ids: list[int], seq: int) -> None:
        self._write_part(f"{seq:06d}", tables, ids, seq)

    def _write_part(self, name: str, tables: list[pa.Table], ids: list[int], seq: int) -> Any:
        """Steps 1 and 2 of the protocol for part `name`; returns its manifest entry."""
        paths = self.store.part_paths(self.stage, self.info, name)
        sums: dict[str, tuple[str, int]] = {}
        written = [(folder, path, table, options) for folder, path, table, options in
                   zip(self.stage.data, paths, tables, self.part_options, strict=True)
                   if table is not None]  # a file a run does not have (top tokens)
        for _, path, table, options in written:
            path.parent.mkdir(parents=True, exist_ok=True)
            relative = str(path.relative_to(self.store.root))

            def write(tmp: Path, t: pa.Table = table, o: dict = options,
                      r: str = relative) -> None:
                pq.write_table(t, tmp, row_group_size=max(t.num_rows, 1), **o)
                sums[r] = (sha256_file(tmp), tmp.stat().st_size)

            write_atomic(path, write)
            fsync_dir(path.parent)
        self._step("files")
        files = {folder: str(path.relative_to(self.store.root))
                 for folder, path, _, _ in written}
        entry = self._entry(files, sums, tables, ids, seq)
        folder = self.store.manifest_dir(self.stage, self.info.run_id)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f"{self.info.shard_key}-{name}.json", entry.to_json())
        fsync_dir(folder)
        with self._done_lock:  # parts in flight end on their own threads
            self.done.update(ids)
        self._step("entry")
        return entry

    def _step(self, name: str) -> None:
        if self.step_hook is not None:
            self.step_hook(name)

    def _write_record(self) -> None:
        self._recorded = self._record_state()
        self.info.updated_at = now()
        path = self.store.record_path(self.stage, self.info.run_id, self.info.shard_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.info.to_json())

    def close(self, error: str | None = None, status: str | None = None) -> None:
        """Commit what is buffered, wait for the parts in flight, record the final status and
        release the lock. A part that failed makes the status "failed" (or "interrupted")
        and its error is raised once the status is recorded.

        status: "complete" when nothing is pending, else `status` (default "failed" with
        an error, "incomplete" without).
        """
        if self._lock.fd < 0:
            return
        try:
            with self._no_worker_commits():  # none after the final status (WorkerWriter)
                failure = self._finish_parts()
                if failure is not None and error is None:
                    error, status = _final_status(failure)
                self.done |= self.store.committed(self.stage, self.info)
                complete = error is None and not self.pending
                self.info.status = "complete" if complete else (
                    status or ("failed" if error else "incomplete"))
                self.info.error = error
                # On a full disk the record keeps its last state: the manifest, not the
                # record, says what is committed.
                with contextlib.suppress(OSError):
                    self._write_record()
            if failure is not None:
                raise failure
        finally:
            self._lock.release()

    def _finish_parts(self) -> BaseException | None:
        """Commit what is buffered and wait until every part in flight has ended (each
        commits or fails on its own); the first failure, or None."""
        failure = None
        try:
            self.commit()
        except BaseException as err:
            failure = err
        while self._in_flight:
            try:
                self._in_flight.popleft().result()
            except BaseException as err:
                failure = failure or err
        if self._pool is not None:
            self._pool.shutdown()
        return failure

    def __enter__(self) -> Any:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 _tb: object) -> None:
        if err is None:
            self.close()
        else:
            self.close(*_final_status(err))


def _final_status(err: BaseException) -> tuple[str, str]:
    """(error, status) that a run shard stopped by `err` records."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)", "interrupted"
    return f"{type(err).__name__}: {err}", "failed"


class RunWriter(PartWriter):
    """Streams the profiles of one profile run shard into a store (see `PartWriter`)."""

    stage = PROFILE
    part_options = (_ENTROPY_OPTIONS, _PLAIN_OPTIONS, _PLAIN_OPTIONS)
    info: RunInfo

    def _merge(self, old: RunInfo) -> None:
        self.info.layer_indices = self.info.layer_indices or old.layer_indices
        self.info.vocab_file = self.info.vocab_file or old.vocab_file
        self.info.vocab_sha256 = self.info.vocab_sha256 or old.vocab_sha256

    def _reset(self) -> None:
        super()._reset()
        self._batches: list[pa.RecordBatch] = []
        self._top_batches: list[pa.RecordBatch] = []
        self._prompt_batches: list[pa.RecordBatch] = []

    def _record_state(self) -> tuple[Any, ...]:
        return (self.info.layer_indices, self.info.revision)

    def add(self, prompt: Any, profile: Any) -> None:
        """Buffer one prompt's EntropyProfile; commits a part when a threshold is reached."""
        from entropy_fast.store.codec import profile_rows

        rows, top_rows = profile_rows(prompt.prompt_id, profile, self.info.lens.alphas)
        self.add_batch([prompt], rows, [profile.n_tokens], list(profile.layer_indices),
                       [profile.metadata.get("prompt_token_ids") or []], top_rows)

    def add_batch(self, prompts: Sequence[Any], rows: pa.RecordBatch,
                  n_tokens: Sequence[int], layers: Sequence[int],
                  prompt_token_ids: Sequence[Sequence[int]],
                  top_rows: pa.RecordBatch | None = None) -> None:
        """Buffer the rows of several prompts at once (ENTROPY_SCHEMA, as `rows.long_rows`
        makes them; TOP_TOKENS_SCHEMA rows as `rows.top_token_rows` makes them, for a run
        with top_tokens > 0): their n_tokens and prompt token ids in the order of
        `prompts`. Commits a part when a threshold is reached."""
        if (top_rows is not None) != (self.info.lens.top_tokens > 0):
            raise StoreError(f"run {self.info.run_id} has top_tokens="
                             f"{self.info.lens.top_tokens}; rows "
                             f"{'with' if top_rows is not None else 'without'} top tokens "
                             "do not belong to it")
        self._check_new([p.prompt_id for p in prompts])
        layers = [int(i) for i in layers]
        if self.info.layer_indices is None:
            self.info.layer_indices = layers
        elif layers != self.info.layer_indices:
            raise StoreError(f"profile of prompt {prompts[0].prompt_id} has layers {layers}, "
                             f"the run has {self.info.layer_indices}")
        self._batches.append(rows)
        if top_rows is not None:
            self._top_batches.append(top_rows)
        self._prompt_batches.append(_prompt_rows(prompts, n_tokens, prompt_token_ids,
                                                 self.info.corpus))
        self._append([p.prompt_id for p in prompts], rows.num_rows)

    def store_vocabulary(self, texts: Sequence[str]) -> None:
        """Write the model's vocabulary (token id i -> texts[i], as the tokenizer decodes
        that token alone) once per run, checksummed in the run record. A run that has one
        keeps it (a resumed run, another shard)."""
        info = self.info
        if info.vocab_file is not None and (self.store.root / info.vocab_file).exists():
            return
        path = self.store.vocab_path(info)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"token_id": pa.array(range(len(texts)), pa.int32()),
                          "text": pa.array(list(texts), pa.string())}, schema=VOCAB_SCHEMA)

        def write(tmp: Path) -> None:
            pq.write_table(table, tmp, **_PLAIN_OPTIONS)

        write_atomic(path, write)
        fsync_dir(path.parent)
        info.vocab_file = str(path.relative_to(self.store.root))
        info.vocab_sha256 = sha256_file(path)
        self._write_record()

    def register_layers(self, layer_indices: Sequence[int], revision: str | None) -> None:
        """Record the run's layers and the model's revision now, before other processes
        commit parts (a distributed driver knows them from the model's config). Layers
        other than those an earlier writer recorded raise StoreError."""
        layers = [int(i) for i in layer_indices]
        if self.info.layer_indices not in (None, layers):
            raise StoreError(f"run {self.info.run_id} has layers {self.info.layer_indices}; "
                             f"the model now gives {layers}")
        self.info.layer_indices = layers
        self.info.revision = revision or self.info.revision
        self._write_record()

    def _tables(self) -> list[pa.Table | None]:
        top = None
        if self.info.lens.top_tokens:
            top = pa.Table.from_batches(self._top_batches, schema=TOP_TOKENS_SCHEMA)
        return [pa.Table.from_batches(self._batches, schema=ENTROPY_SCHEMA),
                pa.Table.from_batches(self._prompt_batches, schema=PROMPTS_SCHEMA), top]

    def _entry(self, files: dict[str, str], sums: dict[str, tuple[str, int]],
               tables: list[pa.Table], ids: list[int], seq: int) -> ManifestEntry:
        rows, prompts, info = tables[0], tables[1], self.info
        values = rows.column("entropy").to_numpy()
        return ManifestEntry(
            run_id=info.run_id, model=info.model, shard=info.shard, n_shards=info.n_shards,
            seq=seq, entropy_file=files["entropy"], prompts_file=files["prompts"],
            top_tokens_file=files.get("top_tokens"),
            n_top_rows=0 if tables[2] is None else tables[2].num_rows, n_rows=rows.num_rows,
            n_prompts=len(ids), n_tokens=int(pc.sum(prompts["n_tokens"]).as_py() or 0),
            n_nan=int(np.isnan(values).sum()), n_inf=int(np.isinf(values).sum()),
            prompt_ids=tuple(sorted(ids)), committed_at=now(),
            checksums={f: s for f, (s, _) in sums.items()},
            sizes={f: n for f, (_, n) in sums.items()},
            metadata_fields=_metadata_fields(prompts))


def _metadata_fields(prompts: pa.Table) -> dict[str, str]:
    """`metadata.field_types` of the prompts rows' metadata (JSON texts; nulls skipped)."""
    if metadata.METADATA_COLUMN not in prompts.column_names:  # a schema-2 prompts table
        return {}
    texts = prompts[metadata.METADATA_COLUMN].drop_null().to_pylist()
    return metadata.field_types(metadata.decode(text) for text in texts)


def _prompt_rows(prompts: Sequence[Any], n_tokens: Sequence[int],
                 prompt_token_ids: Sequence[Sequence[int]], source: str) -> pa.RecordBatch:
    """The PROMPTS_SCHEMA rows of profiled prompts (`corpus.Prompt`s), built column-wise."""
    lengths = np.fromiter((len(ids) for ids in prompt_token_ids), dtype=np.int32,
                          count=len(prompt_token_ids))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(chain.from_iterable(prompt_token_ids), dtype=np.int32,
                       count=int(offsets[-1]))
    columns = {
        "prompt_id": pa.array([p.prompt_id for p in prompts], pa.int32()),
        "text": pa.array([p.text for p in prompts], pa.string()),
        "prompt_token_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        "n_tokens": pa.array(np.asarray(n_tokens, dtype=np.int32)),
        "source": pa.repeat(pa.scalar(source, pa.string()), len(prompts)),
        "source_line": pa.array([p.source_line for p in prompts], pa.int32()),
        "metadata": pa.array([metadata.encode(p.metadata) for p in prompts], pa.string()),
    }
    return pa.RecordBatch.from_arrays([columns[f.name] for f in PROMPTS_SCHEMA],
                                      schema=PROMPTS_SCHEMA)


_RANGE = re.compile(r"p(\d+)-(\d+)")
"""The name of a part a `WorkerWriter` commits: its first and last prompt id."""


class WorkerWriter(RunWriter):
    """Commits profile parts into a run shard that another process has registered.

    The driver of a distributed run holds the shard's lock and owns its record
    (`RunWriter`, `register_layers`); its workers, in other processes or on other nodes,
    commit parts with this writer, one part per `commit()`. Each commit takes the shard's
    `commit_lock`, leaves out the prompts that committed parts already hold, and names the
    part after the first and last prompt id it holds (`part-sIofN-p000000012-000000345`).
    So a retried or duplicated task never commits a prompt twice, and the retry of a
    commit that died before its manifest entry rewrites the same files rather than leaving
    orphans. A commit after the driver has closed the run (its record no longer says
    "running") is a StoreError and commits nothing. `entries` lists what this writer
    committed.
    """

    def __init__(self, store: Store, info: RunInfo) -> None:  # no lock or registration
        self.store, self.info = store, info
        self.rows_per_part = self.flush_seconds = math.inf  # a part ends at commit() only
        self._start_encoders(1)
        self.done: set[int] = set()
        self.entries: list[ManifestEntry] = []
        self._seq = 0  # named parts have no sequence number
        self._reset()
        self._last_commit = time.monotonic()

    def _commit(self, tables: list[pa.Table], ids: list[int], seq: int) -> None:
        del seq  # a named part has no sequence number: its entry says 0
        with commit_lock(self.store, self.stage, self.info):
            self._check_running()
            held = self._committed_among(set(ids))
            if held:
                drop = pa.array(sorted(held), pa.int32())
                tables = [None if t is None else
                          t.filter(pc.invert(pc.is_in(t["prompt_id"], value_set=drop)))
                          for t in tables]
                ids = [i for i in ids if i not in held]
            if ids:
                ids = sorted(ids)
                name = f"p{ids[0]:09d}-{ids[-1]:09d}"
                self.entries.append(self._write_part(name, tables, ids, 0))

    def _prepare_record(self) -> None:
        """Nothing: the record is the driver's, never written here."""

    def _check_running(self) -> None:
        """StoreError unless the driver's record of this shard still says "running"."""
        info = self.info
        record = self.store.record(self.stage, info.run_id, info.shard_key)
        status = record.status if record is not None else "gone"
        if status != "running":
            raise StoreError(f"{self.stage.name} run {info.run_id} shard {info.shard_key} is "
                             f"{status}: its driver has ended it, so a late part is not "
                             "committed",
                             "run the same command again: it profiles what is not committed")

    def _committed_among(self, ids: set[int]) -> set[int]:
        """The prompts of `ids` that committed parts of this shard hold. Only the entries
        whose prompt range overlaps `ids` (and sequence-numbered ones) are read."""
        low, high, held = min(ids), max(ids), set()
        prefix = f"{self.info.shard_key}-"
        for path in self.store.manifest_dir(self.stage, self.info.run_id).glob(prefix + "*.json"):
            span = _RANGE.fullmatch(path.stem.removeprefix(prefix))
            if span and (int(span[2]) < low or int(span[1]) > high):
                continue
            try:
                entry = ManifestEntry.from_json(read_json(path, "manifest entry"))
            except FileNotFoundError:  # set aside by a concurrent repair: not committed
                continue
            held |= ids.intersection(entry.prompt_ids)
        return held

    def close(self, error: str | None = None, status: str | None = None) -> None:
        """Commit what is buffered; the lock and the record belong to the driver."""
        del error, status
        self.commit()


class GenerationWriter(PartWriter):
    """Streams the continuations of one generation shard into a store (see `PartWriter`)."""

    stage = GENERATION
    part_options = (_PLAIN_OPTIONS,)
    info: GenerationInfo

    def _reset(self) -> None:
        super()._reset()
        self._rows: list[dict[str, Any]] = []

    def add(self, prompt: Any, prompt_token_ids: Sequence[int],
            continuation_token_ids: Sequence[int], continuation_text: str) -> None:
        """Buffer one prompt's continuation; commits a part when a threshold is reached."""
        self._check_new([prompt.prompt_id])
        self._rows.append({
            "prompt_id": prompt.prompt_id, "text": prompt.text,
            "source_line": prompt.source_line,
            "prompt_token_ids": [int(t) for t in prompt_token_ids],
            "continuation_token_ids": [int(t) for t in continuation_token_ids],
            "continuation_text": continuation_text, "generator": self.info.generator})
        self._append([prompt.prompt_id], 1)

    def _tables(self) -> list[pa.Table]:
        return [pa.Table.from_pylist(self._rows, schema=CONTINUATIONS_SCHEMA)]

    def _entry(self, files: dict[str, str], sums: dict[str, tuple[str, int]],
               tables: list[pa.Table], ids: list[int], seq: int) -> GenerationEntry:
        info = self.info
        new_tokens = pc.list_value_length(tables[0]["continuation_token_ids"])
        return GenerationEntry(
            run_id=info.run_id, model=info.model, shard=info.shard, n_shards=info.n_shards,
            seq=seq, continuations_file=files["continuations"], n_prompts=len(ids),
            n_tokens=int(pc.sum(new_tokens).as_py() or 0),
            prompt_ids=tuple(sorted(ids)), committed_at=now(),
            checksums={f: s for f, (s, _) in sums.items()},
            sizes={f: n for f, (_, n) in sums.items()})
