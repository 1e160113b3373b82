"""Distances between entropy profiles; the SQL in queries/ implements the same definitions.

Owns `profile_distance`, `pairwise_distances` and one function per metric:

- layer-wise metrics compare, at each layer, the distribution of the per-token entropies
  of two profiles: `jsd_layer` (histogram Jensen-Shannon divergence on fixed-width bins)
  and `wasserstein_layer` (exact Wasserstein-1, equal to scipy.stats.wasserstein_distance);
  a profile distance aggregates them over layers (mean, max or sum);
- curve metrics compare the two mean profiles as curves over depth: `fisher_rao_distance`
  (the mean profile normalised into a distribution over layers) and `srvf_distance`
  (elastic distance between square-root velocity functions).

Every formula is written in the function's docstring and in docs/distances.md. All
arithmetic is float64. `pairwise_distances` evaluates the same formulas for every pair at
once (histograms, sorted samples and warp matrices are built once per profile), so its
entries equal `profile_distance` on the same pair up to float64 rounding.

Profiles of different depths are compared at relative depth (`match_layers`): each layer
of the profile with fewer layers is paired with the other's layer at the nearest relative
depth h / last h, h the hidden-state index (0 = embeddings), so profiles of either layer
numbering (profile.numbering) and of any two models compare; equal layer lists pair
layer by layer. The SQL `layer_map` and `run_layer_map` views pair layers by the same rule.
These are entropy_fast's definitions; entropy_profiler.distances keeps 0.2.1's (bits,
pair-fitted bins, arccos, unwarped SRVF): docs/migrating-from-0.2.1.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

import numpy as np
import torch
from scipy.spatial.distance import pdist, squareform

from entropy_fast.profile import AggregatedProfile, EntropyProfile

METRICS = ("jsd", "wasserstein", "fisher_rao", "srvf")
LAYERWISE_METRICS = ("jsd", "wasserstein")
AGGREGATIONS = ("mean", "max", "sum")
DEFAULT_BIN_WIDTH = 0.25
SRVF_KNOT_GRID = 8

# Working-set bound (float64 elements) of one block in the pairwise loops.
_BLOCK_ELEMENTS = 1 << 22
# Largest (profiles x bins) count table of the JSD.
_MAX_HISTOGRAM_CELLS = 1 << 28

Profiles = Sequence[EntropyProfile] | AggregatedProfile


@dataclass(frozen=True)
class DistanceResult:
    """Distance between two profiles.

    Attributes:
        metric: one of METRICS.
        aggregate: the distance: the aggregation of `per_layer` for layer-wise metrics,
            the curve distance otherwise.
        per_layer: (n_layers,) float64 per-layer values of a layer-wise metric, else None.
        aggregation: "mean" | "max" | "sum" for layer-wise metrics, else None.
    """

    metric: str
    aggregate: float
    per_layer: np.ndarray | None = None
    aggregation: str | None = None


# -- input checks -----------------------------------------------------------------------


def _check_profiles(profiles: Iterable[EntropyProfile], names: Sequence[str] | None = None,
                    ) -> list[EntropyProfile]:
    """Raise ValueError unless every profile is non-empty, finite and comparable."""
    profiles = list(profiles)
    if not profiles:
        raise ValueError("no profiles given: pass at least one EntropyProfile")
    names = names or [f"profiles[{k}]" for k in range(len(profiles))]
    for name, p in zip(names, profiles, strict=True):
        if not isinstance(p, EntropyProfile):
            raise ValueError(f"{name} is a {type(p).__name__}, not an EntropyProfile")
        if p.n_tokens == 0 or p.n_layers == 0:
            raise ValueError(f"{name} is empty ({p.n_tokens} tokens x {p.n_layers} layers): "
                             "drop it, or profile a prompt that yields at least one token")
        if not bool(torch.isfinite(p.entropy).all()):
            raise ValueError(f"{name} contains NaN or inf entropies: recompute it or drop it")
    alphas = sorted({p.alpha for p in profiles})
    if len(alphas) > 1:
        raise ValueError(f"profiles have different primary Rényi orders {alphas}: call "
                         "p.at_alpha(a) on each so that they share one order")
    return profiles


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}: use one of {AGGREGATIONS}")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {METRICS}")


def _check_bin_width(bin_width: float) -> float:
    if not (isinstance(bin_width, (int, float)) and math.isfinite(bin_width) and bin_width > 0):
        raise ValueError(f"bin_width must be a positive number of nats (entropy units), "
                         f"got {bin_width!r}")
    return float(bin_width)


def _values(p: EntropyProfile) -> torch.Tensor:
    """(n_tokens x n_layers) float64 entropies."""
    return p.entropy.detach().to("cpu", torch.float64)


# -- relative depth ---------------------------------------------------------------------


def match_layers(a: Sequence[int], b: Sequence[int]) -> tuple[list[int], list[int]]:
    """Columns of two layer lists paired at relative depth: (columns of a, columns of b).

    a, b: hidden-state indices (0 = embeddings), ascending. The list with fewer layers is
    the short one (ties: a); each of its layers s is paired with the layer l of the other
    list at the nearest relative depth s / S = l / L (S, L the last index of each list),
    compared exactly in integers as |s L - l S| (ties: the shallower l). Equal lists pair
    layer by layer. The result has one pair per layer of the short list, in its order.
    This is the rule of the SQL views `layer_map` and `run_layer_map`.
    """
    a, b = [int(i) for i in a], [int(i) for i in b]
    swap = len(b) < len(a)
    short, long = (b, a) if swap else (a, b)
    s_max, l_max = short[-1], long[-1]
    paired = [min(range(len(long)), key=lambda k, s=s: (abs(s * l_max - long[k] * s_max),
                                                         long[k]))
              for s in short]
    own = list(range(len(short)))
    return (paired, own) if swap else (own, paired)


def _matched_values(p1: EntropyProfile, p2: EntropyProfile,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 entropies of both profiles at their layers paired by `match_layers`."""
    cols_1, cols_2 = match_layers(p1.hidden_state_indices, p2.hidden_state_indices)
    return _values(p1)[:, cols_1], _values(p2)[:, cols_2]


def _aggregate(per_layer: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Reduce the last dimension (layers) of per-layer values."""
    if aggregation == "mean":
        return per_layer.mean(dim=-1)
    if aggregation == "max":
        return per_layer.amax(dim=-1)
    return per_layer.sum(dim=-1)


# -- grouping by token count ----------------------------------------------------------


def _token_count_order(values: Sequence[torch.Tensor]) -> tuple[np.ndarray, list[slice]]:
    """Permutation that sorts profiles by token count, and the slice of each count."""
    counts = np.array([v.shape[0] for v in values])
    order = np.argsort(counts, kind="stable")
    bounds = np.flatnonzero(np.diff(counts[order])) + 1
    edges = [0, *bounds.tolist(), len(values)]
    return order, [slice(a, b) for a, b in pairwise(edges)]


class _Accumulator:
    """Running mean / max / sum over layers of (N x N) blocks, filled block by block."""

    def __init__(self, n: int, n_layers: int, aggregation: str) -> None:
        self.aggregation, self.n_layers = aggregation, n_layers
        fill = -np.inf if aggregation == "max" else 0.0
        self.out = np.full((n, n), fill)

    def add(self, rows: slice, cols: slice, block: np.ndarray) -> None:
        """Fold in (r x c) values of one layer, or (n_layers x r x c) of all layers."""
        if block.ndim == 3:
            block = block.max(axis=0) if self.aggregation == "max" else block.sum(axis=0)
        target = self.out[rows, cols]
        if self.aggregation == "max":
            np.maximum(target, block, out=target)
        else:
            target += block

    def result(self, order: np.ndarray) -> np.ndarray:
        out = self.out / self.n_layers if self.aggregation == "mean" else self.out
        out = np.triu(out, 1)
        out = out + out.T
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return out[np.ix_(inverse, inverse)]


# -- Jensen-Shannon divergence on fixed-width bins --------------------------------------


def _bin_counts(values: Sequence[torch.Tensor], bin_width: float,
                ) -> tuple[torch.Tensor, list[slice]]:
    """Token counts of every profile in the bins floor(v / bin_width) of every layer.

    values: per profile (n_tokens_i x n_layers) float64. Returns C (n_profiles x F) int64,
    the counts of all layers side by side (layer l owns the columns of the bins from the
    smallest to the largest occupied one in the collection), and each layer's columns.
    """
    stacked = torch.cat(list(values))                                 # (sum n_i x L)
    owner = torch.repeat_interleave(torch.arange(len(values)),
                                    torch.tensor([v.shape[0] for v in values]))
    bins = torch.floor(stacked / bin_width).to(torch.int64)
    lowest, highest = bins.amin(dim=0), bins.amax(dim=0)
    widths = highest - lowest + 1
    n_columns = int(widths.sum())
    if len(values) * n_columns > _MAX_HISTOGRAM_CELLS:
        raise ValueError(f"bin_width={bin_width} gives {n_columns} bins over all layers, too "
                         f"many for {len(values)} profiles: use a larger bin_width")
    offsets = torch.cumsum(widths, 0) - widths
    flat = owner[:, None] * n_columns + offsets + (bins - lowest)
    counts = torch.bincount(flat.reshape(-1), minlength=len(values) * n_columns)
    ends = torch.cumsum(widths, 0).tolist()
    layers = [slice(e - w, e) for e, w in zip(ends, widths.tolist(), strict=True)]
    return counts.view(len(values), n_columns), layers


def _jsd_gain(u: torch.Tensor, n_u: int, v: torch.Tensor, n_v: int) -> torch.Tensor:
    """f(p, q) = (p + q) ln(p + q) - p ln p - q ln q at p = u / n_u, q = v / n_v."""
    p, q = u / n_u, v / n_v
    return torch.special.xlogy(p + q, p + q) - torch.special.xlogy(p, p) - torch.special.xlogy(q, q)


def _jsd_blocks(values: Sequence[torch.Tensor], bin_width: float):
    """Yield (layer, rows, cols, JSD block) over the profiles sorted by token count.

    Uses JSD = ln 2 - 1/2 sum_k f(P_k, Q_k) with f as in _jsd_gain, which follows from
    M = (P + Q) / 2 and sum P = sum Q = 1; f vanishes unless both bins are occupied. P_k is
    a count u over n tokens, so sum_k f(P_k, Q_k) = E_a @ B_b^T with E_a the one-hot
    encoding of the counts u = 1..U of group a and B_b[j, (k, u)] = f(u / n_a, c_jk / n_b):
    one GEMM per layer and pair of token-count groups.
    """
    order, groups = _token_count_order(values)
    counts, layers = _bin_counts([values[k] for k in order], bin_width)
    sizes = [values[order[g.start]].shape[0] for g in groups]
    for layer, columns in enumerate(layers):
        c = counts[:, columns]
        for ga, rows in enumerate(groups):
            c_rows = c[rows]
            u_max = int(c_rows.max())
            onehot = torch.nn.functional.one_hot(c_rows, u_max + 1)[..., 1:]
            onehot = onehot.reshape(c_rows.shape[0], -1).to(torch.float64)
            u = torch.arange(1, u_max + 1, dtype=torch.float64)[:, None]
            for gb in range(ga, len(groups)):
                cols = groups[gb]
                c_cols = c[cols]
                v = torch.arange(int(c_cols.max()) + 1, dtype=torch.float64)[None, :]
                table = _jsd_gain(u, sizes[ga], v, sizes[gb])             # (U_a x U_b + 1)
                gains = table[:, c_cols].permute(1, 2, 0).reshape(c_cols.shape[0], -1)
                jsd = (math.log(2.0) - 0.5 * (onehot @ gains.T)).clamp_(0.0, math.log(2.0))
                yield layer, rows, cols, jsd


def jsd_layer(p1: EntropyProfile, p2: EntropyProfile, n_bins: int | None = None,
              bin_width: float = DEFAULT_BIN_WIDTH) -> np.ndarray:
    """(n_layers,) histogram Jensen-Shannon divergence of the per-token entropies, in nats.

    One value per pair of layers `match_layers` pairs (every layer when both profiles hold
    the same layers; the shorter profile's layers otherwise), as every function here.

    `n_bins` (the seed library's signature) instead fits n_bins equal-width bins to the
    pair's joint range [min(x, y), max(x, y)] at each layer; those histograms depend on
    the partner, so pairwise_distances and the SQL queries use the fixed bins below.

    At layer l, with x = p1.entropy[:, l] (n1 values) and y = p2.entropy[:, l] (n2 values),
    both in float64: every value v falls in bin k(v) = floor(v / w), w = bin_width (bins
    [k w, (k + 1) w), anchored at 0, the same for every profile and every pair);
    P_k = #{x in bin k} / n1, Q_k = #{y in bin k} / n2, M = (P + Q) / 2 and

        JSD_l = 1/2 sum_k P_k ln(P_k / M_k) + 1/2 sum_k Q_k ln(Q_k / M_k),  0 ln 0 = 0,

    which lies in [0, ln 2] (= scipy.spatial.distance.jensenshannon(P, Q) ** 2).
    sqrt(JSD_l) is a metric on histograms; JSD_l itself breaks the triangle inequality.
    Bins are fixed rather than fitted to each pair's range so that a profile's histogram
    does not depend on what it is compared with.
    """
    p1, p2 = _check_profiles([p1, p2], ["p1", "p2"])
    x, y = _matched_values(p1, p2)
    if n_bins is not None:
        return _jsd_fitted_bins(x, y, n_bins)
    return _jsd_columns(x, y, _check_bin_width(bin_width)).numpy()


def _jsd_fitted_bins(x: torch.Tensor, y: torch.Tensor, n_bins: int) -> np.ndarray:
    """JSD per layer with n_bins equal-width bins over each layer's joint range."""
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    x, y = x.double().numpy(), y.double().numpy()
    result = np.empty(x.shape[1])
    for layer in range(x.shape[1]):
        both = np.concatenate([x[:, layer], y[:, layer]])
        edges = np.linspace(both.min(), both.max() + 1e-12, n_bins + 1)
        p = np.histogram(x[:, layer], edges)[0] / x.shape[0]
        q = np.histogram(y[:, layer], edges)[0] / y.shape[0]
        m = (p + q) / 2
        result[layer] = 0.5 * (_kl_terms(p, m) + _kl_terms(q, m))
    return result


def _kl_terms(p: np.ndarray, m: np.ndarray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / m[mask])))


def _jsd_columns(x: torch.Tensor, y: torch.Tensor, bin_width: float) -> torch.Tensor:
    """(n_layers,) JSD between the columns of x (n1 x L) and y (n2 x L), as in jsd_layer.

    The one-pair form of _jsd_blocks: both histograms of every layer side by side,
    JSD_l = ln 2 - 1/2 sum_k f(P_lk, Q_lk).
    """
    n_layers = x.shape[1]
    bins_x = torch.floor(x / bin_width).to(torch.int64)
    bins_y = torch.floor(y / bin_width).to(torch.int64)
    lowest = torch.minimum(bins_x.amin(dim=0), bins_y.amin(dim=0))
    n_bins = int(torch.maximum(bins_x.amax(dim=0), bins_y.amax(dim=0)).sub(lowest).max()) + 1
    if n_layers * n_bins > _MAX_HISTOGRAM_CELLS:
        raise ValueError(f"bin_width={bin_width} gives {n_bins} bins per layer: use a larger "
                         "bin_width")
    base = torch.arange(n_layers) * n_bins - lowest

    def counts(bins: torch.Tensor) -> torch.Tensor:
        flat = (bins + base).reshape(-1)
        return torch.bincount(flat, minlength=n_layers * n_bins).view(n_layers, n_bins)

    gains = _jsd_gain(counts(bins_x).double(), x.shape[0], counts(bins_y).double(), y.shape[0])
    return (math.log(2.0) - 0.5 * gains.sum(dim=1)).clamp_(0.0, math.log(2.0))


def _pairwise_jsd(values: list[torch.Tensor], bin_width: float, aggregation: str,
                  ) -> np.ndarray:
    order, _ = _token_count_order(values)
    acc = _Accumulator(len(values), values[0].shape[1], aggregation)
    for _, rows, cols, block in _jsd_blocks(values, bin_width):
        acc.add(rows, cols, block.numpy())
    return acc.result(order)


# -- Wasserstein-1 ----------------------------------------------------------------------


def _w1_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact W1 (n_layers x n_a x n_b) between the columns of two groups of profiles.

    a: (n_a x n_layers x t_a) and b: (n_b x n_layers x t_b) per-layer sorted values; every
    profile of a group has the same token count. With quantile functions F^-1, W1 =
    integral_0^1 |F_a^-1(u) - F_b^-1(u)| du; both are constant between consecutive points
    of {i / t_a} U {j / t_b}, so W1 is a weighted L1 distance on that merged grid.
    """
    t_a, t_b = a.shape[-1], b.shape[-1]
    if t_a == t_b:
        return torch.cdist(a.transpose(0, 1), b.transpose(0, 1), p=1) / t_a
    # Merged grid in integer units of 1 / (t_a t_b): points i t_b and j t_a.
    points = np.union1d(np.arange(t_a) * t_b, np.arange(t_b) * t_a)
    widths = np.diff(np.append(points, t_a * t_b)) / (t_a * t_b)
    w = torch.from_numpy(widths)
    a_grid = a[..., torch.from_numpy(points // t_b)] * w
    b_grid = b[..., torch.from_numpy(points // t_a)] * w
    return torch.cdist(a_grid.transpose(0, 1), b_grid.transpose(0, 1), p=1)


def _sorted_layers(x: torch.Tensor) -> torch.Tensor:
    """(n_layers x n_tokens) per-layer sorted values of one (n_tokens x n_layers) matrix."""
    return torch.sort(x.T, dim=-1).values


def _w1_columns(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n_layers,) W1 between the columns of x (n1 x L) and y (n2 x L)."""
    return _w1_block(_sorted_layers(x)[None], _sorted_layers(y)[None])[:, 0, 0]


def wasserstein_layer(p1: EntropyProfile, p2: EntropyProfile) -> np.ndarray:
    """(n_layers,) Wasserstein-1 distance between the per-token entropies at each layer.

    With x = p1.entropy[:, l] (n1 values), y = p2.entropy[:, l] (n2 values) as empirical
    distributions with equal weights and F their CDFs:

        W1_l = integral |F_x(t) - F_y(t)| dt = integral_0^1 |F_x^-1(u) - F_y^-1(u)| du,

    exactly scipy.stats.wasserstein_distance(x, y), in entropy units (nats). For n1 = n2
    it is mean_i |sort(x)_i - sort(y)_i|. A metric (triangle inequality holds).
    """
    p1, p2 = _check_profiles([p1, p2], ["p1", "p2"])
    return _w1_columns(*_matched_values(p1, p2)).numpy()


def _pairwise_wasserstein(values: list[torch.Tensor], aggregation: str) -> np.ndarray:
    order, groups = _token_count_order(values)
    n_layers = values[0].shape[1]
    acc = _Accumulator(len(values), n_layers, aggregation)
    stacks = [torch.stack([_sorted_layers(values[k]) for k in order[g]]) for g in groups]
    for ga, rows in enumerate(groups):
        for gb in range(ga, len(groups)):
            cols = groups[gb]
            step = max(1, _BLOCK_ELEMENTS // (n_layers * (cols.stop - cols.start)))
            for r0 in range(rows.start, rows.stop, step):
                r1 = min(r0 + step, rows.stop)
                block = _w1_block(stacks[ga][r0 - rows.start:r1 - rows.start], stacks[gb])
                acc.add(slice(r0, r1), cols, block.numpy())
    return acc.result(order)


# -- Fisher-Rao between mean profiles ---------------------------------------------------


def _mean_profiles(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n_profiles x n_layers) float64 mean over tokens."""
    return torch.stack([v.mean(dim=0) for v in values])


def _sqrt_simplex(curves: torch.Tensor) -> torch.Tensor:
    """Square roots of the curves (n x L) normalised to sum 1; negatives count as 0."""
    curves = curves.clamp_min(0.0)
    totals = curves.sum(dim=1, keepdim=True)
    if bool((totals <= 0).any()):
        raise ValueError("a mean profile is zero at every layer, so it cannot be normalised "
                         "into a distribution over layers: fisher_rao needs some entropy > 0")
    return torch.sqrt(curves / totals)


def _fisher_rao_from_chord(chord: np.ndarray | torch.Tensor):
    """Geodesic 4 arcsin(c / 2) from the chord c = ||sqrt(p) - sqrt(q)||_2."""
    return 4.0 * np.arcsin(np.minimum(np.asarray(chord) / 2.0, 1.0))


def fisher_rao_distance(p1: EntropyProfile, p2: EntropyProfile) -> float:
    """Fisher-Rao geodesic distance between the two mean profiles as distributions over layers.

    With m1, m2 the (n_layers,) mean profiles, p = m1 / sum(m1), q = m2 / sum(m2):

        d_FR = 2 arccos( sum_l sqrt(p_l q_l) ) = 4 arcsin( ||sqrt(p) - sqrt(q)||_2 / 2 ),

    in [0, pi], computed with the arcsin form, which stays accurate for close profiles. It
    compares the shape of the curves (where along depth the entropy sits), not their level:
    scaling a profile does not change it. A metric. Negative means, which only rounding can
    produce, count as 0.
    """
    p1, p2 = _check_profiles([p1, p2], ["p1", "p2"])
    roots = _sqrt_simplex(_mean_profiles(_matched_values(p1, p2)))
    return float(_fisher_rao_from_chord(torch.linalg.vector_norm(roots[0] - roots[1])))


def _pairwise_fisher_rao(curves: torch.Tensor) -> np.ndarray:
    roots = _sqrt_simplex(curves).numpy()
    return squareform(_fisher_rao_from_chord(pdist(roots, "euclidean")))


# -- elastic SRVF distance between mean profiles -----------------------------------------


def _warp_matrix(knots_t: Sequence[float], knots_u: Sequence[float], n_cells: int,
                 ) -> np.ndarray:
    """(n_cells x n_cells) matrix W of one piecewise-linear warp gamma.

    W[a, b] = sqrt(gamma') * |{t in cell a : gamma(t) in cell b}| * n_cells, summed over
    the warp's linear pieces, so that <q1, (q2 o gamma) sqrt(gamma')> = r1 @ W @ r2 for
    SRVFs that are constant on the n_cells equal cells of [0, 1] (see srvf_distance).
    """
    edges = np.arange(n_cells + 1) / n_cells
    w = np.zeros((n_cells, n_cells))
    for t0, t1, u0, u1 in zip(knots_t[:-1], knots_t[1:], knots_u[:-1], knots_u[1:],
                              strict=True):
        slope = (u1 - u0) / (t1 - t0)
        pre_lo = np.clip(t0 + (edges[:-1] - u0) / slope, t0, t1)    # gamma^-1(cell b) ...
        pre_hi = np.clip(t0 + (edges[1:] - u0) / slope, t0, t1)     # ... within this piece
        lo = np.maximum(edges[:-1, None], pre_lo[None, :])
        hi = np.minimum(edges[1:, None], pre_hi[None, :])
        w += math.sqrt(slope) * np.clip(hi - lo, 0.0, None) * n_cells
    return w


@lru_cache(maxsize=16)
def _srvf_warps(n_cells: int) -> torch.Tensor:
    grid = [k / SRVF_KNOT_GRID for k in range(1, SRVF_KNOT_GRID)]
    knot_sets: list[tuple[tuple[float, ...], tuple[float, ...]]] = [((), ())]
    knot_sets += [((s,), (u,)) for s in grid for u in grid if s != u]
    pairs = [(a, b) for a in grid for b in grid if a < b]
    knot_sets += [(s, u) for s in pairs for u in pairs if (s[0] - u[0], s[1] - u[1]) != (0, 0)]
    warps = [_warp_matrix((0.0, *s, 1.0), (0.0, *u, 1.0), n_cells) for s, u in knot_sets]
    return torch.from_numpy(np.stack(warps))


def srvf_warps(n_layers: int) -> np.ndarray:
    """(n_warps x (n_layers - 1) x (n_layers - 1)) matrices of the warping family of srvf_distance.

    Warp 0 is the identity. Exposed so that other implementations (SQL) can use the very
    same family.
    """
    if n_layers < 2:
        raise ValueError(f"srvf needs at least 2 layers, got {n_layers}")
    return _srvf_warps(n_layers - 1).numpy().copy()


def _srvf_roots(curves: torch.Tensor) -> torch.Tensor:
    """(n x L-1) r = sign(diff) sqrt(|diff|) of curves (n x L)."""
    if curves.shape[1] < 2:
        raise ValueError(f"srvf needs at least 2 layers to form a curve, got {curves.shape[1]}")
    diff = torch.diff(curves, dim=1)
    return torch.sign(diff) * torch.sqrt(diff.abs())


def _srvf_block(r_rows: torch.Tensor, r_cols: torch.Tensor) -> torch.Tensor:
    """Elastic SRVF distances (n_rows x n_cols) between two sets of curves' roots."""
    warps = _srvf_warps(r_rows.shape[1])
    best = torch.full((r_rows.shape[0], r_cols.shape[0]), -math.inf, dtype=torch.float64)
    chunk = max(1, _BLOCK_ELEMENTS // max(1, best.numel()))
    for w0 in range(0, warps.shape[0], chunk):
        inner = torch.matmul(r_rows @ warps[w0:w0 + chunk], r_cols.T)   # (w x rows x cols)
        torch.maximum(best, inner.amax(dim=0), out=best)
    tv_rows = (r_rows * r_rows).sum(dim=1)
    tv_cols = (r_cols * r_cols).sum(dim=1)
    return torch.sqrt((tv_rows[:, None] + tv_cols[None, :] - 2.0 * best).clamp_min_(0.0))


def srvf_distance(p1: EntropyProfile, p2: EntropyProfile) -> float:
    """Elastic distance between the square-root velocity functions of the two mean profiles.

    Each mean profile m (n_layers = L values) is the piecewise-linear curve f through
    (t_l, m_l), t_l = l / (L - 1). Its SRVF q = sign(f') sqrt(|f'|) is constant on the
    K = L - 1 cells, and q_k^2 / K = |m_{k+1} - m_k|; with r_k = sign(d_k) sqrt(|d_k|),
    d_k = m_{k+1} - m_k, ||q||^2 = sum_k r_k^2 = the total variation TV of m. Then

        d_SRVF = min_{gamma in G} || q1 - (q2 o gamma) sqrt(gamma') ||_2
               = sqrt( TV1 + TV2 - 2 max_{gamma in G} r1 @ W_gamma @ r2 ),

    since warping keeps ||q2||. G is a fixed family, closed under inversion: every
    piecewise-linear homeomorphism of [0, 1] with at most two interior knots whose
    coordinates lie on {1/8, ..., 7/8} (identity, one-knot and two-knot warps; see
    `srvf_warps`). Units: sqrt(nats). Symmetric, zero on identical curves, never below
    the exact elastic distance (the infimum over all warps), whose usual approximation
    (a dynamic program per pair) costs minutes for thousands of profiles where this
    family costs seconds; the triangle inequality is not guaranteed.
    """
    p1, p2 = _check_profiles([p1, p2], ["p1", "p2"])
    roots = _srvf_roots(_mean_profiles(_matched_values(p1, p2)))
    return float(_srvf_block(roots[:1], roots[1:])[0, 0])


def _pairwise_srvf(curves: torch.Tensor) -> np.ndarray:
    roots = _srvf_roots(curves)
    n = roots.shape[0]
    out = np.zeros((n, n))
    n_warps = _srvf_warps(roots.shape[1]).shape[0]
    rows = max(1, min(n, 64 * _BLOCK_ELEMENTS // (n * n_warps)))
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        out[i0:i1, i0:] = _srvf_block(roots[i0:i1], roots[i0:]).numpy()
    out = np.triu(out, 1)
    return out + out.T


# -- entry points -----------------------------------------------------------------------


def profile_distance(p1: EntropyProfile, p2: EntropyProfile, metric: str = "jsd",
                     aggregation: str = "mean", bin_width: float = DEFAULT_BIN_WIDTH,
                     ) -> DistanceResult:
    """Distance between two profiles with one of METRICS.

    Layer-wise metrics ("jsd", "wasserstein") give per-layer values (see jsd_layer,
    wasserstein_layer) reduced by `aggregation`: "mean" (1/L sum_l), "max" or "sum".
    Curve metrics ("fisher_rao", "srvf") give one number; `aggregation` is not used.
    `bin_width` (nats) applies to "jsd" only. Profiles of different layers are compared at
    the layers `match_layers` pairs (relative depth; ties of equal counts: p1 is short).
    """
    _check_metric(metric)
    _check_aggregation(aggregation)
    if metric == "fisher_rao":
        return DistanceResult(metric, fisher_rao_distance(p1, p2))
    if metric == "srvf":
        return DistanceResult(metric, srvf_distance(p1, p2))
    per_layer = (jsd_layer(p1, p2, bin_width=bin_width) if metric == "jsd"
                 else wasserstein_layer(p1, p2))
    value = float(_aggregate(torch.from_numpy(per_layer), aggregation))
    return DistanceResult(metric, value, per_layer, aggregation)


def pairwise_distances(profiles: Profiles, metric: str = "jsd", aggregation: str = "mean",
                       bin_width: float = DEFAULT_BIN_WIDTH) -> np.ndarray:
    """(N x N) float64 symmetric matrix, entry (i, j) = profile_distance(p_i, p_j).aggregate.

    profiles: a sequence of N EntropyProfile or an AggregatedProfile. Vectorized: each
    profile's histograms / sorted samples / SRVF are built once and all pairs are computed
    in blocks (GEMM for the SRVF warps, cdist for W1); the diagonal is 0. Profiles of
    different layers (models of different depths) are compared at relative depth, as
    profile_distance: the profiles are grouped by layer list and each pair of groups is
    computed on its columns paired by `match_layers` (ties of equal layer counts: the
    list met first in `profiles` is the short one).
    """
    _check_metric(metric)
    _check_aggregation(aggregation)
    if isinstance(profiles, EntropyProfile):
        raise ValueError("pairwise_distances needs a collection of profiles; for two "
                         "profiles use profile_distance(p1, p2)")
    if isinstance(profiles, AggregatedProfile):
        profiles = profiles.profiles
    profiles = _check_profiles(profiles)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, p in enumerate(profiles):
        groups.setdefault(tuple(p.hidden_state_indices), []).append(k)
    values = [_values(p) for p in profiles]
    if len(groups) == 1:
        return _pairwise(values, metric, aggregation, bin_width)
    out = np.zeros((len(values), len(values)))
    layer_sets = list(groups)
    for i, layers_i in enumerate(layer_sets):
        for layers_j in layer_sets[i:]:
            rows, cols = groups[layers_i], groups[layers_j]
            cols_i, cols_j = match_layers(layers_i, layers_j)
            both = [values[k][:, cols_i] for k in rows] + [values[k][:, cols_j] for k in cols]
            block = _pairwise(both, metric, aggregation, bin_width)[:len(rows), len(rows):]
            out[np.ix_(rows, cols)] = block
            out[np.ix_(cols, rows)] = block.T
    return out


def _pairwise(values: list[torch.Tensor], metric: str, aggregation: str,
              bin_width: float) -> np.ndarray:
    """The pairwise matrix of value matrices (n_tokens_i x L) that share their L columns."""
    if metric == "jsd":
        return _pairwise_jsd(values, _check_bin_width(bin_width), aggregation)
    if metric == "wasserstein":
        return _pairwise_wasserstein(values, aggregation)
    if metric == "fisher_rao":
        return _pairwise_fisher_rao(_mean_profiles(values))
    return _pairwise_srvf(_mean_profiles(values))
