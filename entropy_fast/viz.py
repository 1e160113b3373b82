"""Matplotlib plots of profiles, collections of profiles and layer analyses.

Owns every plot of the package. Each function draws on the Axes it is given (a new
figure's otherwise), labels its axes, adds a legend or colorbar where one is needed, and
returns the Axes. Layers are placed at their index in the profile's numbering, which the
axis label names (hidden-state index, 0 = embeddings, or 0.2.1's block index); profiles of
mixed numberings are drawn together on the hidden-state axis.

Colours: each model (label) keeps one colour in every plot of a store. `model_colors`
gives the k-th of the sorted labels the k-th colour of tab10; the CLI passes every model
of the store, so its profile and compare plots agree, and `plot_profiles`, `plot_cluster`
and `plot_mean_curves` take the same mapping as `colors` (default: their own labels,
sorted, so the order of the input changes no colour). `save_figure` wraps titles wider
than their Axes, so that none is cut at the figure's edge.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from entropy_fast.distances import DEFAULT_BIN_WIDTH, pairwise_distances
from entropy_fast.profile import HIDDEN_STATE, AggregatedProfile, EntropyProfile, layer_axis_label

CLUSTER_METHODS = ("pca", "tsne", "umap")
CLUSTER_FEATURES = ("mean", "distance")
_METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
# Up to this many points exact t-SNE is faster than Barnes-Hut (and deterministic).
_EXACT_TSNE_MAX = 300
PALETTE = "tab10"


def model_colors(labels: Iterable[str]) -> dict[str, Any]:
    """{label: colour}: the k-th of the sorted distinct labels takes the k-th colour of
    PALETTE (cycling past its 10). Given all the models of a store, every plot of that
    store draws a model in the same colour, whatever subset it shows, in whatever order."""
    palette = plt.get_cmap(PALETTE).colors
    return {label: palette[k % len(palette)] for k, label in enumerate(sorted(set(labels)))}


def _colors(labels: Iterable[str], colors: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's colours, and `model_colors(labels)` for the labels they leave out."""
    return {**model_colors(labels), **(colors or {})}


def _axes(ax: Axes | None) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=(7, 4.2))[1]


def _unit(profile: EntropyProfile) -> str:
    base = profile.metadata.get("base")
    if base is None:
        return "nats"
    return "bits" if base == 2 else f"log base {base:g}"


def _entropy_label(profile: EntropyProfile, what: str = "entropy") -> str:
    order = "Shannon" if profile.alpha == 1.0 else f"Rényi α={profile.alpha:g}"
    return f"{what} ({order}, {_unit(profile)})"


def _profile_list(profiles: Sequence[EntropyProfile] | AggregatedProfile) -> list[EntropyProfile]:
    profiles = profiles.profiles if isinstance(profiles, AggregatedProfile) else list(profiles)
    if not profiles:
        raise ValueError("no profiles to plot: pass at least one EntropyProfile")
    return profiles


def _shared_numbering(profiles: Sequence[EntropyProfile]) -> str:
    """The profiles' numbering, or the hidden-state one when they mix numberings."""
    numberings = {p.numbering for p in profiles}
    return numberings.pop() if len(numberings) == 1 else HIDDEN_STATE


def plot_profile(profile: EntropyProfile, ax: Axes | None = None, label: str | None = None,
                 color: Any = None, show_std: bool = True) -> Axes:
    """Mean entropy over tokens at each layer, with a ±1 std band over tokens."""
    if profile.n_tokens == 0:
        raise ValueError("the profile is empty (0 tokens): nothing to plot")
    ax = _axes(ax)
    x = np.asarray(profile.layer_indices)
    mean = profile.mean_profile().double().numpy()
    line = ax.plot(x, mean, marker="o", markersize=3, color=color,
                   label=label or profile.model_name or "mean")[0]
    if show_std:
        std = profile.std_profile().double().numpy()
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2,
                        label="±1 std over tokens")
    ax.set_xlabel(layer_axis_label(profile.numbering))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(_entropy_label(profile))
    ax.set_title(f"Entropy profile ({profile.n_tokens} tokens)")
    ax.legend(loc="best")
    return ax


def plot_profiles(profiles: Sequence[EntropyProfile] | AggregatedProfile,
                  labels: Sequence[str] | None = None, ax: Axes | None = None,
                  show_std: bool = False, colors: Mapping[str, Any] | None = None) -> Axes:
    """Mean profiles of several profiles on one Axes, one labelled line each.

    colors: {label: colour}; a label it lacks takes its `model_colors(labels)` colour.
    """
    profiles = _profile_list(profiles)
    if labels is not None and len(labels) != len(profiles):
        raise ValueError(f"got {len(labels)} labels for {len(profiles)} profiles")
    labels = labels or [p.model_name or f"profile {k}" for k, p in enumerate(profiles)]
    colors = _colors(labels, colors)
    ax = _axes(ax)
    numbering = _shared_numbering(profiles)
    for profile, label in zip(profiles, labels, strict=True):
        profile = profile.to_numbering(numbering)
        x = np.asarray(profile.layer_indices)
        mean = profile.mean_profile().double().numpy()
        ax.plot(x, mean, marker="o", markersize=3, label=label, color=colors[label])
        if show_std:
            std = profile.std_profile().double().numpy()
            ax.fill_between(x, mean - std, mean + std, color=colors[label], alpha=0.15)
    ax.set_xlabel(layer_axis_label(numbering))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(_entropy_label(profiles[0], "mean entropy"))
    ax.set_title("Entropy profiles")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_heatmap(profile: EntropyProfile, ax: Axes | None = None, cmap: str = "viridis",
                 token_labels: Sequence[str] | None = None) -> Axes:
    """Token x layer entropy matrix as an image, with a colorbar.

    token_labels: optional text of each row (e.g. the decoded tokens), shown on the y axis.
    """
    if profile.n_tokens == 0:
        raise ValueError("the profile is empty (0 tokens): nothing to plot")
    if token_labels is not None and len(token_labels) != profile.n_tokens:
        raise ValueError(f"got {len(token_labels)} token labels for {profile.n_tokens} tokens")
    ax = _axes(ax)
    image = ax.imshow(profile.to_numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
    ticks = np.unique(np.linspace(0, profile.n_layers - 1, min(profile.n_layers, 12)).round())
    ax.set_xticks(ticks, [str(profile.layer_indices[int(t)]) for t in ticks])
    if token_labels is not None:
        ax.set_yticks(range(profile.n_tokens), list(token_labels), fontsize="x-small")
    ax.set_xlabel(layer_axis_label(profile.numbering))
    ax.set_ylabel("token position (row)")
    ax.set_title("Entropy per token and layer")
    ax.figure.colorbar(image, ax=ax, label=_entropy_label(profile))
    return ax


def plot_aggregated(agg: AggregatedProfile, ax: Axes | None = None,
                    show_prompts: bool = True) -> Axes:
    """Mean over prompts of the per-prompt mean profiles, ±1 std over prompts.

    show_prompts: also draw each prompt's mean profile as a thin line.
    """
    profiles = _profile_list(agg)
    ax = _axes(ax)
    x = np.asarray(agg.layer_indices)
    matrix = agg.to_matrix().double().numpy()
    if show_prompts:
        for k, row in enumerate(matrix):
            ax.plot(x, row, color="grey", alpha=0.3, linewidth=0.7,
                    label="single prompts" if k == 0 else None)
    mean, std = agg.mean_profile().double().numpy(), agg.std_profile().double().numpy()
    ax.plot(x, mean, color="C0", marker="o", markersize=3, label=f"mean of {len(agg)} prompts")
    ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.2, label="±1 std over prompts")
    ax.set_xlabel(layer_axis_label(agg.numbering))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(_entropy_label(profiles[0], "mean entropy"))
    ax.set_title(f"Aggregated profile{f' of {agg.model_name}' if agg.model_name else ''}")
    ax.legend(loc="best")
    return ax


def _classical_mds(distances: np.ndarray) -> np.ndarray:
    """(n x 2) classical MDS: top-2 principal coordinates of the double-centred D^2."""
    n = distances.shape[0]
    centring = np.eye(n) - 1.0 / n
    gram = -0.5 * centring @ (distances ** 2) @ centring
    values, vectors = np.linalg.eigh(gram)
    top = np.argsort(values)[::-1][:2]
    return vectors[:, top] * np.sqrt(np.clip(values[top], 0.0, None))


def _embed(profiles: list[EntropyProfile], method: str, feature: str, metric: str,
           bin_width: float, random_state: int) -> np.ndarray:
    n = len(profiles)
    if feature == "mean":
        data = torch.stack([p.mean_profile().double() for p in profiles]).numpy()
    else:
        data = pairwise_distances(profiles, metric, bin_width=bin_width)
    if method == "pca":
        if feature == "distance":
            return _classical_mds(data)
        from sklearn.decomposition import PCA

        return PCA(n_components=2).fit_transform(data)
    precomputed = "precomputed" if feature == "distance" else "euclidean"
    if method == "tsne":
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3.0), metric=precomputed,
                    init="random" if feature == "distance" else "pca",
                    method="exact" if n <= _EXACT_TSNE_MAX else "barnes_hut",
                    random_state=random_state)
        return tsne.fit_transform(data)
    try:
        import umap
    except ImportError as error:
        raise ValueError("method='umap' needs the umap-learn package (pip install "
                         "umap-learn); use method='pca' or 'tsne' instead") from error
    reducer = umap.UMAP(n_components=2, metric=precomputed, n_neighbors=min(15, n - 1),
                        random_state=random_state)
    return reducer.fit_transform(data)


def plot_cluster(profiles: Sequence[EntropyProfile] | AggregatedProfile,
                 labels: Sequence[str] | None = None, method: str = "pca",
                 feature: str = "mean", metric: str = "wasserstein", ax: Axes | None = None,
                 bin_width: float = DEFAULT_BIN_WIDTH, random_state: int = 0,
                 colors: Mapping[str, Any] | None = None) -> Axes:
    """2-D embedding of many profiles, one point each, coloured by label.

    feature="mean": embed the (n_layers,) mean profiles; feature="distance": embed the
    pairwise_distances(profiles, metric) matrix (pca then means classical MDS).
    method: "pca", "tsne" (scikit-learn) or "umap" (umap-learn, when installed).
    labels: a group name per profile (legend); default: the model names.
    colors: {label: colour}; a label it lacks takes its `model_colors(labels)` colour.
    """
    profiles = _profile_list(profiles)
    if method not in CLUSTER_METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {CLUSTER_METHODS}")
    if feature not in CLUSTER_FEATURES:
        raise ValueError(f"unknown feature {feature!r}: use one of {CLUSTER_FEATURES}")
    if len(profiles) < 3:
        raise ValueError(f"plot_cluster needs at least 3 profiles, got {len(profiles)}")
    if labels is not None and len(labels) != len(profiles):
        raise ValueError(f"got {len(labels)} labels for {len(profiles)} profiles")
    labels = list(labels) if labels is not None else [p.model_name or "profiles"
                                                      for p in profiles]
    colors = _colors(labels, colors)
    points = _embed(profiles, method, feature, metric, bin_width, random_state)
    ax = _axes(ax)
    for group in dict.fromkeys(labels):
        mask = np.array([label == group for label in labels])
        ax.scatter(points[mask, 0], points[mask, 1], s=18, alpha=0.8, label=str(group),
                   color=colors[group])
    what = "mean profiles" if feature == "mean" else f"{metric} distances"
    name = "MDS" if (method, feature) == ("pca", "distance") else _METHOD_NAMES[method]
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_title(f"{name} of {len(profiles)} profiles ({what})")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_layer_importance(importance: Mapping[str, np.ndarray] | Any,
                          layer_indices: Sequence[int] | None = None,
                          ax: Axes | None = None) -> Axes:
    """Layer-importance curves on one Axes, each scaled to [0, 1] by its own range.

    importance: LayerAnalyzer.layer_importance()'s dict, or a LayerAnalyzer (then its
    layer_indices are used). The legend gives each metric's range before scaling.
    """
    numbering = HIDDEN_STATE
    if hasattr(importance, "layer_importance"):
        layer_indices = layer_indices or importance.layer_indices
        numbering = importance.profile.numbering
        importance = importance.layer_importance()
    if not importance:
        raise ValueError("no metrics to plot: pass LayerAnalyzer.layer_importance()")
    n_layers = len(next(iter(importance.values())))
    x = np.asarray(layer_indices if layer_indices is not None else range(n_layers))
    ax = _axes(ax)
    for name, values in importance.items():
        values = np.asarray(values, dtype=np.float64)
        lo, hi = values.min(), values.max()
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        ax.plot(x, scaled, marker="o", markersize=3, label=f"{name} [{lo:.3g}, {hi:.3g}]")
    ax.set_xlabel(layer_axis_label(numbering))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("metric scaled to [0, 1]")
    ax.set_title("Layer importance")
    ax.legend(loc="best", fontsize="small")
    return ax


def _depth_trajectory(ax: Axes, x: np.ndarray, y: np.ndarray, profile: EntropyProfile) -> None:
    """Line through the layers in depth order, points coloured by layer, with a colorbar."""
    ax.plot(x, y, color="grey", linewidth=0.8, zorder=1)
    points = ax.scatter(x, y, c=np.asarray(profile.layer_indices), cmap="viridis", s=30,
                        zorder=2)
    bar = ax.figure.colorbar(points, ax=ax, label=layer_axis_label(profile.numbering))
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    ax.annotate("first", (x[0], y[0]), textcoords="offset points", xytext=(5, 5))
    ax.annotate("output", (x[-1], y[-1]), textcoords="offset points", xytext=(5, 5))


def plot_information_plane(analyzer: Any, method: str = "cka", ax: Axes | None = None) -> Axes:
    """Each layer as a point (mean entropy, dependence on the output layer's states).

    analyzer: a LayerAnalyzer with hidden states; method as in LayerAnalyzer.layer_mi.
    """
    entropy, dependence = analyzer.layer_entropy(), analyzer.layer_mi(method)
    ax = _axes(ax)
    _depth_trajectory(ax, entropy, dependence, analyzer.profile)
    ax.set_xlabel(_entropy_label(analyzer.profile, "mean entropy"))
    ax.set_ylabel("linear CKA with output layer" if method == "cka"
                  else "Rényi MI with output layer (nats)")
    ax.set_title("Information plane")
    return ax


def plot_velocity_entropy(analyzer: Any, ax: Axes | None = None) -> Axes:
    """Each layer as a point (mean entropy, information velocity into that layer)."""
    entropy, velocity = analyzer.layer_entropy(), analyzer.information_velocity()
    ax = _axes(ax)
    _depth_trajectory(ax, entropy, velocity, analyzer.profile)
    ax.set_xlabel(_entropy_label(analyzer.profile, "mean entropy"))
    ax.set_ylabel(f"velocity: W1 from previous layer ({_unit(analyzer.profile)})")
    ax.set_title("Velocity vs entropy")
    return ax


def plot_mean_curves(curves: Mapping[str, tuple[Sequence[int], Sequence[float],
                                                Sequence[float]]],
                     ax: Axes | None = None, title: str = "", unit: str = "nats",
                     colors: Mapping[str, Any] | None = None, relative: bool = False) -> Any:
    """Mean ± std curves (layers, mean, std) per label on one Axes; returns its Figure.

    colors: {label: colour}; a label it lacks takes its `model_colors(curves)` colour.

    x is the hidden-state index, or the relative depth layer / last layer when the curves
    end at different depths or `relative` asks for it. The y axis shows plain values (no
    offset), so a nearly constant profile reads at its level.
    """
    colors = _colors(curves, colors)
    ax = _axes(ax)
    depths = {max(layers, default=0) for layers, _, _ in curves.values()}
    relative = relative or len(depths) > 1
    for label, (layers, mean, std) in curves.items():
        x = np.asarray(layers, dtype=float)
        x = x / max(x.max(), 1) if relative else x
        mean, std = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
        ax.plot(x, mean, marker="o", markersize=3, label=label, color=colors[label])
        ax.fill_between(x, mean - std, mean + std, color=colors[label], alpha=0.2)
    if not relative:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("relative depth (layer / last layer)" if relative else
                  layer_axis_label(HIDDEN_STATE))
    ax.set_ylabel(f"entropy ({unit})")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax.figure


def save_figure(figure: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure as PNG (creating folders) and close it; returns the path. Titles wider
    than their Axes are wrapped first (tight_layout makes room above, never beside)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _wrap_titles(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def _wrap_titles(figure: Any) -> None:
    """Wrap each Axes title onto as many lines as it takes to be no wider than its Axes:
    centred over them, it then stays inside the figure."""
    for ax in figure.axes:
        text = " ".join(ax.title.get_text().split())
        room = ax.get_window_extent().width
        chars = len(text)
        while chars > 1 and ax.title.get_window_extent().width > room:
            chars -= max(1, chars // 20)
            ax.title.set_text(textwrap.fill(text, chars))


def plot_distance_matrix(distances: np.ndarray, labels: Sequence[str], metric: str = "",
                         ax: Axes | None = None) -> Axes:
    """A heatmap of an (n x n) distance matrix, each cell annotated with its value
    (`distances.METRICS` name in the title); long labels keep their end."""
    distances = np.asarray(distances, dtype=float)
    if distances.shape != (len(labels), len(labels)):
        raise ValueError(f"a {distances.shape} matrix for {len(labels)} labels")
    ax = _axes(ax)
    image = ax.imshow(distances, cmap="viridis")
    short = [label if len(label) <= 24 else "…" + label[-23:] for label in labels]
    ax.set_xticks(range(len(labels)), short, rotation=90, fontsize="small")
    ax.set_yticks(range(len(labels)), short, fontsize="small")
    high = np.nanmax(distances) if distances.size else 0.0
    for (i, j), value in np.ndenumerate(distances):
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize="x-small",
                color="black" if value > 0.6 * high else "white")
    ax.set_title(f"{metric} distance" if metric else "distance", fontsize="medium")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax


def token_texts(vocab: Any, ids: Iterable[int]) -> list[str]:
    """Short readable text of token ids for plot cells: `vocab` is a tokenizer (anything
    with .decode), a sequence or mapping id -> text, or None (the ids themselves).
    Whitespace shows as visible marks (space ␣, newline ⏎, tab ⇥)."""
    texts = []
    for i in ids:
        i = int(i)
        if vocab is None:
            text = str(i)
        elif hasattr(vocab, "decode"):
            text = vocab.decode([i])
        else:
            text = vocab[i] if (isinstance(vocab, Mapping) or 0 <= i < len(vocab)) else ""
        text = text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
        texts.append(text if len(text) <= 7 else text[:6] + "…")
    return texts


def plot_logit_lens(profile: EntropyProfile, vocab: Any = None, *, color: str = "prob",
                    positions: slice | None = None, ax: Axes | None = None) -> Axes:
    """The classic logit-lens grid: layers (rows, the last on top) x positions (columns),
    each cell the lens's most probable token at that layer, coloured by its probability
    (color="prob", needs a profile with top_tokens) or by the entropy (color="entropy").

    vocab: a tokenizer, or token id -> text (a store's `vocab` view), to show text; None
    shows ids. positions: the columns to show (default: the first 40 rows); each column is
    labelled with the token its row predicts. Readable at 30 layers x 40 positions.
    """
    if profile.top_tokens is None and profile.top_token_ids is None:
        raise ValueError("the profile has no top tokens: profile with top_tokens=K "
                         "(--top-tokens K) or top_token=True")
    if color not in ("prob", "entropy"):
        raise ValueError(f"color must be 'prob' or 'entropy', got {color!r}")
    if color == "prob" and profile.top_probs is None:
        raise ValueError("color='prob' needs top_probs: profile with top_tokens=K, or use "
                         "color='entropy'")
    rows = positions or slice(0, min(profile.n_tokens, 40))
    top = (profile.top_tokens[..., 0] if profile.top_tokens is not None
           else profile.top_token_ids)[rows].T.numpy()              # (layers x positions)
    values = (profile.top_probs[..., 0] if color == "prob" else profile.entropy)[rows].T.numpy()
    n_layers, n_pos = top.shape
    if n_pos == 0:
        raise ValueError("no positions to plot: the profile is empty or `positions` is")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.55 * n_pos + 2), max(3.0, 0.3 * n_layers + 1.8)))
    cmap = "Blues" if color == "prob" else "viridis_r"
    image = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest",
                      vmin=0.0, vmax=1.0 if color == "prob" else None)
    size = 7 if n_pos <= 25 else 6
    threshold = 0.5 * (values.max() + values.min())
    for (layer, pos), text in zip(np.ndindex(n_layers, n_pos),
                                  token_texts(vocab, top.reshape(-1)), strict=True):
        dark = (values[layer, pos] > threshold) == (color == "prob")
        ax.text(pos, layer, text, ha="center", va="center", fontsize=size,
                color="white" if dark else "black")
    start = rows.start or 0
    predicted = token_texts(vocab, profile.token_ids[rows].tolist())
    ax.set_xticks(range(n_pos), [f"{start + p}→{t}" for p, t in enumerate(predicted)],
                  rotation=90, fontsize=size)
    ax.set_yticks(range(n_layers), [str(i) for i in profile.layer_indices], fontsize=size)
    ax.set_xlabel("position → the token its row predicts")
    ax.set_ylabel(layer_axis_label(profile.numbering))
    ax.set_title(f"Logit lens: the most probable token at each layer ({profile.model_name})")
    label = "probability of the top token" if color == "prob" else _entropy_label(profile)
    ax.figure.colorbar(image, ax=ax, label=label, fraction=0.03, pad=0.01)
    return ax
