"""entropy-fast: logit-lens entropy profiles of transformer language models, at corpus scale."""

from entropy_fast.analysis import LayerAnalyzer, ModelComparison, compare_models
from entropy_fast.distances import (
    DistanceResult,
    fisher_rao_distance,
    jsd_layer,
    pairwise_distances,
    profile_distance,
    srvf_distance,
    wasserstein_layer,
)
from entropy_fast.entropy import renyi_entropy, shannon_entropy
from entropy_fast.estimators import MatrixRenyiMI, linear_cka
from entropy_fast.lens import Lens, UnsupportedArchitectureError
from entropy_fast.loading import DEFAULT_MODEL, ModelNotFoundError, load_model
from entropy_fast.profile import AggregatedProfile, EntropyProfile
from entropy_fast.profiler import EntropyProfiler

__version__ = "0.3.0"

# Plots (matplotlib) and the store (pyarrow, duckdb) load on first use, not with the package.
_LAZY = {
    **dict.fromkeys(("plot_aggregated", "plot_cluster", "plot_heatmap",
                     "plot_information_plane", "plot_layer_importance", "plot_profile",
                     "plot_profiles", "plot_velocity_entropy"), "entropy_fast.viz"),
    **dict.fromkeys(("Store", "RunInfo", "StoreError"), "entropy_fast.store"),
    **dict.fromkeys(("ProfileStore", "QueryError", "named_queries", "check_store"),
                    "entropy_fast.sql"),
    **dict.fromkeys(("read_corpus", "Corpus", "CorpusError"), "entropy_fast.corpus"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'entropy_fast' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "AggregatedProfile",
    "DistanceResult",
    "EntropyProfile",
    "EntropyProfiler",
    "LayerAnalyzer",
    "Lens",
    "MatrixRenyiMI",
    "ModelComparison",
    "ModelNotFoundError",
    "UnsupportedArchitectureError",
    "compare_models",
    "fisher_rao_distance",
    "jsd_layer",
    "linear_cka",
    "load_model",
    "pairwise_distances",
    "profile_distance",
    "renyi_entropy",
    "shannon_entropy",
    "srvf_distance",
    "wasserstein_layer",
    *_LAZY,
]
