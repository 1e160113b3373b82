"""The `entropy_profiler` compatibility package: the seed README's imports and snippets run
unchanged (on a tiny Llama instead of GPT-2), and every name is the entropy_fast object."""

from __future__ import annotations

import importlib

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from tests.tiny_models import N_LAYERS

# Each seed module, the entropy_fast module its names come from by default, and the names
# the seed README documents in it.
SEED_MODULES = {
    "entropy_profiler.profiler": ["EntropyProfiler", "EntropyProfile", "AggregatedProfile",
                                  "shannon_entropy", "renyi_entropy"],
    "entropy_profiler.distances": ["profile_distance", "pairwise_distances", "jsd_layer",
                                   "wasserstein_layer", "fisher_rao_distance",
                                   "srvf_distance", "DistanceResult"],
    "entropy_profiler.analysis": ["LayerAnalyzer", "compare_models", "plot_layer_importance",
                                  "plot_information_plane", "plot_velocity_entropy"],
    "entropy_profiler.viz": ["plot_profile", "plot_profiles", "plot_heatmap",
                             "plot_aggregated", "plot_cluster"],
    "entropy_profiler.estimators": ["MatrixRenyiMI"],
}
SEED_TOP_LEVEL = ["EntropyProfiler", "plot_profile", "plot_aggregated", "profile_distance",
                  "LayerAnalyzer"]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def profiler(llama, tokenizer):
    from entropy_profiler import EntropyProfiler

    return EntropyProfiler(llama, dtype=torch.float32, tokenizer=tokenizer)


@pytest.mark.parametrize("module_name", sorted(SEED_MODULES))
def test_seed_names_are_the_entropy_fast_objects(module_name):
    import entropy_fast

    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(SEED_MODULES[module_name])
    for name in module.__all__:
        assert getattr(module, name) is getattr(entropy_fast, name), name


def test_top_level_names_are_the_entropy_fast_objects():
    import entropy_fast
    import entropy_profiler

    assert set(SEED_TOP_LEVEL) <= set(entropy_profiler.__all__)
    for name in entropy_profiler.__all__:
        assert getattr(entropy_profiler, name) is getattr(entropy_fast, name), name
    from entropy_profiler.analysis import (  # noqa: F401  (the seed README's import line)
        compare_models,
        plot_information_plane,
        plot_layer_importance,
        plot_velocity_entropy,
    )


def test_seed_quick_start_snippets(profiler):
    from entropy_profiler import LayerAnalyzer, plot_aggregated, plot_profile, profile_distance

    profile = profiler.profile_text("The capital of France is", max_new_tokens=8)
    assert profile.entropy.shape == (profile.n_tokens, N_LAYERS + 1)
    assert profile.mean_profile().shape == (N_LAYERS + 1,)
    assert profile.to_numpy().dtype == np.float32
    plot_profile(profile)

    agg = profiler.profile_batch([
        "The stock market experienced significant",
        "In quantum mechanics, the wave function",
        "Modern neural networks learn by",
    ], max_new_tokens=6)
    assert agg.to_matrix().shape == (3, N_LAYERS + 1)
    plot_aggregated(agg)

    p1 = profiler.profile_text("Water boils at", max_new_tokens=6)
    p2 = profiler.profile_text("Once upon a time", max_new_tokens=6)
    result = profile_distance(p1, p2, metric="jsd")
    assert 0.0 <= result.aggregate <= np.log(2.0)

    profile, hidden_states = profiler.profile_text_with_states("Hello world", max_new_tokens=8)
    analyzer = LayerAnalyzer(profiler, profile, hidden_states=hidden_states)
    assert analyzer.layer_entropy().shape == (N_LAYERS + 1,)
    assert analyzer.information_velocity().shape == (N_LAYERS + 1,)
    assert analyzer.layer_mi(method="cka").shape == (N_LAYERS + 1,)


def test_seed_analysis_and_viz_functions(profiler):
    from entropy_profiler.analysis import (
        LayerAnalyzer,
        compare_models,
        plot_information_plane,
        plot_layer_importance,
        plot_velocity_entropy,
    )
    from entropy_profiler.distances import pairwise_distances
    from entropy_profiler.viz import plot_cluster, plot_heatmap, plot_profiles

    profile, states = profiler.profile_text_with_states("Hello world", max_new_tokens=8)
    analyzer = LayerAnalyzer(profiler, profile, hidden_states=states)
    plot_layer_importance(analyzer.layer_importance())
    plot_information_plane(analyzer)
    plot_velocity_entropy(analyzer)
    agg = profiler.profile_batch(["ab", "Once upon", "Hello there", "The fox"],
                                 max_new_tokens=5)
    assert pairwise_distances(agg, metric="wasserstein").shape == (4, 4)
    plot_profiles(list(agg), labels=["a", "b", "c", "d"])
    plot_heatmap(profile)
    plot_cluster(agg, method="pca")
    comparison = compare_models({"tiny": agg, "tiny-again": list(agg)})
    assert comparison is not None


def test_seed_tips_snippet(llama, tokenizer):
    from entropy_profiler import EntropyProfiler

    with EntropyProfiler(llama, tokenizer=tokenizer, layer_stride=2) as profiler:
        profile = profiler.profile_text("Hello world")
        assert profile.layer_indices[-1] == N_LAYERS
    assert profiler.model is None


def test_seed_entropy_functions():
    from entropy_profiler.profiler import renyi_entropy, shannon_entropy

    probs = torch.tensor([[0.5, 0.25, 0.25]])
    assert shannon_entropy(probs).item() == pytest.approx(1.5 * np.log(2.0), abs=1e-6)
    assert renyi_entropy(probs, 1.0).item() == pytest.approx(shannon_entropy(probs).item())
