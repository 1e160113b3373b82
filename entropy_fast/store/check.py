"""Checking a store, and repairing what can be repaired without losing committed work.

`check_store` verifies what the commit protocol promises: every committed file exists,
has the row count, size and sha256 recorded at commit, belongs to a run record, and no
prompt is committed twice; run records and manifest entries parse; then (when the files
are sound) the `integrity` query checks rows against token counts, duplicate keys, NaN,
inf and negative entropies. `repair=True` moves what is damaged into STORE/quarantine/:
a part whose file is missing or damaged loses its manifest entry (so the next run of that
shard recomputes its prompts), an unreadable record or entry is set aside. Nothing sound
is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from entropy_fast.store.errors import StoreError
from entropy_fast.store.layout import GENERATION, STAGES, Stage, Store, write_json_atomic
from entropy_fast.store.verify import file_problem


@dataclass
class CheckReport:
    """What `check_store` found (one line each) and, with repair, what it moved aside."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def check_store(path: str | Path, *, repair: bool = False) -> CheckReport:
    """Validate a store (see the module docstring); with `repair`, set damage aside."""
    store = Store(path)
    report = CheckReport()
    damaged_files: list[Path] = []

    def on_damage(file: Path, err: StoreError) -> None:
        report.problems.append(err.message)
        damaged_files.append(file)

    bad_parts: list[tuple[Stage, Any]] = []
    for stage in STAGES:
        records = store.records(stage, on_damage=on_damage)
        entries = store.entries(stage, on_damage=on_damage)
        bad_parts += _check_parts(store, stage, records, entries, report)
        report.notes += _uncommitted_notes(store, stage, entries)
        report.notes += [f"{stage.name} run {r.run_id} shard {r.shard_key} ({r.model}) is "
                         f"{r.status}" + (f" ({r.error})" if r.error else "")
                         + ("; the same command resumes it" if r.status != "failed" else "")
                         for r in records if r.status != "complete"]
    if report.ok:
        report.problems += _integrity_problems(path)
    if repair:
        report.repaired += _quarantine(store, damaged_files, bad_parts)
    return report


def _check_parts(store: Store, stage: Stage, records: list[Any], entries: list[Any],
                 report: CheckReport) -> list[tuple[Stage, Any]]:
    """Manifest against files: existence, rows, checksums, run records, overlaps.

    Returns the (stage, entry) of every part with a missing or damaged file.
    """
    shards = {(r.run_id, r.shard) for r in records}
    seen: dict[tuple[str, int], str] = {}
    bad = []
    for entry in entries:
        first_file = next(iter(entry.files))
        if (entry.run_id, entry.shard) not in shards:
            report.problems.append(f"part {first_file} has no run record ({stage.records}/"
                                   f"{entry.run_id}.{entry.shard_key}.json)")
        file_problems = [f"{relative}: {problem}"
                         for relative, rows in entry.files.items()
                         if (problem := _file_problem(store, entry, relative, rows))]
        if file_problems:
            held = ", ".join(str(i) for i in entry.prompt_ids[:10])
            more = " ..." if len(entry.prompt_ids) > 10 else ""
            report.problems += [f"{p} (part of {stage.name} run {entry.run_id}, prompts "
                                f"{held}{more})" for p in file_problems]
            bad.append((stage, entry))
        for prompt_id in entry.prompt_ids:
            first = seen.setdefault((entry.run_id, prompt_id), first_file)
            if first != first_file:
                report.problems.append(f"{stage.name} run {entry.run_id}: prompt {prompt_id} "
                                       f"is committed in both {first} and {first_file}")
    if stage is GENERATION and not bad:
        report.problems += _check_generated_tokens(store, entries)
    if any(e.checksums is None for e in entries):
        report.notes.append(f"{sum(e.checksums is None for e in entries)} {stage.name} "
                            "part(s) were written by schema version 1 and carry no checksum: "
                            "only their row counts are checked")
    return bad


def _file_problem(store: Store, entry: Any, relative: str, rows: int) -> str | None:
    problem = file_problem(store, entry, relative, always_hash=True)
    if problem is not None:
        return problem
    try:
        found = pq.ParquetFile(store.root / relative).metadata.num_rows
    except (OSError, pa.ArrowException) as err:
        return f"unreadable ({err})"
    return None if found == rows else f"{found} rows, the manifest says {rows}"


def _check_generated_tokens(store: Store, entries: list[Any]) -> list[str]:
    """Each generation part's prompt ids and token count against its manifest entry."""
    problems = []
    for entry in entries:
        table = pq.read_table(store.root / entry.continuations_file,
                              columns=["prompt_id", "continuation_token_ids"])
        ids = sorted(table.column("prompt_id").to_pylist())
        n_tokens = sum(len(c) for c in table.column("continuation_token_ids").to_pylist())
        if ids != list(entry.prompt_ids) or n_tokens != entry.n_tokens:
            problems.append(f"{entry.continuations_file}: prompts {ids[:5]}... and "
                            f"{n_tokens} tokens, the manifest says {list(entry.prompt_ids)[:5]}"
                            f"... and {entry.n_tokens}")
    return problems


def _uncommitted_notes(store: Store, stage: Stage, entries: list[Any]) -> list[str]:
    committed = {f for e in entries for f in e.files}
    stray = [p for folder in stage.data for p in (store.root / folder).rglob("*")
             if p.is_file() and str(p.relative_to(store.root)) not in committed]
    if not stray:
        return []
    return [f"{len(stray)} uncommitted file(s), e.g. {stray[0].relative_to(store.root)}: left "
            "by an interrupted writer; readers ignore them and the next run of that shard "
            "deletes them"]


def _integrity_problems(path: str | Path) -> list[str]:
    from entropy_fast.store.sql import ProfileStore

    with ProfileStore(path) as db:
        return [_integrity_problem(row) for row in db.query("integrity").to_pylist()
                if not row["ok"]]


def _integrity_problem(row: dict[str, Any]) -> str:
    """One line naming what the integrity query found wrong with a run."""
    checks = [
        (row["n_rows"] != row["expected_rows"],
         f"{row['n_rows']} rows where its {row['n_tokens']} tokens imply "
         f"{row['expected_rows']}"),
        (row["n_duplicates"], f"{row['n_duplicates']} duplicate (prompt, pos, layer, alpha)"),
        (row["n_duplicate_prompts"], f"{row['n_duplicate_prompts']} prompts stored twice"),
        (row["complete"] and row["n_missing_prompts"],
         f"{row['n_missing_prompts']} corpus prompts missing"),
        (row["n_prompts_with_wrong_rows"],
         f"{row['n_prompts_with_wrong_rows']} prompts with a wrong number of rows"),
        (row["n_nan"], f"{row['n_nan']} NaN entropies"),
        (row["n_inf"], f"{row['n_inf']} infinite entropies"),
        (row["n_negative"], f"{row['n_negative']} negative entropies"),
    ]
    return f"run {row['run_id']} ({row['model']}): " + "; ".join(t for bad, t in checks if bad)


def _quarantine(store: Store, damaged_files: list[Path],
                bad_parts: list[tuple[Stage, Any]]) -> list[str]:
    """Move damaged metadata files, and the entries (and files) of damaged parts, into
    STORE/quarantine/, keeping their relative paths; returns one line per move."""
    moved = [_move_aside(store, path) for path in damaged_files]
    for stage, entry in bad_parts:
        moved.append(_move_aside(store, store.entry_path(stage, entry))
                     + f" (its {len(entry.prompt_ids)} prompts will be recomputed by the "
                     "next run of that shard)")
        moved += [_move_aside(store, store.root / f) for f in entry.files
                  if (store.root / f).exists()]
        _mark_incomplete(store, stage, entry)
    return moved


def _mark_incomplete(store: Store, stage: Stage, entry: Any) -> None:
    """A run shard that lost a part is no longer complete: the same command resumes it."""
    record = store.record(stage, entry.run_id, entry.shard_key)
    if record is not None:
        record.status = "incomplete"
        record.error = "check --repair set a damaged part aside"
        write_json_atomic(store.record_path(stage, entry.run_id, entry.shard_key),
                          record.to_json())


def _move_aside(store: Store, path: Path) -> str:
    relative = path.relative_to(store.root)
    target = store.root / "quarantine" / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return f"moved {relative} to quarantine/{relative}"


__all__ = ["CheckReport", "check_store"]
