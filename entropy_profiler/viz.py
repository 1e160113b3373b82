"""entropy-profiler 0.2.1's `entropy_profiler.viz`: its plots, signatures and return types.

plot_profile, plot_heatmap and plot_aggregated draw on the Axes given (a new one otherwise)
and return it; plot_profiles and plot_cluster make and return a Figure. Profiles of either
numbering are drawn in 0.2.1's (`.blocks()`): "Layer index" is the 0-based block index.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from entropy_fast.profile import AggregatedProfile, EntropyProfile
from entropy_profiler.distances import block_view, pairwise_distances


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=figsize)[1]


def _plain_frame(ax: Axes) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)


def _depth_axis(layers: list[int], normalize_x: bool) -> tuple[np.ndarray, str]:
    """x positions of the columns and the axis label."""
    if normalize_x:
        return np.linspace(0, 1, len(layers)), "Layer depth (normalized)"
    return np.asarray(layers), "Layer index"


def plot_profile(profile: EntropyProfile, ax: Axes | None = None, normalize_x: bool = True,
                 label: str | None = None, color=None, show_token_traces: bool = False,
                 alpha_fill: float = 0.15) -> Axes:
    """Mean entropy per layer with a +/- 1 std band over tokens; returns the Axes."""
    ax = _new_axes(ax, (8, 4))
    view = block_view(profile)
    entropy = view.to_numpy()
    mean, std = entropy.mean(axis=0), entropy.std(axis=0)
    x, xlabel = _depth_axis(view.layer_indices, normalize_x)
    if show_token_traces:
        for row in entropy:
            ax.plot(x, row, alpha=0.08, linewidth=0.5, color=color or "gray")
    ax.plot(x, mean, linewidth=2, label=label or profile.model_name, color=color)
    ax.fill_between(x, mean - std, mean + std, alpha=alpha_fill, color=color)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"Entropy (α={profile.alpha})")
    _plain_frame(ax)
    return ax


def plot_profiles(profiles: list[EntropyProfile], labels: list[str] | None = None,
                  normalize_x: bool = True, title: str | None = None,
                  figsize: tuple[float, float] = (10, 5)) -> Figure:
    """Mean profiles of several profiles on one new Figure, which is returned."""
    fig, ax = plt.subplots(figsize=figsize)
    colors = plt.get_cmap("tab10")(np.linspace(0, 1, len(profiles)))
    for i, profile in enumerate(profiles):
        plot_profile(profile, ax=ax, normalize_x=normalize_x,
                     label=labels[i] if labels else profile.model_name, color=colors[i])
    ax.legend(frameon=False, fontsize=9)
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_heatmap(profile: EntropyProfile, ax: Axes | None = None, normalize_x: bool = True,
                 max_tokens: int = 64) -> Axes:
    """Token x layer entropy image of the first `max_tokens` rows; returns the Axes."""
    ax = _new_axes(ax, (12, 5))
    view = block_view(profile)
    entropy = view.to_numpy()[:max_tokens]
    n_layers = entropy.shape[1]
    image = ax.imshow(entropy, aspect="auto", cmap="viridis", origin="upper")
    plt.colorbar(image, ax=ax, label=f"Entropy (α={profile.alpha})")
    ticks = np.linspace(0, n_layers - 1, min(6, n_layers)).astype(int)
    if normalize_x:
        ax.set_xticks(ticks, [f"{v:.1f}" for v in np.linspace(0, 1, len(ticks))])
        ax.set_xlabel("Layer depth (normalized)")
    else:
        ax.set_xticks(ticks, [str(view.layer_indices[t]) for t in ticks])
        ax.set_xlabel("Layer index")
    ax.set_ylabel("Token position")
    ax.set_title(f"{profile.model_name} — entropy heatmap")
    _plain_frame(ax)
    return ax


def plot_aggregated(aggregated: AggregatedProfile, ax: Axes | None = None,
                    normalize_x: bool = True, label: str | None = None, color=None) -> Axes:
    """Mean over prompts of the per-prompt mean profiles, +/- 1 std; returns the Axes."""
    ax = _new_axes(ax, (8, 4))
    view = aggregated.blocks()
    matrix = view.to_matrix().detach().cpu().float().numpy()
    mean, std = matrix.mean(axis=0), matrix.std(axis=0)
    x, xlabel = _depth_axis(view.layer_indices, normalize_x)
    ax.plot(x, mean, linewidth=2, label=label or aggregated.model_name, color=color)
    ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=color)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"Entropy (α={aggregated.profiles[0].alpha})")
    _plain_frame(ax)
    return ax


def _resample(values: np.ndarray, length: int) -> np.ndarray:
    if len(values) == length:
        return values
    return np.interp(np.linspace(0, 1, length), np.linspace(0, 1, len(values)), values)


def _features(profile: EntropyProfile, feature: str, target_len: int) -> np.ndarray:
    """0.2.1's feature vector of one profile: "mean", "delta", "bucketed" or "full"."""
    mean = block_view(profile).mean_profile().numpy()
    if feature == "mean":
        return _resample(mean, target_len)
    if feature == "delta":
        return _resample(np.diff(mean), target_len)
    if feature == "bucketed":
        third, two_thirds = len(mean) // 3, 2 * len(mean) // 3
        return np.array([mean[:third].mean(), mean[third:two_thirds].mean(),
                         mean[two_thirds:].mean()])
    if feature == "full":
        return np.concatenate([_resample(mean, target_len),
                               _resample(np.diff(mean), target_len)])
    raise ValueError(f"feature must be 'mean', 'delta', 'bucketed', or 'full', got '{feature}'")


def _balanced_subsample(profiles: list, labels: list, n_samples: int,
                        random_state: int) -> tuple[list, list]:
    """At most n_samples profiles per label, drawn without replacement, in input order."""
    rng = np.random.default_rng(random_state)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    keep = sorted(i for indices in by_label.values()
                  for i in rng.choice(indices, size=min(n_samples, len(indices)),
                                      replace=False).tolist())
    return [profiles[i] for i in keep], [labels[i] for i in keep]


def _reduce(data: np.ndarray, method: str, precomputed: bool, perplexity: float,
            n_neighbors: int, min_dist: float, random_state: int) -> np.ndarray:
    """(n, 2) coordinates of features (or a precomputed distance matrix) by `method`."""
    n = data.shape[0]
    metric = {"metric": "precomputed"} if precomputed else {}
    if method == "pca":
        if precomputed:
            raise ValueError("PCA does not support precomputed distance matrices. Use "
                             "metric='euclidean' with PCA, or choose method='tsne' or 'umap'.")
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=random_state).fit_transform(data)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=min(perplexity, n - 1),
                    random_state=random_state, **metric).fit_transform(data)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ImportError("umap-learn not installed. Run: pip install umap-learn") from None
        return umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, n - 1),
                         min_dist=min_dist, random_state=random_state,
                         **metric).fit_transform(data)
    raise ValueError(f"method must be 'tsne', 'umap', or 'pca', got '{method}'")


def plot_cluster(profiles: list[EntropyProfile], labels: list[str] | None = None,
                 method: Literal["tsne", "umap", "pca"] = "tsne",
                 feature: Literal["mean", "delta", "bucketed", "full"] = "mean",
                 metric: Literal["euclidean", "jsd", "wasserstein", "fisher_rao",
                                 "srvf"] = "euclidean",
                 color_by: Literal["label", "model"] = "label", n_samples: int | None = None,
                 figsize: tuple[float, float] = (8, 7), perplexity: float = 30.0,
                 n_neighbors: int = 15, min_dist: float = 0.1, random_state: int = 42,
                 title: str | None = None) -> Figure:
    """2-D t-SNE / UMAP / PCA scatter of profiles; returns the new Figure.

    metric="euclidean" embeds standardised `feature` vectors; another metric embeds the
    pairwise_distances matrix (not with PCA).
    """
    labels = list(labels) if labels is not None else [p.model_name for p in profiles]
    profiles = list(profiles)
    if n_samples is not None:
        profiles, labels = _balanced_subsample(profiles, labels, n_samples, random_state)
    precomputed = metric != "euclidean"
    if precomputed:
        data = pairwise_distances(profiles, metric=metric)
    else:
        target_len = max(block_view(p).n_layers for p in profiles)
        data = np.stack([_features(p, feature, target_len) for p in profiles])
        data = (data - data.mean(axis=1, keepdims=True)) / (data.std(axis=1, keepdims=True)
                                                           + 1e-8)
    coords = _reduce(data, method, precomputed, perplexity, n_neighbors, min_dist,
                     random_state)
    keys = labels if color_by == "label" else [p.model_name for p in profiles]
    unique = list(dict.fromkeys(keys))
    palette = plt.get_cmap("tab10")(np.linspace(0, 1, max(len(unique), 1)))
    fig, ax = plt.subplots(figsize=figsize)
    for key, color in zip(unique, palette, strict=False):
        mask = np.array([k == key for k in keys])
        ax.scatter(coords[mask, 0], coords[mask, 1], color=color, label=key, s=60, alpha=0.85,
                   edgecolors="none")
    ax.legend(frameon=False, fontsize=9, markerscale=1.2)
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    what = metric if precomputed else feature
    ax.set_title(title or f"Entropy profile clusters — {method.upper()} ({what})")
    _plain_frame(ax)
    fig.tight_layout()
    return fig
