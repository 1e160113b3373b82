"""Distances against independent references (scipy, textbook float64 formulas, quadrature),
their metric properties, pairwise = profile_distance, and bad input."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations, pairwise

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from entropy_fast import distances as D
from entropy_fast.profile import AggregatedProfile, EntropyProfile
from tests._analysis_fixtures import make_profile


def column(p: EntropyProfile, layer: int) -> np.ndarray:
    return p.to_numpy()[:, layer].astype(np.float64)


def reference_jsd(x: np.ndarray, y: np.ndarray, width: float) -> float:
    """scipy's JS distance squared on numpy histograms over the bins [k w, (k + 1) w)."""
    lo = math.floor(min(x.min(), y.min()) / width)
    hi = math.floor(max(x.max(), y.max()) / width)
    edges = np.arange(lo, hi + 2) * width
    p, q = np.histogram(x, edges)[0], np.histogram(y, edges)[0]
    return float(jensenshannon(p, q) ** 2)


def reference_fisher_rao(p1: EntropyProfile, p2: EntropyProfile) -> float:
    m1 = p1.to_numpy().astype(np.float64).mean(axis=0)
    m2 = p2.to_numpy().astype(np.float64).mean(axis=0)
    bc = np.sum(np.sqrt(m1 / m1.sum() * m2 / m2.sum()))
    return float(2.0 * np.arccos(min(bc, 1.0)))


def family_knots(grid: int = D.SRVF_KNOT_GRID):
    """The documented warp family, enumerated again: identity, 1-knot, 2-knot warps."""
    g = [k / grid for k in range(1, grid)]
    yield (), ()
    for s in g:
        for u in g:
            if s != u:
                yield (s,), (u,)
    for s in combinations(g, 2):
        for u in combinations(g, 2):
            if s != u:
                yield s, u


def reference_srvf(m1: np.ndarray, m2: np.ndarray, n_quad: int = 6000) -> float:
    """min over the family of ||q1 - (q2 o gamma) sqrt(gamma')||, by midpoint quadrature."""
    t = (np.arange(n_quad) + 0.5) / n_quad
    cells = np.minimum((t * (len(m1) - 1)).astype(int), len(m1) - 2)
    slope1 = np.diff(m1) * (len(m1) - 1)
    slope2 = np.diff(m2) * (len(m2) - 1)
    q1 = np.sign(slope1[cells]) * np.sqrt(np.abs(slope1[cells]))
    best = math.inf
    for ks, ku in family_knots():
        ts, us = np.array([0.0, *ks, 1.0]), np.array([0.0, *ku, 1.0])
        gamma = np.interp(t, ts, us)
        piece = np.minimum(np.searchsorted(ts, t, side="right") - 1, len(ts) - 2)
        dgamma = (np.diff(us) / np.diff(ts))[piece]
        cells2 = np.minimum((gamma * (len(m2) - 1)).astype(int), len(m2) - 2)
        q2 = np.sign(slope2[cells2]) * np.sqrt(np.abs(slope2[cells2])) * np.sqrt(dgamma)
        best = min(best, math.sqrt(np.mean((q1 - q2) ** 2)))
    return best


@pytest.fixture(scope="module")
def mixed():
    """Profiles with different token counts (as text mode gives them)."""
    counts = [5, 9, 9, 12, 5, 17, 9, 3]
    return [make_profile(n, seed=k, shift=0.3 * k) for k, n in enumerate(counts)]


# -- independent references --------------------------------------------------------------


@pytest.mark.parametrize(("n1", "n2"), [(17, 17), (17, 23), (1, 6), (40, 7)])
def test_wasserstein_layer_equals_scipy(n1, n2):
    p1, p2 = make_profile(n1, seed=1), make_profile(n2, seed=2, shift=0.4)
    expected = [wasserstein_distance(column(p1, k), column(p2, k)) for k in range(p1.n_layers)]
    np.testing.assert_allclose(D.wasserstein_layer(p1, p2), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("n1", "n2", "width"), [(17, 17, 0.25), (17, 30, 0.25), (8, 3, 1.0),
                                                 (25, 25, 0.05)])
def test_jsd_layer_equals_scipy_jensenshannon(n1, n2, width):
    p1, p2 = make_profile(n1, seed=3), make_profile(n2, seed=4, shift=0.5)
    expected = [reference_jsd(column(p1, k), column(p2, k), width) for k in range(p1.n_layers)]
    np.testing.assert_allclose(D.jsd_layer(p1, p2, bin_width=width), expected, rtol=1e-12,
                               atol=1e-14)


def test_jsd_bounds_and_disjoint_supports():
    low = make_profile(10, seed=5)
    high = EntropyProfile(low.entropy + 100.0, low.token_ids, low.layer_indices)
    np.testing.assert_allclose(D.jsd_layer(low, high), math.log(2.0), rtol=1e-14)
    values = D.jsd_layer(low, make_profile(10, seed=6))
    assert np.all((values >= 0) & (values <= math.log(2.0)))


def test_fisher_rao_equals_textbook_formula_and_ignores_scale():
    p1, p2 = make_profile(11, seed=7), make_profile(4, seed=8, shift=2.0)
    assert D.fisher_rao_distance(p1, p2) == pytest.approx(reference_fisher_rao(p1, p2),
                                                          rel=1e-9)
    doubled = EntropyProfile(p1.entropy * 2.0, p1.token_ids, p1.layer_indices)
    assert D.fisher_rao_distance(p1, doubled) == pytest.approx(0.0, abs=1e-7)
    assert 0.0 <= D.fisher_rao_distance(p1, p2) <= math.pi


def test_srvf_equals_quadrature_over_the_warp_family():
    p1, p2 = make_profile(6, n_layers=7, seed=9), make_profile(9, n_layers=7, seed=10)
    m1 = p1.to_numpy().astype(np.float64).mean(axis=0)
    m2 = p2.to_numpy().astype(np.float64).mean(axis=0)
    assert D.srvf_distance(p1, p2) == pytest.approx(reference_srvf(m1, m2), rel=2e-3)


def test_srvf_family_is_what_the_docs_say():
    warps = D.srvf_warps(9)
    assert warps.shape == (len(list(family_knots())), 8, 8)
    np.testing.assert_allclose(warps[0], np.eye(8), atol=1e-15)
    # Warping preserves the SRVF norm, so r @ W @ r <= ||r||^2 (Cauchy-Schwarz).
    r = np.random.default_rng(0).normal(size=8)
    assert np.all(r @ warps @ r <= r @ r + 1e-12)


def test_srvf_is_elastic():
    depth = np.linspace(0.0, 1.0, 17)

    def curve(t):
        return 6.0 - 4.0 / (1.0 + np.exp(-(t - 0.5) * 20.0))

    shifted = np.interp(depth, [0.0, 0.375, 1.0], [0.0, 0.5, 1.0])  # a one-knot warp
    p1, p2 = (EntropyProfile(torch.tensor(c[None], dtype=torch.float32), torch.zeros(1),
                             list(range(17))) for c in (curve(depth), curve(shifted)))
    roots = D._srvf_roots(D._mean_profiles([D._values(p1), D._values(p2)]))
    rigid = float(torch.linalg.vector_norm(roots[0] - roots[1]))
    assert D.srvf_distance(p1, p2) < 0.35 * rigid


# -- properties --------------------------------------------------------------------------


@pytest.mark.parametrize("metric", D.METRICS)
def test_identity_symmetry_nonnegativity(metric, mixed):
    for p in mixed[:3]:
        assert D.profile_distance(p, p, metric).aggregate == pytest.approx(0.0, abs=1e-7)
    for a, b in combinations(mixed[:5], 2):
        ab = D.profile_distance(a, b, metric).aggregate
        assert ab >= 0
        assert ab == pytest.approx(D.profile_distance(b, a, metric).aggregate, rel=1e-12,
                                   abs=1e-14)


@pytest.mark.parametrize("metric", ["wasserstein", "fisher_rao", "jsd_sqrt"])
def test_triangle_inequality(metric, mixed):
    def dist(a, b):
        if metric == "jsd_sqrt":   # sqrt(JSD) is the metric, layer by layer
            return np.sqrt(D.jsd_layer(mixed[a], mixed[b]))
        return D.profile_distance(mixed[a], mixed[b], metric, "mean").aggregate

    d = {(a, b): dist(a, b) for a, b in combinations(range(len(mixed)), 2)}
    for a, b, c in combinations(range(len(mixed)), 3):
        assert np.all(d[a, c] <= d[a, b] + d[b, c] + 1e-12)


@pytest.mark.parametrize("metric", D.METRICS)
@pytest.mark.parametrize("aggregation", D.AGGREGATIONS)
def test_pairwise_equals_profile_distance(metric, aggregation, mixed):
    matrix = D.pairwise_distances(mixed, metric, aggregation)
    expected = np.zeros_like(matrix)
    for i, j in combinations(range(len(mixed)), 2):
        expected[i, j] = D.profile_distance(mixed[i], mixed[j], metric, aggregation).aggregate
    expected += expected.T
    np.testing.assert_allclose(matrix, expected, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(matrix, matrix.T)
    assert np.all(np.diag(matrix) == 0)


def test_aggregations_and_result_fields():
    p1, p2 = make_profile(8, seed=11), make_profile(8, seed=12, shift=1.0)
    per_layer = D.wasserstein_layer(p1, p2)
    for aggregation, reduce in (("mean", np.mean), ("max", np.max), ("sum", np.sum)):
        result = D.profile_distance(p1, p2, "wasserstein", aggregation)
        assert result.aggregate == pytest.approx(reduce(per_layer), rel=1e-12)
        assert (result.metric, result.aggregation) == ("wasserstein", aggregation)
        np.testing.assert_array_equal(result.per_layer, per_layer)
    curve = D.profile_distance(p1, p2, "srvf")
    assert curve.per_layer is None and curve.aggregation is None


def test_pairwise_accepts_aggregated_profile_and_large_counts():
    profiles = [make_profile(64, seed=k, shift=0.1 * k) for k in range(12)]
    matrix = D.pairwise_distances(AggregatedProfile(profiles), "jsd", bin_width=0.05)
    assert matrix.shape == (12, 12)
    assert matrix[0, 5] == pytest.approx(
        float(np.mean(D.jsd_layer(profiles[0], profiles[5], bin_width=0.05))), rel=1e-12)


# -- bad input ---------------------------------------------------------------------------


def nearest_depth(short: list[int], long: list[int]) -> dict[int, int]:
    """Each layer of `short` -> the layer of `long` at the nearest relative depth (exact
    fractions; ties: the shallower)."""
    return {s: min(long, key=lambda x: (abs(Fraction(s, short[-1]) - Fraction(x, long[-1])), x))
            for s in short}


@pytest.mark.parametrize(("a", "b"), [([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4]),
                                      ([0, 2, 4, 6], list(range(9))),
                                      ([0, 3, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
                                      ([1, 2, 3], [1, 2, 3])])
def test_match_layers_pairs_the_nearest_relative_depth(a, b):
    cols_a, cols_b = D.match_layers(a, b)
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    expected = nearest_depth(short, long)
    pairs = dict(zip([a[k] for k in cols_a], [b[k] for k in cols_b], strict=True))
    if short is b:
        pairs = {v: k for k, v in pairs.items()}
    assert pairs == expected and len(cols_a) == len(short)


def test_profiles_of_different_depths_compare_at_relative_depth():
    deep, shallow = make_profile(7, n_layers=9, seed=1), make_profile(5, n_layers=4, seed=2)
    shallow.layer_indices = [0, 3, 6, 8]  # hidden states 0..8 profiled with a stride
    paired = nearest_depth(shallow.layer_indices, deep.layer_indices)
    expected = [wasserstein_distance(column(shallow, k), column(deep, paired[layer]))
                for k, layer in enumerate(shallow.layer_indices)]
    np.testing.assert_allclose(D.wasserstein_layer(deep, shallow), expected, rtol=1e-12)
    m_deep = deep.to_numpy().astype(np.float64).mean(axis=0)[list(paired.values())]
    m_shallow = shallow.to_numpy().astype(np.float64).mean(axis=0)
    bc = np.sum(np.sqrt(m_deep / m_deep.sum() * m_shallow / m_shallow.sum()))
    assert D.fisher_rao_distance(deep, shallow) == pytest.approx(2 * np.arccos(min(bc, 1.0)),
                                                                 rel=1e-9)
    mixed = [deep, shallow, make_profile(6, n_layers=9, seed=3), make_profile(3, n_layers=5)]
    for metric in D.METRICS:
        matrix = D.pairwise_distances(mixed, metric)
        np.testing.assert_array_equal(matrix, matrix.T)
        for i, j in combinations(range(len(mixed)), 2):
            single = D.profile_distance(mixed[i], mixed[j], metric).aggregate
            assert matrix[i, j] == pytest.approx(single, rel=1e-9, abs=1e-12), (metric, i, j)


def test_empty_profiles_raise():
    empty = EntropyProfile(torch.zeros(0, 6), torch.zeros(0), list(range(6)))
    with pytest.raises(ValueError, match=r"p2 is empty \(0 tokens x 6 layers\)"):
        D.wasserstein_layer(make_profile(3), empty)
    with pytest.raises(ValueError, match=r"profiles\[1\] is empty"):
        D.pairwise_distances([make_profile(3), empty], "fisher_rao")
    with pytest.raises(ValueError, match="no profiles given"):
        D.pairwise_distances([])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(metric="cosine"), "unknown metric 'cosine'"),
    (dict(aggregation="median"), "unknown aggregation 'median'"),
    (dict(bin_width=0.0), "bin_width must be a positive"),
    (dict(bin_width=1e-9), "too many for 2 profiles: use a larger bin_width"),
])
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        D.pairwise_distances([make_profile(3, seed=1), make_profile(3, seed=2)], **kwargs)


def test_other_bad_inputs_raise():
    p = make_profile(5)
    with pytest.raises(ValueError, match="use profile_distance"):
        D.pairwise_distances(p)
    with pytest.raises(ValueError, match=r"Rényi orders \[1.0, 2.0\].*at_alpha"):
        D.profile_distance(p, make_profile(5, alpha=2.0))
    bad = EntropyProfile(torch.full((3, 6), float("nan")), torch.zeros(3), list(range(6)))
    with pytest.raises(ValueError, match="NaN or inf"):
        D.profile_distance(p, bad)
    zero = EntropyProfile(torch.zeros(3, 6), torch.zeros(3), list(range(6)))
    with pytest.raises(ValueError, match="zero at every layer"):
        D.fisher_rao_distance(p, zero)
    single = make_profile(3, n_layers=1)
    with pytest.raises(ValueError, match="at least 2 layers"):
        D.srvf_distance(single, single)
    with pytest.raises(ValueError, match="not an EntropyProfile"):
        D.profile_distance(p, p.to_numpy())


def test_consecutive_layers_helpers_agree_with_public_functions():
    p = make_profile(9, seed=13)
    e = D._values(p)
    velocity = D._w1_columns(e[:, :-1], e[:, 1:]).numpy()
    expected = [wasserstein_distance(column(p, a), column(p, b))
                for a, b in pairwise(range(p.n_layers))]
    np.testing.assert_allclose(velocity, expected, rtol=1e-12, atol=1e-13)


def test_jsd_layer_with_the_seed_n_bins_signature_matches_scipy():
    g = torch.Generator().manual_seed(5)
    a = EntropyProfile(torch.rand(40, 3, generator=g) * 4, torch.zeros(40), [0, 1, 2])
    b = EntropyProfile(torch.rand(25, 3, generator=g) * 3 + 1, torch.zeros(25), [0, 1, 2])
    got = D.jsd_layer(a, b, 12)
    for layer in range(3):
        x, y = a.entropy[:, layer].double().numpy(), b.entropy[:, layer].double().numpy()
        edges = np.linspace(min(x.min(), y.min()), max(x.max(), y.max()) + 1e-12, 13)
        p, q = np.histogram(x, edges)[0] / 40, np.histogram(y, edges)[0] / 25
        assert got[layer] == pytest.approx(jensenshannon(p, q) ** 2, abs=1e-12)
    with pytest.raises(ValueError, match="n_bins"):
        D.jsd_layer(a, b, 0)
