"""DuckDB over a profile store: `ProfileStore`, a connection whose views see the committed
files of a store only, and runs its SQL and named queries.

Views: `entropy` (one row per token, layer, alpha), `prompts` (with a column per prompt
metadata field, see `store.metadata`), `top_tokens` (one row per token, layer and rank, for
runs with top tokens), `vocab` (token id -> text, per run), `runs` (one row per run
shard, its settings flattened into columns), `manifest` (committed parts),
`continuations` (stored generation stages, one row per prompt), `generations` (one row per
generation shard), `prompt_profile` (per-prompt mean profile), `model_layers` and
`layer_map` (layer matching between models), `run_layers` and `run_layer_map` (the same
between runs). Profiles come back as objects through `profiles` and `aggregated`, for the
runs a `RunSelection` (store.selection) chooses. Macros: `hist_bin`, `jsd_term`, `jsd_layers`,
`w1_layers` and the sample selectors (queries/_macros.sql). The named queries themselves
are parsed in `store.queries`.

Model and run of every row come from the manifest entry that committed its file, never
from the file's path, and file paths reach DuckDB with their glob characters escaped, so
a store reads the same wherever it lives. The `runs`, `generations` and `manifest` views
take their columns from the record classes, so a new record field is a new column.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from entropy_fast.errors import MissingDependencyError
from entropy_fast.store.errors import StoreError
from entropy_fast.store.layout import GENERATION, Store
from entropy_fast.store.metadata import merge_types, view_columns
from entropy_fast.store.queries import NamedQuery, QueryError, macros_sql, named_queries
from entropy_fast.store.records import GenerationEntry, GenerationInfo, ManifestEntry, RunInfo
from entropy_fast.store.schema import (
    CONTINUATIONS_SCHEMA,
    ENTROPY_SCHEMA,
    PROMPTS_SCHEMA,
    TOP_TOKENS_SCHEMA,
    VOCAB_SCHEMA,
    record_schema,
)
from entropy_fast.store.selection import RunSelection, SelectedRun
from entropy_fast.store.verify import report_damage, sha256_file

log = logging.getLogger("entropy_fast")

_DUCK_TYPES = {pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.float32(): "FLOAT",
               pa.float64(): "DOUBLE", pa.string(): "VARCHAR",
               pa.list_(pa.int32()): "INTEGER[]"}
OUTPUTS = ("arrow", "numpy", "pandas")


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
    one-line warning on the `entropy_fast` logger (see `damaged`), so the other runs stay
    queryable and none reads wrong.

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
        self.damaged = report_damage(self.store, [*entries, *generated])
        entries = [e for e in entries if e.run_id not in self.damaged]
        generated = [e for e in generated if e.run_id not in self.damaged]
        self._file_view("entropy", ENTROPY_SCHEMA, root, entries, "entropy_file", lenient=True)
        fields = merge_types(e.metadata_fields for e in entries)
        self._file_view("prompts", PROMPTS_SCHEMA, root, entries, "prompts_file",
                        lenient=True, derived=view_columns(
                            fields, ["model", "run_id", *PROMPTS_SCHEMA.names]))
        self._file_view("top_tokens", TOP_TOKENS_SCHEMA, root,
                        [e for e in entries if e.top_tokens_file is not None], "top_tokens_file")
        self._vocab_view(root)
        self._file_view("continuations", CONTINUATIONS_SCHEMA, root, generated,
                        "continuations_file")
        self.con.register("runs", _records_table(self.store.runs(), RunInfo))
        self.con.register("generations", _records_table(self.store.generations(),
                                                        GenerationInfo))
        self.con.register("manifest", _entries_table(entries, ManifestEntry))
        self.con.register("generation_manifest", _entries_table(generated, GenerationEntry))
        self.con.execute(macros_sql())

    def _file_view(self, name: str, schema: pa.Schema, root: Path, entries: Sequence[Any],
                   attr: str, *, lenient: bool = False, derived: Sequence[str] = ()) -> None:
        """A view over the files `attr` of `entries`: one scan per run, with the run's
        model and id as constants (DuckDB drops the scans a filter on them excludes).

        lenient: columns of `schema` that files of older schema versions lack read as
        NULL. derived: SELECT expressions over the columns, added after them."""
        columns = ", ".join(f.name for f in schema)
        typed = ", ".join(f"NULL::{_DUCK_TYPES[f.type]} AS {f.name}" for f in schema)
        by_run: dict[tuple[str, str], list[str]] = defaultdict(list)
        for e in entries:
            by_run[e.model, e.run_id].append(glob_literal(root / getattr(e, attr)))
        scans = []
        for (model, run), paths in sorted(by_run.items()):
            source = f"read_parquet([{', '.join(paths)}])"
            if lenient:  # by name, after an empty relation of every column: missing = NULL
                source = (f"(SELECT {typed} WHERE false UNION ALL BY NAME SELECT * FROM "
                          f"read_parquet([{', '.join(paths)}], union_by_name = true))")
            scans.append(f"SELECT {sql_literal(model)} AS model, {sql_literal(run)} AS "
                         f"run_id, {columns} FROM {source}")
        self._create_view(name, schema, scans, derived)

    def _vocab_view(self, root: Path) -> None:
        """`vocab`: (model, run_id, token_id, text) of every run whose vocabulary file is
        intact (checked against its sha256; a damaged one is left out with a warning)."""
        files = {}
        for info in self.store.runs():
            if info.vocab_file is not None and info.run_id not in files:
                files[info.run_id] = info
        scans = []
        for run, info in sorted(files.items()):
            path = root / info.vocab_file
            if not path.exists() or sha256_file(path) != info.vocab_sha256:
                log.warning("%s: the vocabulary of run %s is missing or damaged; the vocab "
                            "view leaves it out (rerun the run to rewrite it)", root, run)
                continue
            scans.append(f"SELECT {sql_literal(info.model)} AS model, {sql_literal(run)} AS "
                         f"run_id, token_id, text FROM read_parquet({glob_literal(path)})")
        self._create_view("vocab", VOCAB_SCHEMA, scans)

    def _create_view(self, name: str, schema: pa.Schema, scans: list[str],
                     derived: Sequence[str] = ()) -> None:
        """The view `name`: the union of `scans` (an empty typed relation without any),
        with the `derived` expressions as further columns."""
        if not scans:
            typed = ", ".join(f"NULL::{_DUCK_TYPES[f.type]} AS {f.name}" for f in schema)
            scans = [f"SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS run_id, {typed} "
                     "WHERE false"]
        body = " UNION ALL ".join(scans)
        if derived:
            body = f"SELECT *, {', '.join(derived)} FROM ({body})"
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")

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
        """Run the named query `name` with its parameters (see `named_queries()`); a model
        or run id the store has no run of is a QueryError listing those it has."""
        queries = named_queries()
        if name not in queries:
            raise QueryError(f"unknown query {name!r}",
                             f"named queries: {', '.join(queries)}")
        named = queries[name]
        values = named.bind(params)
        self._check_names(named, values)
        return self.sql(named.sql, values, output=output)

    def _check_names(self, named: NamedQuery, values: dict[str, Any]) -> None:
        """Refuse a model or run id the store has no run of: the query would answer with
        no rows, which reads as "nothing there" where the name is a typo."""
        asked = {p: values[p.name] for p in named.params
                 if p.names is not None and values[p.name] is not None}
        if not asked:
            return
        model_of = {r.run_id: r.model for r in self.store.runs()}
        known = {"model": sorted(set(model_of.values())), "run": sorted(model_of)}
        for param, value in asked.items():
            unknown = [v for v in (value if isinstance(value, list) else [value])
                       if v not in known[param.names]]
            if unknown:
                listed = (known["model"] if param.names == "model" else
                          [f"{run} ({model_of[run]})" for run in known["run"]])
                raise QueryError(
                    f"{self.store.root}: {param.names} {', '.join(map(repr, unknown))} "
                    f"(parameter {param.name}) is not in the store",
                    f"{param.names}s in the store: {_listing(listed)}")

    # -- profiles back from the store ---------------------------------------------------

    def select(self, selection: RunSelection | None = None, **criteria: Any,
               ) -> list[SelectedRun]:
        """The runs a `RunSelection` (or its fields as keywords: models, runs, mode, alpha,
        where, latest) chooses among the readable runs, labelled; by default the latest
        complete run of each model and settings."""
        selection = RunSelection.of(selection, criteria)
        return selection.select(r for r in self.store.runs() if r.run_id not in self.damaged)

    def profiles(self, selection: RunSelection | None = None, *,
                 prompt_ids: Collection[int] | None = None, skip_positions: int = 0,
                 **criteria: Any) -> dict[str, list[Any]]:
        """{run label: [EntropyProfile, ...] by prompt id} of the runs `select` chooses.

        Each profile carries every alpha of its run; the primary one is the selection's
        `alpha` (default: the run's first). `prompt_ids`: only these prompts;
        `skip_positions=N` leaves the first N rows of each prompt out
        (`EntropyProfile.drop_positions`); a prompt with no row left is left out.
        """
        found = self.aggregated(selection, prompt_ids=prompt_ids,
                                skip_positions=skip_positions, **criteria)
        return {label: agg.profiles for label, agg in found.items()}

    def aggregated(self, selection: RunSelection | None = None, *,
                   prompt_ids: Collection[int] | None = None, skip_positions: int = 0,
                   **criteria: Any) -> dict[str, Any]:
        """{run label: AggregatedProfile} of the runs `select` chooses, arguments as
        `profiles` (its mean_profile weighs each prompt the same; `.pooled()` each token)."""
        selection = RunSelection.of(selection, criteria)
        return self.read(self.select(selection), alpha=selection.alpha,
                         prompt_ids=prompt_ids, skip_positions=skip_positions)

    def read(self, runs: Sequence[SelectedRun], *, alpha: float | None = None,
             prompt_ids: Collection[int] | None = None, skip_positions: int = 0,
             ) -> dict[str, Any]:
        """{run label: AggregatedProfile} of runs that `select` returned (by prompt id);
        arguments as `profiles`."""
        from entropy_fast.profile import AggregatedProfile
        from entropy_fast.store.codec import read_profiles

        if isinstance(skip_positions, bool) or not isinstance(skip_positions, int) \
                or skip_positions < 0:
            raise QueryError(f"skip_positions must be an integer >= 0, got {skip_positions!r}")
        result = {}
        for run in runs:
            pairs = sorted(read_profiles(self.store, run_id=run.run_id, alpha=alpha,
                                         prompt_ids=prompt_ids), key=lambda p: p[0])
            kept = [p.drop_positions(skip_positions) for _, p in pairs]
            result[run.label] = AggregatedProfile([p for p in kept if p.n_tokens > 0],
                                                  model_name=run.label)
        return result

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.con.close()

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _listing(items: Sequence[str], limit: int = 20) -> str:
    """The first `limit` items, comma-separated, and how many more there are."""
    more = (f" ... and {len(items) - limit} more (`entropy-fast info STORE` lists them)"
            if len(items) > limit else "")
    return (", ".join(items[:limit]) or "none") + more


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


__all__ = ["OUTPUTS", "ProfileStore", "QueryError", "RunSelection", "named_queries"]
