"""entropy-profiler 0.2.1's `entropy_profiler.analysis`: LayerAnalyzer and its plots.

Owns 0.2.1's per-layer metrics of one profile, which differ from entropy_fast.analysis:

- `fisher_rao_velocity` / `distance_to_output`: the Bhattacharyya angle (arccos, radians)
  between the vectors of per-token entropies of two layers, each treated as a distribution
  over tokens (entropy_fast's distance_to_output compares lens distributions instead);
- `jsd_to_output`: base-2 JSD (bits) on n_bins bins spanning the whole profile's range;
- `layer_mi`: 0.2.1's matrix Rényi MI (bits) or linear CKA of each layer's states against
  the last column's, with the last entry set to 1.0; zeros (and a warning) without states
  or with fewer than 4 tokens; cached per method;
- `layer_entropy` is float32, the other metrics float64, all (n_layers,) in 0.2.1's
  numbering (a native profile is seen through `.blocks()`).

Hidden states are 0.2.1's (n_tokens, n_layers, d_model), as its profile_text_with_states
returns them. The plots return what 0.2.1's returned (Figures, or the Axes drawn on);
heatmaps are drawn with matplotlib rather than seaborn.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy.stats import wasserstein_distance

from entropy_fast.estimators import linear_cka
from entropy_profiler.distances import (
    bhattacharyya_angle,
    block_view,
    entropy_histogram,
    jsd_bits,
)
from entropy_profiler.estimators import MatrixRenyiMI
from entropy_profiler.profiler import EntropyProfile, EntropyProfiler


class LayerAnalyzer:
    """0.2.1's per-layer metrics of one profile (see the module docstring).

    Parameters
    ----------
    profiler : EntropyProfiler or None
        The profiler that made the profile (its device runs the Rényi MI), or None.
    profile : EntropyProfile
        The profile to analyse.
    hidden_states : torch.Tensor or None
        (n_tokens, n_layers, hidden_size) states for `layer_mi`.
    """

    def __init__(self, profiler: EntropyProfiler | None, profile: EntropyProfile,
                 hidden_states: torch.Tensor | None = None) -> None:
        self.profiler = profiler
        self.profile = profile
        self._hidden_states = hidden_states
        self._mi_cache: dict[str, np.ndarray] = {}

    @property
    def n_layers(self) -> int:
        """Number of profiled layers."""
        return block_view(self.profile).n_layers

    @property
    def n_tokens(self) -> int:
        """Number of profiled tokens."""
        return self.profile.n_tokens

    @property
    def model_name(self) -> str:
        """Name of the underlying model."""
        return self.profile.model_name

    def _entropy(self) -> np.ndarray:
        return block_view(self.profile).to_numpy()

    def _to_layer(self, reference: int | None, compare) -> np.ndarray:
        """compare(column i, column of `reference` or i - 1) per layer; layer 0 stays 0
        when comparing consecutive layers."""
        e = self._entropy()
        values = np.zeros(e.shape[1], dtype=np.float64)
        for i in range(e.shape[1]):
            if reference is not None:
                values[i] = compare(e[:, i], e[:, reference])
            elif i > 0:
                values[i] = compare(e[:, i], e[:, i - 1])
        return values

    def layer_entropy(self) -> np.ndarray:
        """(n_layers,) float32 mean entropy over tokens."""
        return block_view(self.profile).mean_profile().numpy()

    def information_velocity(self) -> np.ndarray:
        """(n_layers,) Wasserstein-1 between consecutive layers' entropies; 0 at layer 0."""
        return self._to_layer(None, wasserstein_distance)

    def fisher_rao_velocity(self) -> np.ndarray:
        """(n_layers,) Bhattacharyya angle between consecutive layers; 0 at layer 0."""
        return self._to_layer(None, bhattacharyya_angle)

    def distance_to_output(self) -> np.ndarray:
        """(n_layers,) Bhattacharyya angle between each layer and the last, radians."""
        return self._to_layer(-1, bhattacharyya_angle)

    def jsd_to_output(self, n_bins: int = 50) -> np.ndarray:
        """(n_layers,) base-2 JSD between each layer's entropy histogram and the last's."""
        e = self._entropy()
        bin_range = (float(e.min()) - 1e-6, float(e.max()) + 1e-6)
        last = entropy_histogram(e[:, -1], n_bins, bin_range)
        return np.array([jsd_bits(entropy_histogram(e[:, i], n_bins, bin_range), last)
                         for i in range(e.shape[1])], dtype=np.float64)

    def layer_mi(self, method: Literal["renyi", "cka"] = "renyi") -> np.ndarray:
        """(n_layers,) dependence of each layer's states on the last column's (last = 1.0)."""
        if method in self._mi_cache:
            return self._mi_cache[method]
        if self._hidden_states is None or self.n_tokens < 4:
            warnings.warn(
                "Hidden states not available — layer_mi() returns zeros. Use "
                "profile_text_with_states() and pass hidden_states to LayerAnalyzer."
                if self._hidden_states is None else
                f"Only {self.n_tokens} tokens — too few for reliable MI estimation.  "
                "Returning zeros.", stacklevel=2)
            result = np.zeros(self.n_layers, dtype=np.float64)
        else:
            result = self._mi(method)
        self._mi_cache[method] = result
        return result

    @torch.no_grad()
    def _mi(self, method: str) -> np.ndarray:
        states = self._hidden_states.float()
        final = states[:, -1, :].cpu().numpy()
        if method == "renyi":
            device = getattr(self.profiler, "device", None) or "cpu"
            estimator = MatrixRenyiMI(alpha=1.01, device=device)
            measure = estimator.compute_mi
        elif method == "cka":
            def measure(x: np.ndarray, y: np.ndarray) -> float:
                value = linear_cka(torch.from_numpy(x), torch.from_numpy(y))
                return 0.0 if math.isnan(value) else value
        else:
            raise ValueError(f"method must be 'renyi' or 'cka', got '{method}'")
        result = np.ones(self.n_layers, dtype=np.float64)
        for i in range(self.n_layers - 1):
            result[i] = measure(states[:, i, :].cpu().numpy(), final)
        return result

    def layer_importance(self) -> dict[str, np.ndarray]:
        """The four non-MI metrics: entropy, velocity, distance_to_output, jsd_to_output."""
        return {"entropy": self.layer_entropy(), "velocity": self.information_velocity(),
                "distance_to_output": self.distance_to_output(),
                "jsd_to_output": self.jsd_to_output()}


_IMPORTANCE_PANELS = (
    ("entropy", "Shannon Entropy (nats)", "RdPu"),
    ("velocity", "Information Velocity (Wasserstein)", "Blues"),
    ("distance_to_output", "Distance to Output (radians)", "PuRd"),
    ("jsd_to_output", "JSD to Output", "Greens"),
)


def _resampled(values: np.ndarray, n_points: int) -> np.ndarray:
    """values over relative depth, linearly resampled at n_points equal steps."""
    if len(values) == n_points:
        return values
    return np.interp(np.linspace(0, 1, n_points), np.linspace(0, 1, len(values)), values)


def plot_layer_importance(analyzers: dict[str, LayerAnalyzer], subtitle: str = "",
                          figsize: tuple[float, float] = (14, 10)) -> Figure:
    """2x2 heatmaps (models x relative depth) of the four layer-importance metrics."""
    fig, axes = plt.subplots(2, 2, figsize=figsize)
    names = list(analyzers)
    width = max(a.n_layers for a in analyzers.values())
    importance = {name: analyzers[name].layer_importance() for name in names}
    for ax, (key, title, cmap) in zip(axes.flat, _IMPORTANCE_PANELS, strict=True):
        data = np.array([_resampled(importance[name][key], width) for name in names])
        image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0,
                          vmax=float(data.max()) if data.max() > 0 else 1.0)
        fig.colorbar(image, ax=ax, label=title.split("(")[-1].rstrip(")")
                     if "(" in title else "Value")
        ax.set_yticks(range(len(names)),
                      [f"{name} ({analyzers[name].n_layers}L)" for name in names])
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("Layer (normalized)")
    fig.suptitle("Layer Importance Comparison" + (f"\n({subtitle})" if subtitle else ""),
                 fontsize=14, y=1.02)
    fig.tight_layout()
    return fig


def _trajectory(ax: Axes, analyzer: LayerAnalyzer, color) -> tuple[np.ndarray, np.ndarray]:
    """Velocity-entropy points of one analyzer with arrows in depth order and layer labels."""
    velocity, entropy = analyzer.information_velocity(), analyzer.layer_entropy()
    n_layers = len(velocity)
    for i in range(n_layers - 1):
        ax.annotate("", xy=(velocity[i + 1], entropy[i + 1]), xytext=(velocity[i], entropy[i]),
                    arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6, "lw": 1.5})
    ax.scatter(velocity, entropy, c=[color] * n_layers, s=60, alpha=0.8, edgecolors="white",
               linewidth=0.5, zorder=5)
    layers = block_view(analyzer.profile).layer_indices
    for i in range(0, n_layers, max(1, n_layers // 8)):
        ax.annotate(f"L{layers[i]}", (velocity[i], entropy[i]), xytext=(5, 5),
                    textcoords="offset points", fontsize=8, color=color)
    ax.set_xlabel("Information Velocity (Wasserstein)", fontsize=11)
    ax.set_ylabel("Shannon Entropy (nats)", fontsize=11)
    ax.grid(True, alpha=0.3)
    return velocity, entropy


def plot_information_plane(analyzers: dict[str, LayerAnalyzer], subtitle: str = "",
                           figsize: tuple[float, float] = (10, 8)) -> Figure:
    """Velocity-entropy trajectories of several models on one Axes."""
    fig, ax = plt.subplots(figsize=figsize)
    colors = plt.get_cmap("tab10")(np.linspace(0, 1, max(len(analyzers), 1)))
    for color, (name, analyzer) in zip(colors, analyzers.items(), strict=False):
        velocity, entropy = _trajectory(ax, analyzer, color)
        ax.annotate(name, (velocity[0], entropy[0]), xytext=(-10, 10),
                    textcoords="offset points", fontsize=9, fontweight="bold", color=color)
    title = "Velocity-Entropy Plane" + (f" [{subtitle}]" if subtitle else "")
    ax.set_title(title + "\nArrows show layer progression", fontsize=12)
    fig.tight_layout()
    return fig


def plot_velocity_entropy(analyzer: LayerAnalyzer, ax: Axes | None = None) -> Axes:
    """Velocity-entropy trajectory of one model; returns the Axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 6))
    _trajectory(ax, analyzer, "C0")
    ax.set_title(f"{analyzer.model_name}\nVelocity-Entropy Trajectory", fontsize=11)
    ax.figure.tight_layout()
    return ax


def compare_models(profilers: dict[str, EntropyProfiler], prompt: str,
                   max_new_tokens: int = 32, subtitle: str = "") -> tuple[Figure, Figure]:
    """Profile `prompt` with every profiler; (layer-importance figure, velocity plane)."""
    analyzers = {}
    for name, profiler in profilers.items():
        profile, states = profiler.profile_text_with_states(prompt,
                                                            max_new_tokens=max_new_tokens)
        analyzers[name] = LayerAnalyzer(profiler, profile, hidden_states=states)
    return (plot_layer_importance(analyzers, subtitle=subtitle),
            plot_information_plane(analyzers, subtitle=subtitle))
