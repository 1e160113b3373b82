"""Comparing the chosen runs of a store: the run-by-run distance matrix `entropy-fast
compare` prints, as one Python call.

Each run chosen by a `RunSelection` (store.selection) is one entry, labelled, and the
entries are compared with `analysis.compare_models`, the one Python comparison: profiles
pooled per entry (every token weighs the same), each pair compared with
`distances.profile_distance` at relative depth (the layers `distances.match_layers`
pairs; aggregation "mean" for the layer-wise metrics).
The `model_distances` named query computes the same numbers in SQL for jsd, wasserstein
and fisher_rao (tests/test_compare.py holds them equal). Torch is imported only when
distances are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from entropy_fast.store.errors import StoreError
from entropy_fast.store.selection import RunSelection, SelectedRun, differences

METRICS = ("jsd", "wasserstein", "fisher_rao", "srvf")
"""distances.METRICS, restated so that the CLI lists them without importing torch (a test
holds the two equal)."""


@dataclass(frozen=True)
class RunComparison:
    """Distances between the chosen runs, one entry per run.

    runs: the chosen runs, by model and label; comparison: the `analysis.ModelComparison`
    of their profiles (names = the runs' labels, in that order: distances, mean curves at
    relative depth); alpha, skip_positions: how they were compared; profiles: {label:
    AggregatedProfile} compared (positions already skipped); note: a remark for the reader
    (the entries differ in mode, sampling, dtype or corpus), or None.
    """

    runs: list[SelectedRun]
    comparison: Any
    alpha: float
    skip_positions: int
    profiles: dict[str, Any]
    note: str | None

    @property
    def labels(self) -> list[str]:
        """The entries' labels, in the order of `runs`."""
        return list(self.comparison.names)

    @property
    def distances(self) -> np.ndarray:
        """(n x n) float64 distances, symmetric, zero diagonal, in the order of `runs`."""
        return self.comparison.distances

    @property
    def metric(self) -> str:
        return self.comparison.metric

    def distance(self, a: str, b: str) -> float:
        """The distance between the entries labelled a and b."""
        return float(self.distances[self.labels.index(a), self.labels.index(b)])


def compare_runs(db: Any, selection: RunSelection | None = None, *, metric: str = "jsd",
                 bin_width: float = 0.25, skip_positions: int = 0, **criteria: Any,
                 ) -> RunComparison:
    """Compare the runs of the store behind `db` (a ProfileStore) that `selection` (or its
    fields as keywords) chooses, at the selection's alpha (default 1.0; runs without it
    are left out), with `analysis.compare_models`. metric: one of METRICS; bin_width:
    jsd's histogram bin width in nats; skip_positions: leave the first N rows of every
    prompt out."""
    from entropy_fast.analysis import compare_models

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
    # In run-id order: where two runs have as many layers, the one with the smaller id is
    # the "short" side of the layer pairing, as in SQL's run_layer_map.
    by_id = sorted(runs, key=lambda r: r.run_id)
    comparison = compare_models({r.label: found[r.label] for r in by_id}, metric,
                                bin_width=bin_width).select([r.label for r in runs])
    differ = differences(runs)
    note = (f"these entries differ in {', '.join(differ)}: a distance may show that as well "
            "as the models (narrow with --mode / --where)" if differ else None)
    return RunComparison(runs, comparison, float(selection.alpha), skip_positions, found,
                         note)
