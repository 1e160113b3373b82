"""entropy-fast: logit-lens entropy profiles of transformer language models, at corpus scale.

Importing the package is instant: every public name below loads its module (and torch,
scipy, duckdb, matplotlib) on first use, so the CLI's SQL-only commands never pay for
torch.

Modules, in data-flow order: settings (every option, once), corpus (prompt files),
models (loading by alias, path, .gguf or hub id), generation and vllm_generation
(continuations), batching (length buckets), forward (taps on the residual stream), lens
(the model's own unembedding, verified), entropy (the online Shannon/Rényi math), profiler
(prompts in, EntropyProfile out), profile (the result types), pipeline (resumable,
sharded corpus runs into a store), distributed and ray_stages (the same runs on a Ray
cluster), store/ (Parquet store, DuckDB views, checks), distances, analysis, estimators,
viz, report (the HTML comparison of a store), cli. kernels/ (Triton) and queries/ (named
SQL) ship as entropy_fast.kernels and entropy_fast.queries.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.4.0"

_EXPORTS: dict[str, tuple[str, ...]] = {
    "entropy_fast.settings": ("DEFAULT_MODEL", "LensSettings", "ModelSettings",
                              "SamplingSettings"),
    "entropy_fast.errors": ("ConfigError", "EntropyFastError", "MissingDependencyError"),
    "entropy_fast.corpus": ("Corpus", "CorpusError", "read_corpus"),
    "entropy_fast.models": ("ModelNotFoundError", "load_model"),
    "entropy_fast.lens": ("Lens", "UnsupportedArchitectureError"),
    "entropy_fast.entropy": ("renyi_entropy", "shannon_entropy"),
    "entropy_fast.profile": ("AggregatedProfile", "EntropyProfile"),
    "entropy_fast.profiler": ("EntropyProfiler",),
    "entropy_fast.pipeline": ("RunResult", "generate_corpus", "profile_corpus"),
    "entropy_fast.distributed": ("RayEngine",),
    "entropy_fast.store": ("GenerationInfo", "RunInfo", "Store", "StoreError"),
    "entropy_fast.store.sql": ("ProfileStore",),
    "entropy_fast.store.queries": ("QueryError", "named_queries"),
    "entropy_fast.store.check": ("check_store",),
    "entropy_fast.store.selection": ("RunSelection",),
    "entropy_fast.store.compare": ("RunComparison", "compare_runs"),
    "entropy_fast.distances": ("DistanceResult", "fisher_rao_distance", "jsd_layer",
                               "match_layers", "pairwise_distances", "profile_distance",
                               "srvf_distance", "wasserstein_layer"),
    "entropy_fast.report": ("write_report",),
    "entropy_fast.analysis": ("LayerAnalyzer", "ModelComparison", "compare_models"),
    "entropy_fast.estimators": ("MatrixRenyiMI", "linear_cka"),
    "entropy_fast.viz": ("model_colors", "plot_aggregated", "plot_cluster", "plot_heatmap",
                         "plot_distance_matrix", "plot_information_plane",
                         "plot_layer_importance", "plot_logit_lens", "plot_profile",
                         "plot_profiles", "plot_velocity_entropy"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'entropy_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
