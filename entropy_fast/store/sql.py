"""DuckDB over a profile store: views, macros and the named queries of queries/*.sql.

`ProfileStore` is a DuckDB connection whose views see the committed files of a store
only; `NamedQuery` is a SQL file with declared, typed parameters that are always bound,
never pasted into the SQL text.

Views: `entropy` (one row per token, layer, alpha), `prompts`, `runs` (one row per run
shard, its settings flattened into columns), `manifest` (committed parts),
`continuations` (stored generation stages, one row per prompt), `generations` (one row per
generation shard), `prompt_profile` (per-prompt mean profile), `model_layers` and
`layer_map` (layer matching between models). Macros: `hist_bin`, `jsd_term`, `jsd_layers`,
`w1_layers` and the sample selectors (queries/_macros.sql).

Model and run of every row come from the manifest entry that committed its file, never
from the file's path, and file paths reach DuckDB with their glob characters escaped, so
a store reads the same wherever it lives. The `runs`, `generations` and `manifest` views
take their columns from the record classes, so a new record field is a new column.

A named query file starts with comment lines: the first is its description, then one
``-- @param NAME TYPE [= DEFAULT] [: help]`` per parameter (TYPE one of VARCHAR,
DOUBLE, INTEGER, VARCHAR[], INTEGER[]; no default = required).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from entropy_fast.errors import EntropyFastError, MissingDependencyError
from entropy_fast.store.errors import StoreError
from entropy_fast.store.layout import GENERATION, Store
from entropy_fast.store.records import GenerationEntry, GenerationInfo, ManifestEntry, RunInfo
from entropy_fast.store.schema import (
    CONTINUATIONS_SCHEMA,
    ENTROPY_SCHEMA,
    PROMPTS_SCHEMA,
    record_schema,
)
from entropy_fast.store.verify import damaged_runs

_PARAM = re.compile(
    r"^--\s*@param\s+(?P<name>\w+)\s+(?P<type>[A-Z]+(?:\[\])?)"
    r"(?:\s*=\s*(?P<default>'[^']*'|[^\s:]+))?\s*(?::\s*(?P<help>.*))?$")
_SCALARS = {"VARCHAR": str, "DOUBLE": float, "INTEGER": int}
_DUCK_TYPES = {pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.float32(): "FLOAT",
               pa.float64(): "DOUBLE", pa.string(): "VARCHAR",
               pa.list_(pa.int32()): "INTEGER[]"}
OUTPUTS = ("arrow", "numpy", "pandas")


class QueryError(EntropyFastError, ValueError):
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
            raise QueryError(f"query {self.name} needs {', '.join(missing)}",
                             f"e.g. --param {missing[0]}=...")
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


def glob_literal(path: Path | str) -> str:
    """`path` as a DuckDB string literal that its glob expansion matches literally."""
    escaped = "".join(f"[{c}]" if c in "*?[" else c for c in str(path))
    return "'" + escaped.replace("'", "''") + "'"


def sql_literal(text: str) -> str:
    """A SQL string literal of `text` (quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


class ProfileStore:
    """A DuckDB connection over the committed files of a profile store.

    The views are a snapshot of the manifest taken at open (and at `refresh()`): files
    committed later, and files that were never committed, are not seen. Every committed
    file is checked against the size and sha256 recorded at commit, each file once (see
    `store.verify`); a run with a missing or damaged file is left out of the views with a
    warning (see `damaged`), so the other runs stay queryable and none reads wrong.

    Args:
        path: the store directory.
        threads, memory_limit: DuckDB settings (default: DuckDB's own).
        restricted: lock the connection to the store: no file outside it can be read or
            written by SQL (for SQL that comes from someone else: a notebook server, a web
            page). See docs/store.md.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None,
                 memory_limit: str | None = None, restricted: bool = False) -> None:
        self.store = Store(path)
        config: dict[str, Any] = {}
        if threads:
            config["threads"] = threads
        if memory_limit:
            config["memory_limit"] = memory_limit
        self.con = duckdb.connect(":memory:", config=config)
        self.damaged: dict[str, list[str]] = {}
        self.refresh()
        if restricted:
            self._restrict()

    def _restrict(self) -> None:
        root = str(self.store.root.resolve())
        self.con.execute(f"SET allowed_directories = [{sql_literal(root)}]")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    def refresh(self) -> None:
        """(Re)build the views from the store's current manifest and run records."""
        root = self.store.root.resolve()
        entries = self.store.manifest()
        generated = self.store.entries(GENERATION)
        self.damaged = damaged_runs(self.store, [*entries, *generated])
        if self.damaged:
            warnings.warn(
                f"{self.store.root}: runs {', '.join(sorted(self.damaged))} have missing or "
                "damaged files and are left out of the views; run `entropy-fast check "
                "--repair` on the store", stacklevel=2)
        entries = [e for e in entries if e.run_id not in self.damaged]
        generated = [e for e in generated if e.run_id not in self.damaged]
        self._file_view("entropy", ENTROPY_SCHEMA, root, entries, "entropy_file")
        self._file_view("prompts", PROMPTS_SCHEMA, root, entries, "prompts_file")
        self._file_view("continuations", CONTINUATIONS_SCHEMA, root, generated,
                        "continuations_file")
        self.con.register("runs", _records_table(self.store.runs(), RunInfo))
        self.con.register("generations", _records_table(self.store.generations(),
                                                        GenerationInfo))
        self.con.register("manifest", _entries_table(entries, ManifestEntry))
        self.con.register("generation_manifest", _entries_table(generated, GenerationEntry))
        self.con.execute(_macros_sql())

    def _file_view(self, name: str, schema: pa.Schema, root: Path, entries: Sequence[Any],
                   attr: str) -> None:
        """A view over the files `attr` of `entries`: one scan per run, with the run's
        model and id as constants (DuckDB drops the scans a filter on them excludes)."""
        columns = ", ".join(f.name for f in schema)
        by_run: dict[tuple[str, str], list[str]] = defaultdict(list)
        for e in entries:
            by_run[e.model, e.run_id].append(glob_literal(root / getattr(e, attr)))
        scans = [f"SELECT {sql_literal(model)} AS model, {sql_literal(run)} AS run_id, "
                 f"{columns} FROM read_parquet([{', '.join(paths)}])"
                 for (model, run), paths in sorted(by_run.items())]
        if not scans:
            typed = ", ".join(f"NULL::{_DUCK_TYPES[f.type]} AS {f.name}" for f in schema)
            scans = [f"SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS run_id, {typed} "
                     "WHERE false"]
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {' UNION ALL '.join(scans)}")

    def sql(self, query: str, params: dict[str, Any] | None = None, *,
            output: str = "arrow") -> Any:
        """Run SQL with bound `$name` parameters; a pa.Table (or numpy dict / DataFrame)."""
        if output not in OUTPUTS:
            raise QueryError(f"output must be one of {OUTPUTS}, got {output!r}")
        if output == "pandas":
            _require_pandas()
        try:
            relation = self.con.sql(query, params=params or None)
            if relation is None:
                return pa.table({})
            if output == "numpy":
                return relation.fetchnumpy()
            if output == "pandas":
                return relation.df()
            return relation.to_arrow_table()
        except duckdb.IOException as err:
            raise StoreError(f"{self.store.root}: a committed file is unreadable "
                             f"({str(err).strip().splitlines()[0]})",
                             "run `entropy-fast check` on the store") from err
        except duckdb.Error as err:
            raise QueryError(str(err).strip().splitlines()[0]) from err

    def query(self, name: str, *, output: str = "arrow", **params: Any) -> Any:
        """Run the named query `name` with its parameters (see `named_queries()`)."""
        queries = named_queries()
        if name not in queries:
            raise QueryError(f"unknown query {name!r}",
                             f"named queries: {', '.join(queries)}")
        named = queries[name]
        return self.sql(named.sql, named.bind(params), output=output)

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.con.close()

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _require_pandas() -> None:
    import importlib.util

    if importlib.util.find_spec("pandas") is None:
        raise MissingDependencyError("output='pandas' needs pandas, which is not installed",
                                     "pip install pandas, or use output='arrow' (the "
                                     "default; .to_pylist()) or output='numpy'")


def _records_table(records: Sequence[Any], kind: type) -> pa.Table:
    """Run records as a table, one flattened column per record field."""
    schema = record_schema(kind)
    return pa.Table.from_pylist([r.flat() for r in records], schema=schema)


def _entries_table(entries: Sequence[Any], kind: type) -> pa.Table:
    """Manifest entries as a table (dict fields as JSON text)."""
    schema = record_schema(kind)
    rows = [{k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
             for k, v in asdict(e).items()} for e in entries]
    return pa.Table.from_pylist(rows, schema=schema)


__all__ = ["OUTPUTS", "NamedQuery", "ProfileStore", "QueryError", "QueryParam",
           "named_queries"]
