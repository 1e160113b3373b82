"""Layer analysis of one profile, and comparison of models by their mean profiles.

Owns `LayerAnalyzer` (per-layer metrics of one profile, optionally with its hidden states)
and `compare_models`. Metrics built from the profile alone (layer_entropy,
information_velocity, jsd_to_output) work on profiles read back from the store; those that
need hidden states (distance_to_output, layer_mi) say so when the states are missing.
The seed library's plotting helpers are importable from here as well (from viz).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any

import numpy as np
import torch

from entropy_fast.distances import (
    DEFAULT_BIN_WIDTH,
    METRICS,
    _check_bin_width,
    _check_profiles,
    _jsd_columns,
    _jsd_fitted_bins,
    _w1_columns,
    profile_distance,
)
from entropy_fast.estimators import MatrixRenyiMI, linear_cka
from entropy_fast.profile import HIDDEN_STATE, AggregatedProfile, EntropyProfile

MI_METHODS = ("renyi", "cka")
CURVE_METRICS = ("srvf", "fisher_rao")  # the metrics of distances.METRICS between mean curves
_VIZ_NAMES = ("plot_layer_importance", "plot_information_plane", "plot_velocity_entropy")
# Rows x vocabulary float64 elements per lens chunk in distance_to_output.
_LENS_CHUNK_ELEMENTS = 1 << 22


class LayerAnalyzer:
    """Per-layer metrics of one profile; every result is a (n_layers,) float64 array.

    Layer l is column l of the profile (index profile.layer_indices[l], counted as
    profile.numbering says); "the output" is the last profiled layer, column n_layers - 1.

    Args:
        profiler: the EntropyProfiler that made the profile (its `.lens` turns states into
            logits), or None for a profile read back from the store.
        profile: the EntropyProfile to analyse (at least one token).
        hidden_states: optional (n_layers x n_tokens x d_model) pre-norm states aligned with
            the profile's columns and rows, as profile_text_with_states returns them.
    """

    def __init__(self, profiler: Any, profile: EntropyProfile,
                 hidden_states: torch.Tensor | None = None) -> None:
        (self.profile,) = _check_profiles([profile], ["profile"])
        if hidden_states is not None:
            hidden_states = torch.as_tensor(hidden_states)
            expected = (profile.n_layers, profile.n_tokens)
            if hidden_states.ndim != 3 or tuple(hidden_states.shape[:2]) != expected:
                raise ValueError(
                    f"hidden_states must be (n_layers x n_tokens x d_model) = {expected} x d "
                    f"to match the profile, got {tuple(hidden_states.shape)}; pass the states "
                    "that profile_text_with_states returned with this profile")
        self.profiler = profiler
        self.hidden_states = hidden_states
        self._entropy = profile.entropy.detach().to("cpu", torch.float64)

    @property
    def layer_indices(self) -> list[int]:
        """Index of each analysed layer, in the profile's numbering."""
        return self.profile.layer_indices

    def _require_states(self, what: str, lens: bool = False) -> torch.Tensor:
        if self.hidden_states is None:
            raise ValueError(f"{what} needs hidden states: build the analyzer with "
                             "profiler.profile_text_with_states(...) and pass hidden_states")
        if lens and getattr(self.profiler, "lens", None) is None:
            raise ValueError(f"{what} needs the profiler's lens: pass the EntropyProfiler "
                             "that made the profile (not None, not unloaded)")
        return self.hidden_states

    def layer_entropy(self) -> np.ndarray:
        """Mean over tokens of the entropy at each layer (the profile's primary alpha)."""
        return self._entropy.mean(dim=0).numpy()

    def information_velocity(self) -> np.ndarray:
        """v_0 = 0, v_l = W1(entropies at layer l - 1, entropies at layer l).

        W1 is the Wasserstein-1 distance between the per-token entropy distributions of
        consecutive layers, as in distances.wasserstein_layer.
        """
        velocity = torch.zeros(self.profile.n_layers, dtype=torch.float64)
        if self.profile.n_layers > 1:
            velocity[1:] = _w1_columns(self._entropy[:, :-1], self._entropy[:, 1:])
        return velocity.numpy()

    def jsd_to_output(self, n_bins: int | None = None,
                      bin_width: float = DEFAULT_BIN_WIDTH) -> np.ndarray:
        """JSD (nats) between the per-token entropies at layer l and at the output layer.

        Histogram JSD on the fixed bins floor(v / bin_width), or on n_bins bins fitted to
        each layer's joint range when `n_bins` is given, as in distances.jsd_layer.
        """
        last = self._entropy[:, -1:].expand_as(self._entropy)
        if n_bins is not None:
            return _jsd_fitted_bins(self._entropy, last, n_bins)
        return _jsd_columns(self._entropy, last, _check_bin_width(bin_width)).numpy()

    @torch.no_grad()
    def distance_to_output(self) -> np.ndarray:
        """Mean over tokens of the Fisher-Rao distance between lens and output distributions.

        For token t, p = softmax(lens logits of layer l), q = the same at the output layer,
        over the vocabulary: d = 2 arccos(sum_v sqrt(p_v q_v)) = 4 arcsin(||sqrt p -
        sqrt q||_2 / 2), in [0, pi]; the result is the mean of d over the profile's tokens.
        Needs hidden states and the profiler's lens.
        """
        states = self._require_states("distance_to_output", lens=True)
        lens = self.profiler.lens
        device = getattr(self.profiler, "device", torch.device("cpu"))
        dtype = getattr(self.profiler, "dtype", torch.float32)
        n_layers, n_tokens, _ = states.shape
        chunk = max(1, _LENS_CHUNK_ELEMENTS // lens.vocab_size)
        total = torch.zeros(n_layers, dtype=torch.float64)

        def roots(layer: int, rows: slice) -> torch.Tensor:
            logits = lens.logits(states[layer, rows].to(device, dtype), normed=False)
            return torch.exp(0.5 * torch.log_softmax(logits.double(), dim=-1))

        for start in range(0, n_tokens, chunk):
            rows = slice(start, min(start + chunk, n_tokens))
            output = roots(n_layers - 1, rows)
            for layer in range(n_layers - 1):
                chord = torch.linalg.vector_norm(roots(layer, rows) - output, dim=-1)
                total[layer] += (4.0 * torch.asin((chord / 2.0).clamp_max(1.0))).sum().cpu()
        return (total / n_tokens).numpy()

    def layer_mi(self, method: str = "renyi", alpha: float = 1.01) -> np.ndarray:
        """Dependence between each layer's hidden states and the output layer's, over tokens.

        method="renyi": matrix-based Rényi mutual information I_alpha (nats), see
        estimators.MatrixRenyiMI; method="cka": linear CKA in [0, 1], see
        estimators.linear_cka. Needs hidden states and at least 2 tokens.
        """
        if method not in MI_METHODS:
            raise ValueError(f"unknown method {method!r}: use one of {MI_METHODS}")
        states = self._require_states("layer_mi")
        device = getattr(self.profiler, "device", None)
        output = states[-1]
        if method == "cka":
            return np.array([linear_cka(layer, output, device) for layer in states])
        estimator = MatrixRenyiMI(alpha, device)
        return np.array([estimator.mutual_information(layer, output) for layer in states])

    def layer_importance(self) -> dict[str, np.ndarray]:
        """The non-MI metrics by name: entropy, velocity, jsd_to_output and, when hidden
        states and the lens are available, distance_to_output."""
        importance = {"entropy": self.layer_entropy(), "velocity": self.information_velocity(),
                      "jsd_to_output": self.jsd_to_output()}
        if self.hidden_states is not None and getattr(self.profiler, "lens", None) is not None:
            importance["distance_to_output"] = self.distance_to_output()
        return importance


@dataclass(frozen=True)
class ModelComparison:
    """Mean profiles of several models on a shared relative-depth grid, and their distances.

    Attributes:
        names: the models, in input order.
        depth: (n_points,) relative depth in [0, 1] (0 = embeddings, 1 = last layer).
        curves: (n_models x n_points) mean entropy (each prompt weighs the same) resampled
            at `depth`, to draw the models on one axis.
        distances: (n_models x n_models) distances between the models' pooled profiles at
            relative depth (see compare_models); symmetric, zero diagonal.
        metric: one of distances.METRICS.
    """

    names: list[str]
    depth: np.ndarray
    curves: np.ndarray
    distances: np.ndarray
    metric: str

    def select(self, names: Sequence[str]) -> ModelComparison:
        """The same comparison restricted to `names`, in that order."""
        index = [self.names.index(n) for n in names]
        return replace(self, names=list(names), curves=self.curves[index],
                       distances=self.distances[np.ix_(index, index)])

    def plot(self, unit: str = "nats", colors: Mapping[str, Any] | None = None) -> Any:
        """A Figure: the mean curves at relative depth beside the distance heatmap."""
        import matplotlib.pyplot as plt

        from entropy_fast.viz import plot_distance_matrix, plot_mean_curves

        n = len(self.names)
        figure, (curves, matrix) = plt.subplots(1, 2, figsize=(12 + 0.3 * n, 4.5 + 0.2 * n))
        zeros = np.zeros(len(self.depth))
        plot_mean_curves({name: (self.depth, curve, zeros) for name, curve
                          in zip(self.names, self.curves, strict=True)}, ax=curves,
                         title="mean entropy at relative depth", unit=unit, colors=colors,
                         relative=True)
        plot_distance_matrix(self.distances, self.names, self.metric, ax=matrix)
        return figure


def _model_profiles(name: str, item: EntropyProfile | AggregatedProfile
                    | Sequence[EntropyProfile]) -> list[EntropyProfile]:
    """One model's profiles, checked, in HF's numbering, all of the same layers."""
    if isinstance(item, EntropyProfile):
        item = [item]
    profiles = item.profiles if isinstance(item, AggregatedProfile) else list(item)
    profiles = _check_profiles(profiles, [f"{name}[{k}]" for k in range(len(profiles))])
    profiles = [p.to_numbering(HIDDEN_STATE) for p in profiles]
    if len({tuple(p.layer_indices) for p in profiles}) > 1:
        raise ValueError(f"the profiles of {name} have different layer_indices: give each "
                         "model profiles from one profiler setting")
    if profiles[0].layer_indices[-1] <= 0:
        raise ValueError(f"{name} has no depth to compare (layer_indices "
                         f"{profiles[0].layer_indices})")
    return profiles


def _mean_curve(profiles: list[EntropyProfile]) -> tuple[np.ndarray, np.ndarray]:
    """(relative depth, mean profile) of one model; every prompt weighs the same."""
    layers = np.asarray(profiles[0].layer_indices, dtype=np.float64)
    curve = torch.stack([p.entropy.double().mean(dim=0) for p in profiles]).mean(dim=0)
    return layers / layers[-1], curve.numpy()


def compare_models(profiles: Mapping[str, EntropyProfile | AggregatedProfile
                                     | Sequence[EntropyProfile]],
                   metric: str = "srvf", n_points: int | None = None,
                   bin_width: float = DEFAULT_BIN_WIDTH) -> ModelComparison:
    """Compare models of any depth: distances between their pooled profiles at relative
    depth, and their mean profiles on one relative-depth grid.

    Distances: each model's profiles are pooled into one (every token weighs the same,
    `AggregatedProfile.pooled`) and each pair is compared with
    `distances.profile_distance(a, b, metric, aggregation="mean", bin_width)` at the layers
    `distances.match_layers` pairs by relative depth (ties of equal layer counts: the
    model given first is the short one). metric: any of distances.METRICS: "jsd",
    "wasserstein" (per layer, mean over paired layers), "fisher_rao", "srvf" (between the
    mean profiles at the paired layers). These are the numbers of `entropy-fast compare`
    and of the `model_distances` query (docs/distances.md).

    Curves (for plots): each model's mean profile (mean over prompts of the per-prompt
    mean over tokens) placed at relative depth h / last h, h the hidden-state index of
    each column (either numbering gives the same depths), and linearly interpolated at
    n_points equally spaced depths (default: the largest layer count).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {METRICS}")
    if len(profiles) == 0:
        raise ValueError("no models given: pass {model name: profiles}")
    models = {name: _model_profiles(name, item) for name, item in profiles.items()}
    curves_in = {name: _mean_curve(ps) for name, ps in models.items()}
    if n_points is None:
        n_points = max(len(depth) for depth, _ in curves_in.values())
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    depth = np.linspace(0.0, 1.0, n_points)
    curves = np.stack([np.interp(depth, d, c) for d, c in curves_in.values()])
    pooled = [AggregatedProfile(ps).pooled() for ps in models.values()]
    distances = np.zeros((len(pooled), len(pooled)))
    for i, j in combinations(range(len(pooled)), 2):
        distances[i, j] = distances[j, i] = profile_distance(
            pooled[i], pooled[j], metric, aggregation="mean", bin_width=bin_width).aggregate
    return ModelComparison(list(models), depth, curves, distances, metric)


def __getattr__(name: str):
    # The seed library exported its analysis plots from here; they live in viz.
    if name in _VIZ_NAMES:
        from entropy_fast import viz

        return getattr(viz, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CURVE_METRICS", "MI_METHODS", "LayerAnalyzer", "ModelComparison",
           "compare_models", *_VIZ_NAMES]
