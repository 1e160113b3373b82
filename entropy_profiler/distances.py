"""entropy-profiler 0.2.1's `entropy_profiler.distances`: its definitions, units and results.

Owns 0.2.1's distances between two profiles, which differ from entropy_fast.distances:

- `jsd_layer`: squared Jensen-Shannon distance in bits (base-2 JSD, in [0, 1]) between the
  histograms of the per-token entropies at each layer, on `n_bins` equal bins spanning
  the pair's joint range widened by 1e-6 on both sides;
- `wasserstein_layer`: Wasserstein-1 per layer (the same as entropy_fast's);
- `fisher_rao_distance`: arccos of the Bhattacharyya coefficient of the two mean profiles
  normalised over layers, in [0, pi/2] (half of entropy_fast's 2 arccos geodesic);
- `srvf_distance`: L2 distance between sign(f') sqrt(|f'|) of the two mean profiles, f'
  from np.gradient (no warping; entropy_fast's is elastic).

Arithmetic follows 0.2.1 step by step (float32 profiles, numpy), so values agree with it to
rounding. A profile of either numbering is accepted and seen in 0.2.1's (`.blocks()`); two
profiles must hold the same layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

from entropy_fast.profile import EntropyProfile

Metric = Literal["jsd", "wasserstein", "fisher_rao", "srvf"]
Aggregation = Literal["mean", "max", "sum"]


@dataclass
class DistanceResult:
    """0.2.1's result: per-layer values (None for the curve metrics) and their aggregate."""

    layer_distances: np.ndarray | None
    aggregate: float
    metric: str
    aggregation: str


def block_view(profile: EntropyProfile) -> EntropyProfile:
    """`profile` in 0.2.1's numbering (a native profile loses its embedding column)."""
    return profile.blocks()


def _same_layers(a: EntropyProfile, b: EntropyProfile) -> None:
    if a.n_layers != b.n_layers:
        raise ValueError(f"Profiles must have same number of layers: {a.n_layers} vs {b.n_layers}")
    if a.layer_indices != b.layer_indices:
        raise ValueError(f"Profiles hold different layers: blocks {a.layer_indices} vs "
                         f"{b.layer_indices}; compare profiles of the same layer_stride")


def _matrices(profile1: EntropyProfile, profile2: EntropyProfile,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Both (n_tokens, n_layers) float32 entropy matrices, in 0.2.1's numbering."""
    a, b = block_view(profile1), block_view(profile2)
    _same_layers(a, b)
    return a.to_numpy(), b.to_numpy()


def _means(profile1: EntropyProfile, profile2: EntropyProfile,
           ) -> tuple[np.ndarray, np.ndarray]:
    """Both (n_layers,) float32 mean profiles, in 0.2.1's numbering."""
    a, b = block_view(profile1), block_view(profile2)
    _same_layers(a, b)
    return a.mean_profile().numpy(), b.mean_profile().numpy()


def entropy_histogram(entropy: np.ndarray, n_bins: int,
                      bin_range: tuple[float, float] | None = None) -> np.ndarray:
    """Normalised histogram of `entropy` on n_bins equal bins (uniform if all counts are 0).

    Without `bin_range` the bins span [min - 1e-6, max + 1e-6] of the values.
    """
    if bin_range is None:
        bin_range = (entropy.min() - 1e-6, entropy.max() + 1e-6)
    counts, _ = np.histogram(entropy, bins=n_bins, range=bin_range, density=False)
    total = counts.sum()
    return np.ones(n_bins) / n_bins if total == 0 else counts / total


def jsd_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Base-2 Jensen-Shannon divergence of two histograms (squared JS distance), in [0, 1]."""
    return float(jensenshannon(p, q, base=2) ** 2)


def bhattacharyya_angle(p: np.ndarray, q: np.ndarray) -> float:
    """arccos(sum sqrt(p q)) of two non-negative vectors floored at 1e-10 and normalised."""
    p = np.maximum(p, 1e-10)
    q = np.maximum(q, 1e-10)
    p = p / p.sum()
    q = q / q.sum()
    return float(np.arccos(np.clip(np.sum(np.sqrt(p) * np.sqrt(q)), -1.0, 1.0)))


def jsd_layer(profile1: EntropyProfile, profile2: EntropyProfile, n_bins: int = 50,
              ) -> np.ndarray:
    """(n_layers,) base-2 JSD between the per-token entropy histograms of each layer."""
    e1, e2 = _matrices(profile1, profile2)
    values = np.zeros(e1.shape[1])
    for layer in range(e1.shape[1]):
        x, y = e1[:, layer], e2[:, layer]
        bin_range = (min(x.min(), y.min()) - 1e-6, max(x.max(), y.max()) + 1e-6)
        values[layer] = jsd_bits(entropy_histogram(x, n_bins, bin_range),
                                 entropy_histogram(y, n_bins, bin_range))
    return values


def wasserstein_layer(profile1: EntropyProfile, profile2: EntropyProfile) -> np.ndarray:
    """(n_layers,) Wasserstein-1 distance between the per-token entropies of each layer."""
    e1, e2 = _matrices(profile1, profile2)
    return np.array([stats.wasserstein_distance(e1[:, k], e2[:, k])
                     for k in range(e1.shape[1])], dtype=np.float64)


def fisher_rao_distance(profile1: EntropyProfile, profile2: EntropyProfile) -> float:
    """arccos of the Bhattacharyya coefficient of the normalised mean profiles, radians."""
    return bhattacharyya_angle(*_means(profile1, profile2))


def srvf_distance(profile1: EntropyProfile, profile2: EntropyProfile) -> float:
    """L2 distance between the square-root velocity functions of the two mean profiles."""
    def srvf(curve: np.ndarray) -> np.ndarray:
        slope = np.gradient(curve)
        return np.sign(slope) * np.sqrt(np.abs(slope))

    m1, m2 = _means(profile1, profile2)
    return float(np.sqrt(np.sum((srvf(m1) - srvf(m2)) ** 2)))


_AGGREGATIONS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": np.mean, "max": np.max, "sum": np.sum}


def profile_distance(profile1: EntropyProfile, profile2: EntropyProfile,
                     metric: Metric = "jsd", aggregation: Aggregation = "mean",
                     n_bins: int = 50) -> DistanceResult:
    """Distance with one of "jsd", "wasserstein", "fisher_rao", "srvf".

    Layer-wise metrics are reduced with `aggregation` ("mean", "max", "sum"); the curve
    metrics give `layer_distances=None` and `aggregation="n/a"`. `n_bins` is for "jsd".
    """
    if metric in ("fisher_rao", "srvf"):
        curve = fisher_rao_distance if metric == "fisher_rao" else srvf_distance
        return DistanceResult(None, curve(profile1, profile2), metric, "n/a")
    if metric == "jsd":
        per_layer = jsd_layer(profile1, profile2, n_bins=n_bins)
    elif metric == "wasserstein":
        per_layer = wasserstein_layer(profile1, profile2)
    else:
        raise ValueError(f"metric must be 'jsd', 'wasserstein', 'fisher_rao', "
                         f"or 'srvf', got '{metric}'")
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"aggregation must be 'mean', 'max', or 'sum', got '{aggregation}'")
    return DistanceResult(per_layer, float(_AGGREGATIONS[aggregation](per_layer)), metric,
                          aggregation)


def pairwise_distances(profiles: Sequence[EntropyProfile], metric: Metric = "jsd",
                       aggregation: Aggregation = "mean", n_bins: int = 50) -> np.ndarray:
    """(N, N) symmetric matrix of profile_distance(...).aggregate, zero diagonal."""
    n = len(profiles)
    matrix = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            value = profile_distance(profiles[i], profiles[j], metric=metric,
                                     aggregation=aggregation, n_bins=n_bins).aggregate
            matrix[i, j] = matrix[j, i] = value
    return matrix
