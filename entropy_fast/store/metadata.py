"""Prompt metadata in the store: the corpus fields beside the text, as JSON and as columns.

A corpus record's other fields (`corpus.Prompt.metadata`: .jsonl keys, Parquet columns)
are stored with the prompt as one JSON object text, the nullable `metadata` column of
prompts parts (schema version 3). Each part's manifest entry lists the fields its prompts
hold with a SQL type (`field_types`), so a reader knows every field of a store without
reading a file, and the `prompts` view adds one typed column per field (`view_columns`):

    all values booleans -> BOOLEAN, integers -> BIGINT, integers and floats -> DOUBLE,
    strings -> VARCHAR, lists or objects -> JSON; any other mix -> VARCHAR (the values'
    text). Nulls and absent keys are NULL.

A field whose name is a column of the view already (text, source, model, ...; DuckDB
compares names case-insensitively), or that holds a double quote, gets no column of its
own: it stays in `metadata` (`json_extract(metadata, ...)` reads it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

METADATA_COLUMN = "metadata"
_JSON_TYPE = "JSON"
_NUMBERS = {"BIGINT", "DOUBLE"}


def encode(metadata: Mapping[str, Any] | None) -> str | None:
    """The JSON text of a prompt's metadata (keys sorted), or None when it has none.

    Non-finite floats become null (JSON has no NaN); values JSON cannot hold (dates,
    decimals from a Parquet corpus) are stored as their text.
    """
    if not metadata:
        return None
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v
             for k, v in metadata.items()}
    return json.dumps(clean, sort_keys=True, default=str, ensure_ascii=False)


def decode(text: str | None) -> dict[str, Any] | None:
    """Inverse of `encode`."""
    return None if text is None else json.loads(text)


def field_types(metadata: Iterable[Mapping[str, Any] | None]) -> dict[str, str]:
    """{field: SQL type} of the fields some of the prompts' metadata hold (see module)."""
    seen: dict[str, set[str]] = {}
    for record in metadata:
        for key, value in (record or {}).items():
            kinds = seen.setdefault(key, set())
            if value is not None:
                kinds.add(_value_type(value))
    return {key: _merge(kinds) for key, kinds in sorted(seen.items())}


def merge_types(per_part: Iterable[Mapping[str, str] | None]) -> dict[str, str]:
    """The types of `field_types` over several parts merged into one per field."""
    seen: dict[str, set[str]] = {}
    for types in per_part:
        for key, kind in (types or {}).items():
            seen.setdefault(key, set()).add(kind)
    return {key: _merge(kinds) for key, kinds in sorted(seen.items())}


def view_columns(types: Mapping[str, str], taken: Iterable[str]) -> list[str]:
    """SELECT expressions, one typed column per field, over the `metadata` column; fields
    named like a column in `taken` (or each other, case aside) are left out."""
    used = {name.lower() for name in taken}
    columns = []
    for key, kind in types.items():
        if '"' in key or key.lower() in used:
            continue
        used.add(key.lower())
        path = "'$.\"" + key.replace("'", "''") + "\"'"
        if kind == "VARCHAR":
            expression = f"{METADATA_COLUMN} ->> {path}"
        elif kind == _JSON_TYPE:
            expression = f"{METADATA_COLUMN} -> {path}"
        else:
            expression = f"TRY_CAST({METADATA_COLUMN} ->> {path} AS {kind})"
        columns.append(f'{expression} AS "{key}"')
    return columns


def _value_type(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "BOOLEAN"
    if isinstance(value, int):
        return "BIGINT"
    if isinstance(value, float):
        return "DOUBLE"
    if isinstance(value, (list, dict)):
        return _JSON_TYPE
    return "VARCHAR"


def _merge(kinds: set[str]) -> str:
    if len(kinds) == 1:
        return next(iter(kinds))
    if kinds and kinds <= _NUMBERS:
        return "DOUBLE"
    return "VARCHAR"
