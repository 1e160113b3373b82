"""Every plot renders to PNG (Agg), returns what it drew on, labels its axes and has a
legend or colorbar where it needs one; bad input raises ValueError."""

from __future__ import annotations

import importlib.util

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from entropy_fast import viz
from entropy_fast.analysis import LayerAnalyzer
from entropy_fast.profile import AggregatedProfile
from tests._analysis_fixtures import make_profile, tiny_run


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def synthetic():
    return AggregatedProfile([make_profile(6 + k, seed=k, shift=0.4 * (k % 3))
                              for k in range(9)])


def check(ax, tmp_path, name: str, legend: bool = True, colorbar: bool = False):
    assert isinstance(ax, matplotlib.axes.Axes)
    assert ax.get_xlabel() and ax.get_ylabel()
    if legend:
        assert ax.get_legend() is not None and ax.get_legend().get_texts()
    if colorbar:
        assert len(ax.figure.axes) == 2
    ax.figure.savefig(tmp_path / f"{name}.png", dpi=50)
    assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_profile_plots(synthetic, tmp_path):
    profile = synthetic[0]
    check(viz.plot_profile(profile), tmp_path, "profile")
    check(viz.plot_profiles(synthetic, labels=[f"p{k}" for k in range(9)]), tmp_path, "profiles")
    check(viz.plot_heatmap(profile, token_labels=[f"t{k}" for k in range(profile.n_tokens)]),
          tmp_path, "heatmap", legend=False, colorbar=True)
    check(viz.plot_aggregated(synthetic), tmp_path, "aggregated")


def test_plots_draw_on_the_given_axes(synthetic):
    _, axes = plt.subplots(1, 3)
    assert viz.plot_profile(synthetic[0], ax=axes[0]) is axes[0]
    assert viz.plot_aggregated(synthetic, ax=axes[1]) is axes[1]
    assert viz.plot_cluster(synthetic, ax=axes[2]) is axes[2]
    lines = axes[0].get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), synthetic[0].mean_profile().double())


@pytest.mark.parametrize(("method", "feature", "metric"), [
    ("pca", "mean", "wasserstein"), ("pca", "distance", "jsd"), ("tsne", "distance", "srvf")])
def test_plot_cluster(synthetic, tmp_path, method, feature, metric):
    labels = ["a", "b", "c"] * 3
    ax = viz.plot_cluster(synthetic, labels=labels, method=method, feature=feature,
                          metric=metric)
    check(ax, tmp_path, f"cluster_{method}_{feature}")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]


def test_analysis_plots_on_a_real_tiny_model(tmp_path):
    profiler, profile, states, _ = tiny_run()
    analyzer = LayerAnalyzer(profiler, profile, hidden_states=states)
    check(viz.plot_layer_importance(analyzer), tmp_path, "importance")
    check(viz.plot_layer_importance(analyzer.layer_importance(), profile.layer_indices),
          tmp_path, "importance_dict")
    check(viz.plot_information_plane(analyzer, "renyi"), tmp_path, "plane", legend=False,
          colorbar=True)
    check(viz.plot_velocity_entropy(analyzer), tmp_path, "velocity", legend=False,
          colorbar=True)


def test_units_follow_the_profile():
    profile = make_profile(4)
    profile.metadata["base"] = 2
    assert "bits" in viz.plot_profile(profile).get_ylabel()
    assert "Rényi α=2" in viz.plot_profile(make_profile(4, alpha=2.0)).get_ylabel()


def test_bad_input_raises(synthetic):
    with pytest.raises(ValueError, match="unknown method 'mds'"):
        viz.plot_cluster(synthetic, method="mds")
    with pytest.raises(ValueError, match="unknown feature 'full'"):
        viz.plot_cluster(synthetic, feature="full")
    with pytest.raises(ValueError, match="got 2 labels for 9 profiles"):
        viz.plot_profiles(synthetic, labels=["a", "b"])
    with pytest.raises(ValueError, match="at least 3 profiles"):
        viz.plot_cluster(synthetic.profiles[:2])
    with pytest.raises(ValueError, match="no profiles to plot"):
        viz.plot_profiles([])
    empty = make_profile(3)
    empty.entropy = torch.zeros(0, 6)
    with pytest.raises(ValueError, match="empty"):
        viz.plot_heatmap(empty)
    if importlib.util.find_spec("umap") is None:
        with pytest.raises(ValueError, match="needs the umap-learn package"):
            viz.plot_cluster(synthetic, method="umap")


def title_inside_figure(figure) -> bool:
    """Whether every Axes title, drawn at the figure's own dpi (savefig's may differ), lies
    within the figure."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    boxes = [ax.title.get_window_extent(canvas.get_renderer()) for ax in figure.axes]
    return all(figure.bbox.contains(*b.p0) and figure.bbox.contains(*b.p1) for b in boxes)


def test_save_figure_keeps_a_long_title_whole(tmp_path):
    long = "mean entropy across prompts (each prompt weighs the same; band: ± 1 std) " * 2
    figure = viz.plot_mean_curves({"m": ([0, 1, 2], [1.0, 2.0, 3.0], [0.1, 0.1, 0.1])},
                                  title=long)
    viz.save_figure(figure, tmp_path / "long.png")
    assert title_inside_figure(figure)
    assert " ".join(figure.axes[0].get_title().split()) == long.strip()  # wrapped, not cut


def test_each_model_keeps_its_colour_whatever_the_subset_or_order(synthetic):
    store_models = ["org/b", "a", "c"]
    colors = viz.model_colors(store_models)
    assert colors == viz.model_colors(sorted(store_models, reverse=True))
    assert len(set(colors.values())) == 3 and colors["a"] == plt.get_cmap("tab10").colors[0]
    curve = ([0, 1], [1.0, 2.0], [0.0, 0.0])
    figure = viz.plot_mean_curves({"c": curve}, colors=colors)
    assert figure.axes[0].get_lines()[0].get_color() == colors["c"]
    first, second = synthetic[0], synthetic[1]
    forward = viz.plot_profiles([first, second], labels=["x", "y"])
    backward = viz.plot_profiles([second, first], labels=["y", "x"])
    assert ({line.get_label(): line.get_color() for line in forward.get_lines()}
            == {line.get_label(): line.get_color() for line in backward.get_lines()})
    ax = viz.plot_cluster(synthetic, labels=["c", "a", "org/b"] * 3, colors=colors)
    assert {c.get_label(): tuple(c.get_facecolor()[0][:3]) for c in ax.collections} == colors


def lens_profile(n_tokens: int = 40, n_layers: int = 31, k: int = 3):
    """A profile with top tokens (ids 0..99) and their probabilities."""
    from entropy_fast.profile import EntropyProfile

    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(n_tokens, n_layers, k, generator=gen).sort(-1, descending=True).values
    return EntropyProfile(entropy=torch.rand(n_tokens, n_layers, generator=gen),
                          token_ids=torch.randint(0, 100, (n_tokens,), generator=gen),
                          layer_indices=list(range(n_layers)), model_name="m",
                          top_tokens=torch.randint(0, 100, (n_tokens, n_layers, k),
                                                   generator=gen),
                          top_probs=probs / probs.sum(-1, keepdim=True))


def test_logit_lens_grid_shows_each_cells_top_token(tmp_path):
    """30 layers x 40 positions: one cell text per (layer, position), the top token's text,
    the colour its probability; a figure large enough to read them."""
    profile = lens_profile()
    vocab = {i: f"t{i}" for i in range(100)}
    ax = viz.plot_logit_lens(profile, vocab)
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
             for t in ax.texts}
    assert len(cells) == 31 * 40
    assert all(cells[layer, pos] == f"t{int(profile.top_tokens[pos, layer, 0])}"
               for layer in range(31) for pos in range(40))
    image = ax.images[0].get_array()
    np.testing.assert_allclose(image, profile.top_probs[..., 0].T.numpy())
    width, height = ax.figure.get_size_inches()
    assert width >= 0.5 * 40 and height >= 0.3 * 31  # ~0.5 in per column, 0.3 in per row
    assert viz.save_figure(ax.figure, tmp_path / "lens.png").stat().st_size > 0
    ax = viz.plot_logit_lens(profile, color="entropy", positions=slice(5, 15))
    assert len(ax.texts) == 31 * 10 and ax.texts[0].get_text().isdigit()
    with pytest.raises(ValueError, match="top_tokens=K"):
        viz.plot_logit_lens(make_profile(4))


def test_distance_matrix_and_model_comparison_plots():
    from entropy_fast.analysis import ModelComparison

    distances = np.array([[0.0, 0.25, 1.5], [0.25, 0.0, 0.75], [1.5, 0.75, 0.0]])
    ax = viz.plot_distance_matrix(distances, ["a", "b", "c"], "jsd")
    assert [t.get_text() for t in ax.texts] == [f"{v:.3g}" for v in distances.reshape(-1)]
    assert "jsd" in ax.get_title()
    comparison = ModelComparison(names=["a", "b", "c"], depth=np.linspace(0, 1, 5),
                                 curves=np.random.default_rng(0).random((3, 5)),
                                 distances=distances, metric="wasserstein")
    figure = comparison.plot()
    assert len(figure.axes) >= 2 and "wasserstein" in figure.axes[1].get_title()
    with pytest.raises(ValueError, match="labels"):
        viz.plot_distance_matrix(distances, ["a", "b"])
