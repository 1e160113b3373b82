"""entropy-profiler 0.2.1's `entropy_profiler.analysis`, re-exported from entropy_fast.

The three plots live in entropy_fast.viz; the seed exported them from here.
"""

from entropy_fast.analysis import LayerAnalyzer, compare_models
from entropy_fast.viz import plot_information_plane, plot_layer_importance, plot_velocity_entropy

__all__ = ["LayerAnalyzer", "compare_models", "plot_information_plane", "plot_layer_importance",
           "plot_velocity_entropy"]
