"""LayerAnalyzer and compare_models: against scipy / float64 textbook formulas on synthetic
inputs, on a real tiny random GPT-2 profiled by EntropyProfiler, and on bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from entropy_fast import analysis
from entropy_fast.analysis import LayerAnalyzer, compare_models
from entropy_fast.distances import jsd_layer
from entropy_fast.profile import AggregatedProfile, EntropyProfile
from tests._analysis_fixtures import make_profile, tiny_run


class StubLens:
    """Lens stand-in: logits = hidden @ W, so the test can recompute them by hand."""

    def __init__(self, d_model: int, vocab: int, seed: int = 0) -> None:
        self.weight = torch.randn(d_model, vocab, generator=torch.Generator().manual_seed(seed))
        self.vocab_size = vocab

    def logits(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        assert not normed
        return (hidden.float() @ self.weight).float()


def test_profile_only_metrics_match_references():
    p = make_profile(13, n_layers=7, seed=3)
    e = p.to_numpy().astype(np.float64)
    analyzer = LayerAnalyzer(None, p)
    np.testing.assert_allclose(analyzer.layer_entropy(), e.mean(axis=0), rtol=1e-12)
    velocity = analyzer.information_velocity()
    assert velocity[0] == 0.0
    np.testing.assert_allclose(
        velocity[1:], [wasserstein_distance(e[:, k - 1], e[:, k]) for k in range(1, 7)],
        rtol=1e-12, atol=1e-13)
    last = EntropyProfile(p.entropy[:, -1:].expand(-1, 7), p.token_ids, p.layer_indices)
    np.testing.assert_allclose(analyzer.jsd_to_output(bin_width=0.5),
                               jsd_layer(p, last, bin_width=0.5), rtol=1e-12, atol=1e-14)
    assert analyzer.jsd_to_output()[-1] == pytest.approx(0.0, abs=1e-15)
    importance = analyzer.layer_importance()
    assert set(importance) == {"entropy", "velocity", "jsd_to_output"}


def test_distance_to_output_equals_textbook_fisher_rao():
    n_layers, n_tokens, d, vocab = 4, 6, 5, 37
    states = torch.randn(n_layers, n_tokens, d, generator=torch.Generator().manual_seed(1))
    lens = StubLens(d, vocab)
    profiler = SimpleNamespace(lens=lens, device=torch.device("cpu"), dtype=torch.float32)
    analyzer = LayerAnalyzer(profiler, make_profile(n_tokens, n_layers), hidden_states=states)
    probs = [torch.softmax(lens.logits(h).double(), -1).numpy() for h in states]
    expected = [np.mean(2 * np.arccos(np.clip(np.sum(np.sqrt(p * probs[-1]), -1), 0, 1)))
                for p in probs]
    np.testing.assert_allclose(analyzer.distance_to_output(), expected, rtol=1e-6, atol=1e-7)
    assert set(analyzer.layer_importance()) == {"entropy", "velocity", "jsd_to_output",
                                                "distance_to_output"}


def test_layer_mi_on_synthetic_states():
    states = torch.randn(3, 20, 4, generator=torch.Generator().manual_seed(2))
    states[1] = states[2] * 2.0   # layer 1 is a scaled copy of the output layer
    analyzer = LayerAnalyzer(None, make_profile(20, 3), hidden_states=states)
    cka = analyzer.layer_mi("cka")
    assert cka[1] == pytest.approx(1.0) and cka[2] == pytest.approx(1.0)
    assert cka[0] < 0.9
    renyi = analyzer.layer_mi("renyi")
    assert renyi.shape == (3,) and renyi[1] == pytest.approx(renyi[2], rel=1e-9)
    assert renyi[0] < renyi[2]


def test_real_tiny_model():
    profiler, profile, states, _ = tiny_run()
    assert states.shape[:2] == (profile.n_layers, profile.n_tokens)
    analyzer = LayerAnalyzer(profiler, profile, hidden_states=states)
    distance = analyzer.distance_to_output()
    assert distance[-1] == pytest.approx(0.0, abs=1e-6)
    assert np.all((distance >= 0) & (distance <= math.pi))
    # The lens on the last layer's states reproduces the profile's entropies.
    logits = profiler.lens.logits(states[-1].to(profiler.dtype), normed=False).double()
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    np.testing.assert_allclose(entropy.numpy(), profile.entropy[:, -1].double().numpy(),
                               rtol=1e-4, atol=1e-4)
    cka = analyzer.layer_mi("cka")
    assert cka[-1] == pytest.approx(1.0) and np.all((cka >= 0) & (cka <= 1 + 1e-12))
    assert np.all(analyzer.layer_mi("renyi") > -1e-9)
    assert len(analyzer.layer_importance()) == 4


def test_missing_states_or_lens_raise_clear_errors():
    p = make_profile(5, 4)
    analyzer = LayerAnalyzer(None, p)
    with pytest.raises(ValueError, match=r"needs hidden states.*profile_text_with_states"):
        analyzer.layer_mi()
    with pytest.raises(ValueError, match="needs hidden states"):
        analyzer.distance_to_output()
    with_states = LayerAnalyzer(None, p, hidden_states=torch.zeros(4, 5, 3))
    with pytest.raises(ValueError, match="needs the profiler's lens"):
        with_states.distance_to_output()
    with pytest.raises(ValueError, match="unknown method 'mine'"):
        with_states.layer_mi("mine")
    with pytest.raises(ValueError, match=r"must be \(n_layers x n_tokens x d_model\) = \(4, 5\)"):
        LayerAnalyzer(None, p, hidden_states=torch.zeros(5, 4, 3))
    empty = EntropyProfile(torch.zeros(0, 4), torch.zeros(0), list(range(4)))
    with pytest.raises(ValueError, match="profile is empty"):
        LayerAnalyzer(None, empty)


def test_compare_models_resamples_by_relative_depth():
    depth_a, depth_b = np.arange(9), np.arange(0, 9, 2)

    def linear(layers):
        values = np.tile(8.0 - 0.5 * layers, (3, 1))
        return EntropyProfile(torch.tensor(values, dtype=torch.float32), torch.zeros(3),
                              list(layers))

    bent = linear(depth_b)
    bent.entropy[:, 2] += 2.0
    result = compare_models({"deep": linear(depth_a), "shallow": [linear(depth_b)],
                             "bent": AggregatedProfile([bent])})
    assert result.names == ["deep", "shallow", "bent"]
    assert result.curves.shape == (3, 9) and result.depth[-1] == 1.0
    assert result.distances[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert result.distances[0, 2] > 0.1
    np.testing.assert_array_equal(result.distances, result.distances.T)
    fisher = compare_models({"a": linear(depth_a), "b": bent}, metric="fisher_rao")
    assert fisher.metric == "fisher_rao" and fisher.distances[0, 1] > 0


def test_compare_models_pools_each_model_and_compares_at_relative_depth():
    deep = [make_profile(4, n_layers=9, seed=k) for k in range(3)]
    shallow = [make_profile(5, n_layers=5, seed=10 + k, shift=0.5) for k in range(2)]
    result = compare_models({"deep": deep, "shallow": shallow}, metric="wasserstein")
    x = np.concatenate([p.to_numpy() for p in deep]).astype(np.float64)
    y = np.concatenate([p.to_numpy() for p in shallow]).astype(np.float64)
    expected = np.mean([wasserstein_distance(x[:, 2 * k], y[:, k]) for k in range(5)])
    assert result.distances[0, 1] == pytest.approx(expected, rel=1e-12)
    reordered = result.select(["shallow", "deep"])
    assert reordered.names == ["shallow", "deep"]
    assert reordered.distances[1, 0] == result.distances[0, 1]
    np.testing.assert_array_equal(reordered.curves[0], result.curves[1])


def test_compare_models_bad_input():
    with pytest.raises(ValueError, match=r"unknown metric 'cosine'"):
        compare_models({"a": make_profile(3)}, metric="cosine")
    with pytest.raises(ValueError, match="no models given"):
        compare_models({})
    with pytest.raises(ValueError, match="no depth"):
        compare_models({"a": make_profile(3, n_layers=1)})


def test_seed_plot_names_are_importable_from_analysis():
    from entropy_fast import viz

    assert analysis.plot_layer_importance is viz.plot_layer_importance
    with pytest.raises(AttributeError):
        _ = analysis.no_such_name
