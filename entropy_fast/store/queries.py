"""The named queries of queries/*.sql: their declared parameters, parsed and bound.

A named query file starts with comment lines: the first is its description, then one
``-- @param NAME TYPE [= DEFAULT] [: help]`` per parameter (TYPE one of VARCHAR,
DOUBLE, INTEGER, VARCHAR[], INTEGER[]; no default = required). Parameters are always
bound (`$name`), never pasted into SQL text. A parameter named `model` or `model_*`
names models, one named `run_id`, `run_*` or `runs` names run ids (`QueryParam.names`):
`ProfileStore.query` refuses a model or run the store lacks instead of answering with no
rows. This module needs neither DuckDB nor Arrow, so listing the queries is instant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cache
from importlib.resources import files
from typing import Any

from entropy_fast.errors import EntropyFastError

_PARAM = re.compile(
    r"^--\s*@param\s+(?P<name>\w+)\s+(?P<type>[A-Z]+(?:\[\])?)"
    r"(?:\s*=\s*(?P<default>'[^']*'|[^\s:]+))?\s*(?::\s*(?P<help>.*))?$")
_SCALARS = {"VARCHAR": str, "DOUBLE": float, "INTEGER": int}

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

    @property
    def names(self) -> str | None:
        """'model' or 'run' when the values are models or run ids of the store (by the
        parameter's name, see the module doc), else None."""
        if self.name == "model" or self.name.startswith("model_"):
            return "model"
        if self.name in ("run_id", "runs") or self.name.startswith("run_"):
            return "run"
        return None

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
                             f"pass {missing[0]}=... (on the command line: --param "
                             f"{missing[0]}=...)")
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


def macros_sql() -> str:
    """The macros and derived views every connection installs (queries/_macros.sql)."""
    return files("entropy_fast.queries").joinpath("_macros.sql").read_text(encoding="utf-8")
