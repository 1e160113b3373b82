"""entropy_profiler: a drop-in for entropy-profiler 0.2.1, on entropy_fast's engine.

Scripts written for entropy-profiler 0.2.1 keep working unchanged and keep their meaning:
every public name, signature, return type, shape, layer numbering (columns are the L block
outputs, counted from 0), unit and definition is 0.2.1's. Underneath, prompts are
generated in batches and profiled in one teacher-forced forward with the streamed (CPU) or
fused (GPU) lens. The intended differences are fixes of 0.2.1's lens (its last column
normed twice; Gemma-2 soft-capping ignored; ...) and are listed, with their size, in
docs/migrating-from-0.2.1.md. New code should use entropy_fast.
"""

from __future__ import annotations

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

__version__ = "0.2.0"  # what entropy-profiler 0.2.1 itself reports

__all__ = [
    "AggregatedProfile",
    "DistanceResult",
    "EntropyProfile",
    "EntropyProfiler",
    "LayerAnalyzer",
    "MatrixRenyiMI",
    "__version__",
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
