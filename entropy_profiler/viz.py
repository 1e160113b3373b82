"""entropy-profiler 0.2.1's `entropy_profiler.viz`, re-exported from entropy_fast."""

from entropy_fast.viz import (
    plot_aggregated,
    plot_cluster,
    plot_heatmap,
    plot_profile,
    plot_profiles,
)

__all__ = ["plot_aggregated", "plot_cluster", "plot_heatmap", "plot_profile", "plot_profiles"]
