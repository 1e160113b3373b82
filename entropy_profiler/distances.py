"""entropy-profiler 0.2.1's `entropy_profiler.distances`, re-exported from entropy_fast."""

from entropy_fast.distances import (
    DistanceResult,
    fisher_rao_distance,
    jsd_layer,
    pairwise_distances,
    profile_distance,
    srvf_distance,
    wasserstein_layer,
)

__all__ = ["DistanceResult", "fisher_rao_distance", "jsd_layer", "pairwise_distances",
           "profile_distance", "srvf_distance", "wasserstein_layer"]
