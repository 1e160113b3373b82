"""The store's declared Arrow schemas: the Parquet files, and the types of record fields.

Data files hold no model or run column: those come from the manifest entry that commits
the file (see `sql`), so a store reads the same wherever it is and whatever its path.
Schema version 2 differs from 1 in its JSON records only (settings nested per settings
class, a weights fingerprint, checksums in manifest entries). Version 3 (this one) adds the
nullable `kl_to_final` column to the entropy rows, a top-tokens file per part (runs with
top_tokens > 0), a vocabulary file per run, and prompt metadata: the nullable `metadata`
column (JSON text) of prompts parts and the `metadata_fields` of manifest entries (see
`store.metadata`). Version-1 and -2 stores stay readable: their entropy files lack
`kl_to_final` and their prompts `metadata`, which read as null.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any

import pyarrow as pa

from entropy_fast.store.records import SCHEMA_VERSION

_VERSION = {"entropy_fast.schema_version": str(SCHEMA_VERSION)}

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
        ("kl_to_final", pa.float32()),
    ],
    metadata=_VERSION,
)
"""One row per (prompt, pos, layer, alpha). `layer` is the hidden-state index (0 = the
embedding output, L = the last block); the last four columns are nullable."""

TOP_TOKENS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int32()),
        ("pos", pa.int32()),
        ("layer", pa.int16()),
        ("rank", pa.int16()),
        ("token_id", pa.int32()),
        ("prob", pa.float32()),
    ],
    metadata=_VERSION,
)
"""One row per (prompt, pos, layer, rank) of a run with top_tokens = K > 0: the lens's K
most probable tokens (rank 0 = the most probable; ties: lower token id first)."""

VOCAB_SCHEMA = pa.schema([("token_id", pa.int32()), ("text", pa.string())],
                         metadata=_VERSION)
"""One row per token id of a run's model: the text the tokenizer decodes it to, alone."""

KEY_COLUMNS = ("prompt_id", "pos", "token_id", "layer", "alpha")

PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int32()),
        ("text", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("source", pa.string()),
        ("source_line", pa.int32()),
        ("metadata", pa.string()),
    ],
    metadata=_VERSION,
)
"""One row per profiled prompt; n_tokens is the number of profile rows (tokens); metadata
is the JSON text of the corpus record's other fields (version 3; see `store.metadata`)."""

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
    metadata=_VERSION,
)
"""One row per prompt of a generation stage; continuation_text is decoded for humans only
(profiling reads continuation_token_ids and never re-tokenizes it)."""

_SCALARS = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def arrow_type(hint: Any) -> pa.DataType:
    """The Arrow type of a record field's type hint (X | None is nullable X; a dict is
    stored as its JSON text)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return arrow_type(inner)
    if origin in (tuple, list):
        return pa.list_(arrow_type(typing.get_args(hint)[0]))
    if origin is dict or hint is dict:
        return pa.string()
    return _SCALARS[hint]


def flat_fields(cls: type) -> list[tuple[str, Any]]:
    """(name, type hint) of a record dataclass, nested settings dataclasses flattened into
    their own fields (their names are unique across a record)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        hint = hints[f.name]
        if is_dataclass(hint):
            out.extend(flat_fields(hint))
        else:
            out.append((f.name, hint))
    names = [name for name, _ in out]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}: flattened field names collide: {names}")
    return out


def record_schema(cls: type) -> pa.Schema:
    """The Arrow schema of a record dataclass, one column per (flattened) field."""
    return pa.schema([(name, arrow_type(hint)) for name, hint in flat_fields(cls)])
