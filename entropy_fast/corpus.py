"""Corpus files: reading prompts from .txt, .jsonl and .parquet, with line-numbered errors.

This module owns turning a corpus file into a `Corpus`: an ordered list of prompts, each
with a dense 0-based `prompt_id` (its index among the kept prompts) and the line (or
Parquet row, 1-based) it came from, plus a fingerprint that identifies the corpus's
content in run ids.

Formats:
    .txt      one prompt per line; blank lines are skipped (and counted: one log line
              says how many).
    .jsonl    one JSON object per line with a string field (default "text"); blank lines
              are skipped the same way.
    .parquet  a string column (default "text"); one prompt per row.

A bad record (invalid JSON, a missing or non-string field, invalid UTF-8, an empty text)
raises `CorpusError` naming the file and line, or is skipped with `on_error="skip"`.

The other fields of a .jsonl record and the other columns of a .parquet row are the
prompt's `metadata` (a dict; None when there are none, and for .txt); stores keep it
(`store.metadata`). Metadata is not part of the fingerprint: it labels prompts, it does
not change what is profiled.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from entropy_fast.errors import EntropyFastError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
_BLANK = "blank line"
"""The problem a reader gives a blank line: skipped in every mode, counted, reported once."""

log = logging.getLogger("entropy_fast")


class CorpusError(EntropyFastError, ValueError):
    """A corpus file is missing, empty or malformed; the message names file and line."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of a corpus: its dense id, its text, the 1-based line it came from and
    the record's other fields (None when it has none)."""

    prompt_id: int
    text: str
    source_line: int
    metadata: dict[str, Any] | None = None


@dataclass
class Corpus:
    """The prompts of one corpus file, in file order, and the records that were skipped.

    Attributes:
        path: the file the prompts came from (a display name for in-memory corpora).
        prompts: the kept prompts; `prompts[i].prompt_id == i`.
        skipped: (line, reason) of every record skipped with on_error="skip".
        blank_lines: how many blank lines were skipped (prompt ids count only the rest;
            source lines stay the file's).
    """

    path: str
    prompts: list[Prompt]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    blank_lines: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        """The prompt texts in prompt_id order."""
        return [p.text for p in self.prompts]

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the prompt texts in order: equal corpora give equal run ids."""
        digest = hashlib.sha256()
        for text in self.texts:
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
        return digest.hexdigest()

    @classmethod
    def from_texts(cls, texts: list[str], name: str = "<memory>") -> Corpus:
        """A corpus from in-memory texts (line numbers are 1-based list positions)."""
        return cls(name, [Prompt(i, t, i + 1) for i, t in enumerate(texts)])


def read_corpus(path: str | Path, *, text_field: str = "text", on_error: str = "fail") -> Corpus:
    """Read a corpus file (.txt, .jsonl or .parquet) into a `Corpus`.

    Args:
        path: the corpus file.
        text_field: the JSON field (.jsonl) or column (.parquet) holding the text.
        on_error: "fail" raises `CorpusError` at the first bad record; "skip" drops bad
            records and lists them in `Corpus.skipped`.

    Raises:
        CorpusError: no such file, unsupported suffix, a bad record (with
            on_error="fail"), or no prompts.
    """
    if on_error not in ("fail", "skip"):
        raise CorpusError(f"on_error must be 'fail' or 'skip', got {on_error!r}",
                          param="on_error")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    readers = {".txt": _txt_records, ".jsonl": _jsonl_records, ".parquet": _parquet_records}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CorpusError(
            f"{path}: unsupported corpus format {path.suffix!r}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    unit = "row" if reader is _parquet_records else "line"
    prompts: list[Prompt] = []
    skipped: list[tuple[int, str]] = []
    blank: list[int] = []
    for line, text, problem, metadata in reader(path, text_field):
        if problem == _BLANK:
            blank.append(line)
            continue
        if problem is None and not text.strip():
            problem = "empty text"
        if problem is None:
            prompts.append(Prompt(len(prompts), text, line, metadata))
        elif on_error == "skip":
            skipped.append((line, problem))
        else:
            raise CorpusError(f"{path} {unit} {line}: {problem}",
                              "skip bad records with on_error='skip'", param="on_error")
    if not prompts:
        detail = f" ({len(skipped)} bad records skipped)" if skipped else ""
        detail += f" ({len(blank)} blank lines)" if blank else ""
        raise CorpusError(f"{path}: the corpus has no prompts{detail}")
    if blank:
        shown = ", ".join(map(str, blank[:5])) + (", ..." if len(blank) > 5 else "")
        log.warning("%s: skipped %d blank line%s (line %s): blank lines hold no prompt; "
                    "prompt ids count the other %d", path, len(blank),
                    "s" if len(blank) > 1 else "", shown, len(prompts))
    return Corpus(str(path), prompts, skipped, len(blank))


Record = tuple[int, str, str | None, dict[str, Any] | None]
"""(1-based line or row, text, problem or None, metadata) as the per-format readers yield
them."""


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, decoded line without its newline, decode problem) for each line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as err:
                yield number, None, f"not valid UTF-8 ({err.reason} at byte {err.start})"


def _txt_records(path: Path, _text_field: str) -> Iterator[Record]:
    for number, line, problem in _lines(path):
        if problem is not None:
            yield number, "", problem, None
        else:
            yield number, line, None if line.strip() else _BLANK, None


def _jsonl_records(path: Path, text_field: str) -> Iterator[Record]:
    for number, line, problem in _lines(path):
        if problem is not None:
            yield number, "", problem, None
        elif line.strip():
            yield (number, *_json_text(line, text_field))
        else:
            yield number, "", _BLANK, None


def _json_text(line: str, text_field: str
               ) -> tuple[str, str | None, dict[str, Any] | None]:
    """(text, problem, metadata) of one JSON line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return "", f"not valid JSON ({err.msg} at column {err.colno})", None
    if not isinstance(record, dict):
        return "", f"expected a JSON object, got {type(record).__name__}", None
    if text_field not in record:
        fields = ", ".join(sorted(record)) or "none"
        return "", f"no {text_field!r} field (fields: {fields}; choose one with text_field)", None
    text = record.pop(text_field)
    if not isinstance(text, str):
        return "", f"field {text_field!r} is {type(text).__name__}, not a string", None
    return text, None, record or None


def _parquet_records(path: Path, text_field: str) -> Iterator[Record]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a non-Parquet file
        raise CorpusError(f"{path}: not a readable Parquet file ({err})") from err
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise CorpusError(
            f"{path}: no {text_field!r} column (columns: {', '.join(names)})",
            "choose one with text_field", param="text_field")
    row = 0
    for batch in parquet.iter_batches(batch_size=65536):
        for record in batch.to_pylist():
            row += 1
            value = record.pop(text_field)
            if isinstance(value, str):
                yield row, value, None, record or None
            else:
                kind = "null" if value is None else type(value).__name__
                yield row, "", f"column {text_field!r} is {kind}, not a string", None
