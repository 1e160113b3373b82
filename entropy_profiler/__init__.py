"""entropy_profiler: the compatibility import path of entropy-profiler 0.2.1.

Scripts written for entropy-profiler 0.2.1 (`from entropy_profiler import EntropyProfiler,
plot_profile`, `from entropy_profiler.analysis import compare_models`, ...) keep working:
every name here is the entropy_fast object itself, re-exported. New code should import
entropy_fast.
"""

from entropy_profiler.analysis import LayerAnalyzer
from entropy_profiler.distances import (
    DistanceResult,
    fisher_rao_distance,
    jsd_layer,
    pairwise_distances,
    profile_distance,
    srvf_distance,
    wasserstein_layer,
)
from entropy_profiler.estimators import MatrixRenyiMI
from entropy_profiler.profiler import (
    AggregatedProfile,
    EntropyProfile,
    EntropyProfiler,
    renyi_entropy,
    shannon_entropy,
)
from entropy_profiler.viz import (
    plot_aggregated,
    plot_cluster,
    plot_heatmap,
    plot_profile,
    plot_profiles,
)

__all__ = [
    "AggregatedProfile",
    "DistanceResult",
    "EntropyProfile",
    "EntropyProfiler",
    "LayerAnalyzer",
    "MatrixRenyiMI",
    "fisher_rao_distance",
    "jsd_layer",
    "pairwise_distances",
    "plot_aggregated",
    "plot_cluster",
    "plot_heatmap",
    "plot_profile",
    "plot_profiles",
    "profile_distance",
    "renyi_entropy",
    "shannon_entropy",
    "srvf_distance",
    "wasserstein_layer",
]
