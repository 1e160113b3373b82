"""DuckDB over a profile store: views, macros and the named queries of queries/*.sql.

This module owns `ProfileStore` (a DuckDB connection whose views see the committed files
of a store only) and `NamedQuery` (a SQL file with declared, typed parameters that are
always bound, never pasted into the SQL text).

Views: `entropy` (one row per token, layer, alpha), `prompts`, `runs` (one row per run
shard), `manifest` (committed parts), `continuations` (stored generation stages, one row
per prompt), `generations` (one row per generation shard), `prompt_profile` (per-prompt
mean profile),
`model_layers` and `layer_map` (layer matching between models). Macros: `hist_bin`,
`jsd_term`, `jsd_layers`, `w1_layers` and the sample selectors (queries/_macros.sql).

A named query file starts with comment lines: the first is its description, then one
``-- @param NAME TYPE [= DEFAULT] [: help]`` per parameter (TYPE one of VARCHAR,
DOUBLE, INTEGER, VARCHAR[], INTEGER[]; no default = required).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from entropy_fast.store import (
    CONTINUATIONS_SCHEMA,
    ENTROPY_SCHEMA,
    GENERATION,
    PROFILE,
    PROMPTS_SCHEMA,
    Stage,
    Store,
    StoreError,
)

_PARAM = re.compile(
    r"^--\s*@param\s+(?P<name>\w+)\s+(?P<type>[A-Z]+(?:\[\])?)"
    r"(?:\s*=\s*(?P<default>'[^']*'|[^\s:]+))?\s*(?::\s*(?P<help>.*))?$")
_SCALARS = {"VARCHAR": str, "DOUBLE": float, "INTEGER": int}
_DUCK_TYPES = {pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.float32(): "FLOAT",
               pa.float64(): "DOUBLE", pa.string(): "VARCHAR",
               pa.list_(pa.int32()): "INTEGER[]"}
OUTPUTS = ("arrow", "numpy", "pandas")


class QueryError(ValueError):
    """An unknown query or parameter, a bad parameter value, or an error from DuckDB."""


@dataclass(frozen=True)
class QueryParam:
    """One declared parameter of a named query."""

    name: str
    type: str
    default: Any
    required: bool
    help: str

    def convert(self, value: Any) -> Any:
        """`value` (a Python value, or a string from the command line) as this type."""
        if value is None:
            return None
        base = _SCALARS[self.type.removesuffix("[]")]
        if self.type.endswith("[]"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return [self._scalar(base, item) for item in items]
        return self._scalar(base, value)

    def _scalar(self, base: type, value: Any) -> Any:
        try:
            return base(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise QueryError(
                f"parameter {self.name} must be {self.type}, got {value!r}") from None


@dataclass(frozen=True)
class NamedQuery:
    """A query of queries/*.sql: name, description, declared parameters and SQL text."""

    name: str
    description: str
    params: tuple[QueryParam, ...]
    sql: str

    @classmethod
    def parse(cls, name: str, text: str) -> NamedQuery:
        """Read the header comments (description, @param lines) of a query file."""
        header = [line for line in text.splitlines() if line.startswith("--")]
        description = header[0].lstrip("- ").strip() if header else ""
        params = []
        for line in header[1:]:
            match = _PARAM.match(line)
            if match is None:
                continue
            kind, default = match["type"], match["default"]
            if kind.removesuffix("[]") not in _SCALARS:
                raise QueryError(f"query {name}: unknown parameter type {kind}")
            param = QueryParam(match["name"], kind, None, default is None, match["help"] or "")
            if default not in (None, "NULL"):
                param = replace(param, default=param.convert(default.strip("'")))
            params.append(param)
        return cls(name, description, tuple(params), text)

    def bind(self, values: dict[str, Any]) -> dict[str, Any]:
        """Every declared parameter's value: given (converted), else the default."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise QueryError(f"query {self.name} has no parameter {', '.join(unknown)}; "
                             f"its parameters: {', '.join(known) or 'none'}")
        missing = [p.name for p in self.params if p.required and values.get(p.name) is None]
        if missing:
            raise QueryError(f"query {self.name} needs {', '.join(missing)} "
                             f"(e.g. --param {missing[0]}=...)")
        return {p.name: p.convert(values[p.name]) if p.name in values else p.default
                for p in self.params}


@cache
def named_queries() -> dict[str, NamedQuery]:
    """The named queries shipped in entropy_fast.queries, by name."""
    folder = files("entropy_fast.queries")
    return {
        entry.name.removesuffix(".sql"): NamedQuery.parse(entry.name.removesuffix(".sql"),
                                                          entry.read_text(encoding="utf-8"))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".sql") and not entry.name.startswith("_")
    }


def _macros_sql() -> str:
    return files("entropy_fast.queries").joinpath("_macros.sql").read_text(encoding="utf-8")


class ProfileStore:
    """A DuckDB connection over the committed files of a profile store.

    The views are a snapshot of the manifest taken at open (and at `refresh()`): files
    committed later, and files that were never committed, are not seen.

    Args:
        path: the store directory.
        threads, memory_limit: DuckDB settings (default: DuckDB's own).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None,
                 memory_limit: str | None = None) -> None:
        self.store = Store(path)
        config: dict[str, Any] = {}
        if threads:
            config["threads"] = threads
        if memory_limit:
            config["memory_limit"] = memory_limit
        self.con = duckdb.connect(":memory:", config=config)
        self.refresh()

    def refresh(self) -> None:
        """(Re)build the views from the store's current manifest and run records."""
        entries = self.store.manifest()
        root = self.store.root.resolve()
        self._file_view("entropy", ENTROPY_SCHEMA, [root / e.entropy_file for e in entries])
        self._file_view("prompts", PROMPTS_SCHEMA, [root / e.prompts_file for e in entries])
        generated = self.store.entries(GENERATION)
        self._file_view("continuations", CONTINUATIONS_SCHEMA,
                        [root / e.continuations_file for e in generated])
        self.con.register("runs", _records_table(self.store.runs(), _RUNS_SCHEMA))
        self.con.register("generations",
                          _records_table(self.store.generations(), _GENERATIONS_SCHEMA))
        self.con.register("manifest", pa.Table.from_pylist([vars(e) for e in entries],
                                                           schema=_MANIFEST_SCHEMA))
        self.con.execute(_macros_sql())

    def _file_view(self, name: str, schema: pa.Schema, paths: list[Path]) -> None:
        columns = ", ".join(f.name for f in schema)
        if paths:
            listed = ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths)
            source = (f"read_parquet([{listed}], hive_partitioning = true, "
                      "hive_types = {'model': VARCHAR, 'run': VARCHAR})")
            select = f"SELECT model, run AS run_id, {columns} FROM {source}"
        else:
            typed = ", ".join(f"NULL::{_DUCK_TYPES[f.type]} AS {f.name}" for f in schema)
            select = f"SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS run_id, {typed} WHERE false"
        try:
            self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {select}")
        except duckdb.IOException as err:
            raise StoreError(f"{self.store.root}: a committed file is missing or unreadable "
                             f"({str(err).splitlines()[0]}); run `entropy-fast check` on it"
                             ) from err

    def sql(self, query: str, params: dict[str, Any] | None = None, *,
            output: str = "arrow") -> Any:
        """Run SQL with bound `$name` parameters; a pa.Table (or numpy dict / DataFrame)."""
        if output not in OUTPUTS:
            raise QueryError(f"output must be one of {OUTPUTS}, got {output!r}")
        try:
            relation = self.con.sql(query, params=params or None)
            if relation is None:
                return pa.table({})
            if output == "numpy":
                return relation.fetchnumpy()
            if output == "pandas":
                return relation.df()
            return relation.to_arrow_table()
        except duckdb.Error as err:  # SQL errors, and output="pandas" without pandas
            raise QueryError(str(err).strip().splitlines()[0]) from err

    def query(self, name: str, *, output: str = "arrow", **params: Any) -> Any:
        """Run the named query `name` with its parameters (see `named_queries()`)."""
        queries = named_queries()
        if name not in queries:
            raise QueryError(f"unknown query {name!r}; named queries: {', '.join(queries)}")
        named = queries[name]
        return self.sql(named.sql, named.bind(params), output=output)

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.con.close()

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_RUNS_SCHEMA = pa.schema([
    ("model", pa.string()), ("run_id", pa.string()), ("shard", pa.int32()),
    ("n_shards", pa.int32()), ("status", pa.string()), ("corpus", pa.string()),
    ("corpus_sha256", pa.string()), ("n_prompts", pa.int64()),
    ("alphas", pa.list_(pa.float64())), ("layer_stride", pa.int32()),
    ("layer_indices", pa.list_(pa.int16())), ("max_new_tokens", pa.int32()),
    ("dtype", pa.string()), ("generator", pa.string()), ("revision", pa.string()),
    ("settings", pa.string()), ("error", pa.string()), ("tool_version", pa.string()),
    ("schema_version", pa.int32()), ("created_at", pa.string()), ("updated_at", pa.string()),
])
"""The `runs` view: one row per run shard; settings as a JSON string."""

_MANIFEST_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("model", pa.string()), ("shard", pa.int32()),
    ("n_shards", pa.int32()), ("seq", pa.int32()), ("entropy_file", pa.string()),
    ("prompts_file", pa.string()), ("n_rows", pa.int64()), ("n_prompts", pa.int64()),
    ("n_tokens", pa.int64()), ("n_nan", pa.int64()), ("n_inf", pa.int64()),
    ("prompt_ids", pa.list_(pa.int32())), ("committed_at", pa.string()),
])
"""The `manifest` view: one row per committed part."""


_GENERATIONS_SCHEMA = pa.schema([
    f for f in _RUNS_SCHEMA if f.name not in ("alphas", "layer_stride", "layer_indices")])
"""The `generations` view: one row per generation-stage shard; settings as JSON."""


def _records_table(infos: list[Any], schema: pa.Schema) -> pa.Table:
    """Run records as a table of `schema` (settings as a JSON string)."""
    records = []
    for info in infos:
        record = info.to_json()
        record["settings"] = json.dumps(record["settings"], sort_keys=True)
        records.append({f.name: record[f.name] for f in schema})
    return pa.Table.from_pylist(records, schema=schema)


def check_store(path: str | Path) -> tuple[list[str], list[str]]:
    """Validate a store: (problems, notes), each a list of one-line messages.

    Problems: committed files missing, unreadable or with other row counts than the
    manifest says, parts without a run record, a prompt committed twice (for profile runs
    and generation stages alike), a generation part whose token count differs from its
    manifest entry, and (when the files are sound) every failed check of the `integrity`
    query. Notes: uncommitted files (harmless; the next writer of that shard removes
    them) and runs not complete.
    """
    store = Store(path)
    problems = [*_check_files(store, PROFILE), *_check_files(store, GENERATION)]
    if not problems:
        problems = _check_generated_tokens(store)
    notes = [*_uncommitted_notes(store, PROFILE), *_uncommitted_notes(store, GENERATION)]
    notes += [f"{stage.name} run {r.run_id} shard {r.shard_key} ({r.model}) is {r.status}"
              + (f" ({r.error})" if r.error else "") + "; run it again to finish it"
              for stage in (PROFILE, GENERATION) for r in store.records(stage)
              if r.status != "complete"]
    if not problems:
        with ProfileStore(path) as db:
            problems = [_integrity_problem(row) for row in db.query("integrity").to_pylist()
                        if not row["ok"]]
    return problems, notes


def _check_files(store: Store, stage: Stage) -> list[str]:
    """Manifest against files: existence, readability, row counts, run records, overlaps."""
    problems = []
    shards = {(r.run_id, r.shard) for r in store.records(stage)}
    seen: dict[tuple[str, int], str] = {}
    for entry in store.entries(stage):
        first_file = next(iter(entry.files))
        if (entry.run_id, entry.shard) not in shards:
            problems.append(f"part {first_file} has no run record ({stage.records}/"
                            f"{entry.run_id}.s{entry.shard}of{entry.n_shards}.json)")
        for relative, expected in entry.files.items():
            problem = _file_problem(store.root / relative, expected)
            if problem:
                problems.append(f"{relative}: {problem}")
        for prompt_id in entry.prompt_ids:
            first = seen.setdefault((entry.run_id, prompt_id), first_file)
            if first != first_file:
                problems.append(f"{stage.name} run {entry.run_id}: prompt {prompt_id} is "
                                f"committed in both {first} and {first_file}")
    return problems


def _check_generated_tokens(store: Store) -> list[str]:
    """Each generation part's prompt ids and token count against its manifest entry."""
    problems = []
    for entry in store.entries(GENERATION):
        table = pq.read_table(store.root / entry.continuations_file,
                              columns=["prompt_id", "continuation_token_ids"])
        ids = sorted(table.column("prompt_id").to_pylist())
        n_tokens = sum(len(c) for c in table.column("continuation_token_ids").to_pylist())
        if ids != list(entry.prompt_ids) or n_tokens != entry.n_tokens:
            problems.append(f"{entry.continuations_file}: prompts {ids[:5]}... and "
                            f"{n_tokens} tokens, the manifest says {list(entry.prompt_ids)[:5]}"
                            f"... and {entry.n_tokens}")
    return problems


def _file_problem(path: Path, expected_rows: int) -> str | None:
    if not path.is_file():
        return "committed in the manifest but missing"
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as err:
        return f"unreadable ({err})"
    return None if rows == expected_rows else f"{rows} rows, the manifest says {expected_rows}"


def _uncommitted_notes(store: Store, stage: Stage) -> list[str]:
    committed = {f for e in store.entries(stage) for f in e.files}
    stray = [p for folder in stage.data for p in (store.root / folder).rglob("*")
             if p.is_file() and str(p.relative_to(store.root)) not in committed]
    if not stray:
        return []
    return [f"{len(stray)} uncommitted file(s), e.g. {stray[0].relative_to(store.root)}: left "
            "by an interrupted writer; readers ignore them and the next run of that shard "
            "deletes them"]


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
