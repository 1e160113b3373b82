"""Choosing and comparing the runs of a store: which runs `compare` may put side by side,
and the model-by-model distance matrix of the `model_distances` query over them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from entropy_fast.store.errors import StoreError
from entropy_fast.store.records import RunInfo


@dataclass(frozen=True)
class RunComparison:
    """Distances between the models of the chosen runs (mean over matched layers).

    runs: the chosen run records, by model; models: their labels, sorted; note: a remark
    for the reader (runs over different corpora), or None.
    """

    runs: list[RunInfo]
    models: list[str]
    distances: dict[tuple[str, str], float]
    note: str | None

    def distance(self, a: str, b: str) -> float | None:
        """The distance between models a and b (None where the query gave none)."""
        return self.distances.get((a, b))


def compare_runs(db: Any, *, models: list[str] | None = None,
                 run_ids: list[str] | None = None, alpha: float = 1.0, metric: str = "jsd",
                 bin_width: float = 0.25) -> RunComparison:
    """Compare the chosen runs of the store behind `db` (a ProfileStore): given run ids,
    else each model's latest complete run; they must have `alpha` and have been made the
    same way (mode, sampling, dtype)."""
    runs = choose_runs(db.store.runs(), models, run_ids)
    lacking = [r.run_id for r in runs if alpha not in r.lens.alphas]
    if lacking:
        raise StoreError(f"runs {', '.join(lacking)} have no alpha={alpha}")
    note = check_comparable(runs)
    rows = db.query("model_distances", alpha=alpha, metric=metric, bin_width=bin_width,
                    runs=[r.run_id for r in runs]).to_pylist()
    return RunComparison(runs, sorted({r.model for r in runs}),
                         {(r["model_a"], r["model_b"]): r["distance"] for r in rows}, note)


def choose_runs(records: list[RunInfo], models: list[str] | None,
                run_ids: list[str] | None) -> list[RunInfo]:
    """One record per chosen run: given ids, else each model's latest complete run."""
    by_run = {r.run_id: r for r in records}
    if run_ids:
        unknown = [r for r in run_ids if r not in by_run]
        if unknown:
            raise StoreError(f"no run {', '.join(unknown)} in the store")
        chosen = [by_run[r] for r in run_ids]
    else:
        complete = {r.run_id: r for r in records if r.status == "complete"}
        latest: dict[str, RunInfo] = {}
        for r in sorted(complete.values(), key=lambda r: r.updated_at):
            latest[r.model] = r
        chosen = list(latest.values())
    chosen = [r for r in chosen if models is None or r.model in models]
    if not chosen:
        raise StoreError("no runs to compare" + (f" for models {models}" if models else "")
                         + (" (only complete runs are compared)" if not run_ids else ""),
                         "finish a run, or name runs with --runs")
    return sorted(chosen, key=lambda r: r.model)


def check_comparable(runs: list[RunInfo]) -> str | None:
    """Refuse runs that differ in what they measured (mode, sampling, dtype); a note when
    they profiled different corpora."""
    kinds = {(json.dumps(r.sampling.identity(), sort_keys=True), r.dtype) for r in runs}
    if len(kinds) > 1:
        described = "; ".join(f"{r.model}={r.run_id}: "
                              f"{'text mode' if not r.sampling.generating else r.sampling}"
                              f", dtype {r.dtype}" for r in runs)
        raise StoreError(f"these runs were made differently ({described}), so their "
                         "distances would mix two effects",
                         "pick runs with the same mode, sampling and dtype with --runs")
    if len({r.corpus_sha256 for r in runs}) > 1:
        return "these runs profiled different corpora"
    return None
