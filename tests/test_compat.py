"""The entropy_profiler drop-in and the numbering of profiles, without the 0.2.1 oracle.

tests/test_oracle.py compares the drop-in with the real 0.2.1; these tests hold where that
library is not installed: 0.2.1's README snippets run on a saved tiny model, the layout
(block columns, (T, L, d) states, the last state normed as HF returns it), profile
numbering (`blocks()`, `to_numbering`), and functions that take profiles of either
numbering without mistaking one layer for another.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tests.tiny_models import N_LAYERS, tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama saved with its tokenizer: 0.2.1's profiler takes a name or a path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def seed(folder):
    from entropy_profiler import EntropyProfiler

    return EntropyProfiler(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def native(folder):
    from entropy_fast import EntropyProfiler

    return EntropyProfiler(folder)


def test_readme_snippets_of_0_2_1(seed):
    from entropy_profiler import LayerAnalyzer, plot_aggregated, plot_profile, profile_distance

    profile = seed.profile_text("The capital of France is", max_new_tokens=8)
    assert profile.entropy.shape == (profile.n_tokens, N_LAYERS)
    assert profile.mean_profile().shape == (N_LAYERS,)
    assert isinstance(plot_profile(profile), Axes)
    agg = seed.profile_batch(["The stock market", "In quantum mechanics", "Modern nets"],
                             max_new_tokens=6)
    assert agg.to_matrix().shape == (3, N_LAYERS)
    assert isinstance(plot_aggregated(agg), Axes)
    result = profile_distance(seed.profile_text("Water boils at", max_new_tokens=6),
                              seed.profile_text("Once upon a time", max_new_tokens=6),
                              metric="jsd")
    assert 0.0 <= result.aggregate <= 1.0  # bits
    profile, hidden_states = seed.profile_text_with_states("Hello world", max_new_tokens=8)
    analyzer = LayerAnalyzer(seed, profile, hidden_states=hidden_states)
    for values in (analyzer.layer_entropy(), analyzer.information_velocity(),
                   analyzer.layer_mi(method="cka")):
        assert values.shape == (N_LAYERS,)


def test_layout_is_0_2_1s(seed, folder):
    """Block columns 0..L-1, stride from block 0, (T, L, d) states whose last is normed."""
    from transformers import AutoModelForCausalLM

    from entropy_profiler import EntropyProfile, EntropyProfiler

    profile, states = seed.profile_text_with_states("Hello world", max_new_tokens=5)
    assert isinstance(profile, EntropyProfile)
    assert (profile.layer_indices, profile.numbering, profile.metadata) == (
        list(range(N_LAYERS)), "block", {})
    assert states.shape == (profile.n_tokens, N_LAYERS, 48)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = seed.tokenizer("Hello world")["input_ids"]
    ids = torch.tensor([prompt + profile.token_ids.tolist()])
    with torch.no_grad():
        hf = model(ids, output_hidden_states=True).hidden_states
    rows = slice(len(prompt) - 1, ids.shape[1] - 1)
    expected = torch.stack([h[0, rows] for h in hf[1:]], dim=1)  # HF's last one is normed
    # ours come from KV-cached decoding (as 0.2.1's), these from one forward: float32 rounding
    torch.testing.assert_close(states, expected, atol=1e-5 * float(expected.abs().max()),
                               rtol=0)
    strided = EntropyProfiler(folder, dtype=torch.float32, layer_stride=2)
    assert strided.profile_text("Hello", max_new_tokens=2).layer_indices == [0, 2]


def test_prompt_rows_and_empty_prompt(seed):
    profile = seed.profile_text("Hello", 4, False, True)
    prompt = seed.tokenizer("Hello")["input_ids"]
    n_prompt = len(prompt)
    assert profile.token_ids[:n_prompt].tolist() == prompt  # prompt ids, then generated ones
    assert profile.n_tokens == len(profile.token_ids)
    # the last prompt position is profiled twice: as a prompt row and as generated row 0
    torch.testing.assert_close(profile.entropy[n_prompt - 1], profile.entropy[n_prompt])
    assert seed.profile_text("", 3).n_tokens >= 1  # profiled as the BOS token
    with pytest.raises(ValueError, match="must be greater than 0"):
        seed.profile_text("Hello", 0)


def test_native_blocks_view_is_the_drop_in_profile(seed, native):
    """The native profile (hidden-state numbering, embedding column) seen as 0.2.1's."""
    profile = native.profile_text("Hello world", max_new_tokens=5)
    assert (profile.numbering, profile.layer_indices) == ("hidden_state",
                                                          list(range(N_LAYERS + 1)))
    view = profile.blocks()
    assert (view.numbering, view.layer_indices) == ("block", list(range(N_LAYERS)))
    torch.testing.assert_close(view.entropy, profile.entropy[:, 1:])
    torch.testing.assert_close(view.entropy,
                               seed.profile_text("Hello world", max_new_tokens=5).entropy)
    back = view.to_numbering("hidden_state")
    assert back.layer_indices == list(range(1, N_LAYERS + 1))
    assert back.hidden_state_indices == view.hidden_state_indices
    assert native.profile_batch(["ab", "cd"], max_new_tokens=2).blocks().numbering == "block"


def test_numbering_is_checked():
    from entropy_fast import AggregatedProfile, EntropyProfile

    with pytest.raises(ValueError, match="numbering must be one of"):
        EntropyProfile(torch.zeros(2, 3), torch.arange(2), [0, 1, 2], numbering="layer")
    block = EntropyProfile(torch.zeros(2, 3), torch.arange(2), [0, 1, 2], numbering="block")
    hidden = EntropyProfile(torch.zeros(2, 3), torch.arange(2), [0, 1, 2])
    with pytest.raises(ValueError, match="share layer_indices and numbering"):
        AggregatedProfile([block, hidden])


def test_distances_match_layers_never_positions(seed, native):
    """Either numbering goes in; columns pair by hidden-state index at relative depth, so a
    native profile meets a 0.2.1-numbered one at the same blocks."""
    from entropy_fast import profile_distance as native_distance
    from entropy_profiler import profile_distance

    ours = native.profile_text("Hello world", max_new_tokens=5)
    theirs = seed.profile_text("Hello there", max_new_tokens=5)
    # the drop-in sees every profile in 0.2.1's numbering
    assert profile_distance(ours, theirs, "wasserstein").layer_distances.shape == (N_LAYERS,)
    same = native_distance(ours.blocks(), theirs, "wasserstein")
    assert same.aggregate == pytest.approx(profile_distance(ours, theirs, "wasserstein").aggregate)
    np.testing.assert_array_equal(native_distance(ours, theirs, "wasserstein").per_layer,
                                  same.per_layer)  # the embedding column pairs with no block
    shifted = ours.to_numbering("block")  # blocks 0..L-1 against hidden states 0..L-1
    mislabelled = type(ours)(shifted.entropy, shifted.token_ids, list(range(N_LAYERS)))
    assert native_distance(shifted, mislabelled, "wasserstein").aggregate > 0


def test_plots_return_0_2_1s_types_for_either_numbering(seed, native):
    from entropy_profiler import LayerAnalyzer, plot_cluster, plot_heatmap, plot_profiles
    from entropy_profiler.analysis import (
        plot_information_plane,
        plot_layer_importance,
        plot_velocity_entropy,
    )

    profiles = [native.profile_text(p, max_new_tokens=4) for p in ("ab", "Hi", "The cat")]
    profiles += [seed.profile_text(p, max_new_tokens=4) for p in ("cd", "Yo", "A dog")]
    assert isinstance(plot_profiles(profiles, title="t", figsize=(5, 3)), Figure)
    assert isinstance(plot_heatmap(profiles[0], normalize_x=False), Axes)
    assert isinstance(plot_cluster(profiles, method="pca", feature="delta"), Figure)
    analyzers = {"native": LayerAnalyzer(None, profiles[0]), "seed": LayerAnalyzer(None,
                                                                                 profiles[3])}
    assert analyzers["native"].n_layers == N_LAYERS  # seen through .blocks()
    assert isinstance(plot_layer_importance(analyzers, subtitle="s"), Figure)
    assert isinstance(plot_information_plane(analyzers, subtitle="s"), Figure)
    assert isinstance(plot_velocity_entropy(analyzers["seed"]), Axes)


def test_native_plots_label_the_numbering(native, seed):
    from entropy_fast import viz

    ax = viz.plot_profile(native.profile_text("Hello", max_new_tokens=3))
    assert "hidden-state" in ax.get_xlabel()
    ax = viz.plot_profile(seed.profile_text("Hello", max_new_tokens=3))
    assert "block" in ax.get_xlabel()
    mixed = [native.profile_text("Hi", max_new_tokens=3), seed.profile_text("Hi", 3)]
    ax = viz.plot_profiles(mixed)
    lines = [line.get_xdata().tolist() for line in ax.get_lines()]
    assert lines == [list(range(N_LAYERS + 1)), list(range(1, N_LAYERS + 1))]


def test_half_precision_without_cpu_kernels_runs_in_float32(monkeypatch):
    from entropy_profiler import profiler

    def no_half(*args, **kwargs):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr(torch.nn.functional, "linear", no_half)
    with pytest.warns(UserWarning, match="runs in float32"):
        assert profiler._runnable_dtype(torch.float16, "cpu") == torch.float32
    assert profiler._runnable_dtype(torch.float16, "cuda") == torch.float16


def test_estimator_and_analyzer_defaults():
    from entropy_profiler import EntropyProfile, LayerAnalyzer, MatrixRenyiMI

    if not torch.cuda.is_available():  # 0.2.1's device="cuda" default falls back
        assert MatrixRenyiMI().device == torch.device("cpu")
    profile = EntropyProfile(torch.rand(3, 4), torch.arange(3), [0, 1, 2, 3], 1.0, "m")
    with pytest.warns(UserWarning, match="Hidden states not available"):
        assert LayerAnalyzer(None, profile).layer_mi().tolist() == [0.0] * 4
    with pytest.warns(UserWarning, match="too few"):
        LayerAnalyzer(None, profile, hidden_states=torch.rand(3, 4, 5)).layer_mi("cka")


def test_engine_layers_option(llama, tokenizer):
    from entropy_fast import EntropyProfiler

    profiler = EntropyProfiler(llama, tokenizer=tokenizer, layers=[1, 3])
    assert profiler.profile_text("Hello", max_new_tokens=2).layer_indices == [1, 3]
    for bad in ([], [2, 1], [0, N_LAYERS + 1]):
        with pytest.raises(ValueError, match="increasing hidden-state indices"):
            EntropyProfiler(llama, tokenizer=tokenizer, layers=bad)


def test_entropy_functions_are_0_2_1s():
    from entropy_profiler import renyi_entropy, shannon_entropy

    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    assert shannon_entropy(probs).item() == pytest.approx(1.5 * np.log(2.0), abs=1e-6)
    assert shannon_entropy(probs, 1e-3).item() != shannon_entropy(probs).item()  # eps in log
    assert renyi_entropy(probs, 1.0).item() == pytest.approx(shannon_entropy(probs).item())
    assert renyi_entropy(probs, 2.0, 1e-15).item() == pytest.approx(-np.log(0.375), abs=1e-6)
