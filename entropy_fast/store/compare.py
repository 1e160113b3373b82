"""Comparing the chosen runs of a store: the run-by-run distance matrix `entropy-fast
compare` prints, as one Python call.

Each run chosen by a `RunSelection` (store.selection) is one entry, labelled; its profiles
are pooled into one (every token weighs the same, `AggregatedProfile.pooled`) and every
pair of entries is compared with `distances.profile_distance` at relative depth (the
layers `distances.match_layers` pairs; aggregation "mean" for the layer-wise metrics).
The `model_distances` named query computes the same numbers in SQL for jsd, wasserstein
and fisher_rao (tests/test_compare.py holds them equal). Torch is imported only when
distances are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any

import numpy as np

from entropy_fast.store.errors import StoreError
from entropy_fast.store.selection import RunSelection, SelectedRun, differences

METRICS = ("jsd", "wasserstein", "fisher_rao", "srvf")
"""The same family as distances.METRICS (kept here so the CLI loads no torch to list it)."""


@dataclass(frozen=True)
class RunComparison:
    """Distances between the chosen runs, one entry per run.

    runs: the chosen runs, by model and label; labels: their labels, in that order;
    distances: (n x n) float64, symmetric, zero diagonal; metric, alpha, skip_positions:
    how they were computed; profiles: {label: AggregatedProfile} the distances were
    computed from (positions already skipped); note: a remark for the reader (the
    entries differ in mode, sampling, dtype or corpus), or None.
    """

    runs: list[SelectedRun]
    labels: list[str]
    distances: np.ndarray
    metric: str
    alpha: float
    skip_positions: int
    profiles: dict[str, Any]
    note: str | None

    def distance(self, a: str, b: str) -> float:
        """The distance between the entries labelled a and b."""
        return float(self.distances[self.labels.index(a), self.labels.index(b)])


def compare_runs(db: Any, selection: RunSelection | None = None, *, metric: str = "jsd",
                 bin_width: float = 0.25, skip_positions: int = 0, **criteria: Any,
                 ) -> RunComparison:
    """Compare the runs of the store behind `db` (a ProfileStore) that `selection` (or its
    fields as keywords) chooses, at the selection's alpha (default 1.0; runs without it
    are left out). metric: one of METRICS; bin_width: jsd's histogram bin width in nats;
    skip_positions: leave the first N rows of every prompt out."""
    from entropy_fast.distances import profile_distance

    if metric not in METRICS:
        raise StoreError(f"unknown metric {metric!r}", f"metrics: {', '.join(METRICS)}")
    selection = RunSelection.of(selection, criteria)
    if selection.alpha is None:
        selection = replace(selection, alpha=1.0)
    runs = db.select(selection)
    found = db.read(runs, alpha=selection.alpha, skip_positions=skip_positions)
    empty = [label for label, agg in found.items() if len(agg) == 0]
    if empty:
        raise StoreError(f"{', '.join(empty)}: no token left to compare"
                         + (f" after skipping {skip_positions} positions" if skip_positions
                            else ""), "lower --skip-positions, or finish the run")
    pooled = {label: agg.pooled() for label, agg in found.items()}
    labels = [r.label for r in runs]
    matrix = np.zeros((len(runs), len(runs)))
    # Pairs in run-id order: where two runs have as many layers, the one with the smaller
    # id is the "short" side of the layer pairing, as in SQL's run_layer_map.
    order = sorted(range(len(runs)), key=lambda k: runs[k].run_id)
    for i, j in combinations(order, 2):
        value = profile_distance(pooled[labels[i]], pooled[labels[j]], metric,
                                 aggregation="mean", bin_width=bin_width).aggregate
        matrix[i, j] = matrix[j, i] = value
    differ = differences(runs)
    note = (f"these entries differ in {', '.join(differ)}: a distance may show that as well "
            "as the models (narrow with --mode / --where)" if differ else None)
    return RunComparison(runs, labels, matrix, metric, float(selection.alpha),
                         skip_positions, found, note)

