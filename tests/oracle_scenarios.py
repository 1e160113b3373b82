"""0.2.1 call forms and their results, run the same way by the real library and the drop-in.

Runs in two environments: the oracle venv (the real entropy-profiler 0.2.1 from the
registry; it shares the import name) as a script, and ours (`import tests.oracle_scenarios`).
It imports nothing but torch, numpy, matplotlib and `entropy_profiler`, so each side gets
its own. Every scenario returns plain data (tensors, arrays, numbers, strings) that the
other side's results can be compared with.

    python tests/oracle_scenarios.py SPEC.json OUT.pt      # SPEC: see `run`
"""

from __future__ import annotations

import inspect
import json
import sys
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch

MODULES = ("entropy_profiler", "entropy_profiler.profiler", "entropy_profiler.distances",
           "entropy_profiler.analysis", "entropy_profiler.viz", "entropy_profiler.estimators")
METRICS = ("jsd", "wasserstein", "fisher_rao", "srvf")


# -- the public API: names, signatures, members ------------------------------------------


def _signature(obj) -> list[list[str]] | None:
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    return [[p.name, p.kind.name, "" if p.default is p.empty else repr(p.default)]
            for p in params]


def _members(cls) -> dict[str, object]:
    """Public methods and properties of a class, inherited ones included."""
    import dataclasses

    members = {f.name: "attribute" for f in dataclasses.fields(cls)
               } if dataclasses.is_dataclass(cls) else {}
    for name in dir(cls):
        if name.startswith("_") and name != "__init__":
            continue
        value = inspect.getattr_static(cls, name)
        if isinstance(value, property):
            members[name] = "property"
        elif name not in members and (callable(value)
                                      or isinstance(value, (staticmethod, classmethod))):
            members[name] = _signature(getattr(cls, name))
    return members


def api_surface() -> dict:
    """{module: {"names": {name: {kind, origin, signature, members}}, "all": __all__}}.

    origin: whether the package defines the name (0.2.1's imports of torch or matplotlib
    names are not its API).
    """
    import importlib

    surface = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names = {}
        for name, value in vars(module).items():
            if name.startswith("_") or not callable(value) or inspect.ismodule(value):
                continue
            kind = "class" if inspect.isclass(value) else "function"
            names[name] = {"kind": kind, "signature": _signature(value),
                           "origin": getattr(value, "__module__", "") or "",
                           "members": _members(value) if kind == "class" else {}}
        surface[module_name] = {"names": names, "all": sorted(getattr(module, "__all__", []))}
    return surface


# -- profiles from real models ------------------------------------------------------------


def dump_profile(profile) -> dict:
    """Everything 0.2.1 exposes on a profile."""
    return {"type": type(profile).__name__, "entropy": profile.entropy.clone(),
            "token_ids": profile.token_ids.clone(), "layer_indices": list(profile.layer_indices),
            "alpha": float(profile.alpha), "model_name": profile.model_name,
            "metadata": dict(profile.metadata), "n_layers": profile.n_layers,
            "n_tokens": profile.n_tokens, "mean_profile": profile.mean_profile().clone(),
            "numpy_dtype": str(profile.to_numpy().dtype)}


def dump_analyzer(analyzer, mi: bool = True) -> dict:
    """Every LayerAnalyzer method and property."""
    out = {"n_layers": analyzer.n_layers, "n_tokens": analyzer.n_tokens,
           "model_name": analyzer.model_name, "layer_entropy": analyzer.layer_entropy(),
           "information_velocity": analyzer.information_velocity(),
           "fisher_rao_velocity": analyzer.fisher_rao_velocity(),
           "distance_to_output": analyzer.distance_to_output(),
           "jsd_to_output": analyzer.jsd_to_output(), "jsd_to_output_7": analyzer.jsd_to_output(7),
           "layer_importance": analyzer.layer_importance()}
    if mi:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["layer_mi_renyi"] = analyzer.layer_mi()
            out["layer_mi_cka"] = analyzer.layer_mi(method="cka")
            out["layer_mi_cached"] = analyzer.layer_mi("renyi") is out["layer_mi_renyi"]
        out["mi_warnings"] = len(caught)
    return out


def profiler_results(path: str, prompts: list[str], max_new_tokens: int, full: bool) -> dict:
    """0.2.1's profiler call forms on one model folder."""
    from entropy_profiler import EntropyProfiler, LayerAnalyzer
    from entropy_profiler.analysis import compare_models

    n = max_new_tokens
    out = {}
    profiler = EntropyProfiler(path, "cpu", torch.float32)  # device, dtype positionally
    out["attributes"] = {"model_name": profiler.model_name, "alpha": profiler.alpha,
                         "layer_stride": profiler.layer_stride, "device": profiler.device,
                         "pad_token": profiler.tokenizer.pad_token}
    out["text"] = dump_profile(profiler.profile_text(prompts[0], max_new_tokens=n))
    profile, states = profiler.profile_text_with_states(prompts[0], max_new_tokens=n)
    out["with_states"] = dump_profile(profile)
    out["states"] = states.clone()
    out["analyzer"] = dump_analyzer(LayerAnalyzer(profiler, profile, hidden_states=states))
    batch = profiler.profile_batch(prompts, max_new_tokens=n)
    out["batch"] = {"type": type(batch).__name__, "model_name": batch.model_name,
                    "profiles": [dump_profile(p) for p in batch.profiles],
                    "to_matrix": batch.to_matrix().clone(), "mean": batch.mean_profile().clone()}
    if not full:
        out["stride_2"] = dump_profile(
            EntropyProfiler(path, "cpu", torch.float32, 1.0, 2).profile_text(prompts[0], n))
        return out
    out["text_positional"] = dump_profile(profiler.profile_text(prompts[1], n, False, True))
    out["text_empty"] = dump_profile(profiler.profile_text("", 4))
    out["text_space"] = dump_profile(profiler.profile_text(" ", 3))
    torch.manual_seed(0)
    out["text_sampled"] = dump_profile(profiler.profile_text(prompts[1], n, True))
    profile, states = profiler.profile_text_with_states(prompts[1], n, False, True)
    out["with_states_prompt"] = dump_profile(profile)
    out["states_prompt"] = states.clone()
    out["batch_positional"] = [dump_profile(p) for p in
                               profiler.profile_batch(prompts[:2], 3, False).profiles]
    try:
        profiler.profile_text(prompts[0], 0)
        out["zero_new_tokens"] = "no error"
    except Exception as error:  # what 0.2.1 raises is the expected behaviour
        out["zero_new_tokens"] = type(error).__name__
    out["stride_alpha"] = dump_profile(
        EntropyProfiler(path, "cpu", torch.float32, 2.0, 2).profile_text(prompts[0], n))
    out["renyi_half"] = dump_profile(EntropyProfiler(path, device="cpu", dtype=torch.float32,
                                                     alpha=0.5).profile_text(prompts[0], n))
    with EntropyProfiler(path, device="cpu", dtype=torch.float32) as scoped:
        scoped.profile_text(prompts[0], 2)
    out["unloaded"] = [scoped.model is None, hasattr(scoped, "tokenizer")]
    figures = compare_models({"m": profiler}, prompts[0], 4, "sub")
    out["compare_models"] = [type(figures).__name__, *(_figure_shape(f) for f in figures)]
    return out


# -- definitions on fixed inputs ------------------------------------------------------------


def synthetic_profiles():
    """Profiles built from their fields, as 0.2.1 code may build them, plus an aggregate."""
    from entropy_profiler import AggregatedProfile, EntropyProfile

    rng = np.random.default_rng(0)

    def profile(n_tokens, trend, noise, name="m"):
        values = np.clip(trend + rng.normal(0.0, noise, (n_tokens, len(trend))), 0.0, None)
        return EntropyProfile(torch.tensor(values, dtype=torch.float32), torch.arange(n_tokens),
                              list(range(len(trend))), 1.0, name)

    falling = np.linspace(6.0, 1.0, 8)
    profiles = [profile(20, falling, 0.8), profile(15, falling + 0.3, 1.0),
                profile(24, np.linspace(3.0, 2.5, 8), 0.5, "n"), profile(3, falling, 0.3),
                profile(12, falling[::-1], 0.6, "n")]
    return profiles, AggregatedProfile(profiles=profiles[:2])


def definition_results() -> dict:
    """Every distance, aggregation, analysis and estimator on fixed inputs."""
    from entropy_profiler import (
        LayerAnalyzer,
        MatrixRenyiMI,
        fisher_rao_distance,
        jsd_layer,
        pairwise_distances,
        profile_distance,
        renyi_entropy,
        shannon_entropy,
        srvf_distance,
        wasserstein_layer,
    )

    profiles, aggregated = synthetic_profiles()
    a, b, c = profiles[:3]
    out = {"aggregated": [aggregated.to_matrix(), aggregated.mean_profile(),
                          aggregated.model_name]}
    for i, j in ((0, 1), (0, 2), (1, 4), (0, 0)):
        p, q = profiles[i], profiles[j]
        out[f"jsd_layer_{i}{j}"] = jsd_layer(p, q)
        out[f"jsd_layer_{i}{j}_bins7"] = jsd_layer(p, q, 7)
        out[f"wasserstein_layer_{i}{j}"] = wasserstein_layer(p, q)
        out[f"fisher_rao_{i}{j}"] = fisher_rao_distance(p, q)
        out[f"srvf_{i}{j}"] = srvf_distance(p, q)
        for metric in METRICS:
            for aggregation in ("mean", "max", "sum"):
                result = profile_distance(p, q, metric, aggregation)
                out[f"distance_{i}{j}_{metric}_{aggregation}"] = [
                    type(result).__name__, result.layer_distances, result.aggregate,
                    result.metric, result.aggregation]
    out["distance_n_bins"] = profile_distance(a, b, metric="jsd", n_bins=9).aggregate
    for metric in METRICS:
        out[f"pairwise_{metric}"] = pairwise_distances([a, b, c], metric=metric)
    out["pairwise_jsd_max_bins"] = pairwise_distances([a, b, c], "jsd", "max", 12)
    states = torch.tensor(np.random.default_rng(1).normal(size=(20, 8, 16)), dtype=torch.float32)
    out["analyzer"] = dump_analyzer(LayerAnalyzer(None, a, hidden_states=states))
    out["analyzer_no_states"] = dump_analyzer(LayerAnalyzer(None, a))
    out["analyzer_few_tokens"] = dump_analyzer(
        LayerAnalyzer(None, profiles[3], hidden_states=states[:3]))
    estimator = MatrixRenyiMI(device="cpu")
    x, y = states[:, 2].numpy(), states[:, 7].numpy() + states[:, 2].numpy()
    gram = estimator.gram_matrix(torch.from_numpy(x), torch.tensor(3.0))
    out["mi"] = [estimator.compute_mi(x, y), gram, estimator.entropy(gram).item(),
                 estimator.joint_entropy(gram, estimator.gram_matrix(torch.from_numpy(y),
                                                                     torch.tensor(2.0))).item(),
                 MatrixRenyiMI(1.5, "cpu").compute_mi(torch.from_numpy(x), torch.from_numpy(y))]
    probs = torch.softmax(torch.tensor(np.random.default_rng(2).normal(size=(4, 50)) * 3), -1)
    probs = probs.float()
    out["entropy_functions"] = [shannon_entropy(probs), shannon_entropy(probs, 1e-12),
                                renyi_entropy(probs, 2.0), renyi_entropy(probs, 0.5, 1e-12),
                                renyi_entropy(probs, 1.0)]
    return out


# -- plots: call forms and return types -------------------------------------------------------


def _figure_shape(figure) -> list:
    """Type and number of Axes (colorbars included) of what a plot returned."""
    from matplotlib.figure import Figure

    fig = figure if isinstance(figure, Figure) else figure.figure
    return [type(figure).__name__, len(fig.axes)]


def plot_results() -> dict:
    """0.2.1's plot call forms on fixed profiles: return types and Axes counts."""
    from entropy_profiler import (
        LayerAnalyzer,
        plot_aggregated,
        plot_cluster,
        plot_heatmap,
        plot_profile,
        plot_profiles,
    )
    from entropy_profiler.analysis import (
        plot_information_plane,
        plot_layer_importance,
        plot_velocity_entropy,
    )

    profiles, aggregated = synthetic_profiles()
    many = [p for p in profiles if p.n_tokens > 3] * 3
    analyzers = {"a": LayerAnalyzer(None, profiles[0]), "b": LayerAnalyzer(None, profiles[2])}
    _, ax = plt.subplots()
    calls = {
        "profile": lambda: plot_profile(profiles[0]),
        "profile_all": lambda: plot_profile(profiles[0], ax, False, "lbl", "C1", True, 0.3),
        "profiles": lambda: plot_profiles(profiles[:2]),
        "profiles_all": lambda: plot_profiles(profiles[:2], ["x", "y"], False, "t", (6, 4)),
        "heatmap": lambda: plot_heatmap(profiles[0]),
        "heatmap_all": lambda: plot_heatmap(profiles[0], None, False, 8),
        "aggregated": lambda: plot_aggregated(aggregated),
        "aggregated_label": lambda: plot_aggregated(aggregated, ax=ax, label="l", color="C2"),
        "aggregated_all": lambda: plot_aggregated(aggregated, None, False, "l", "red"),
        "cluster_pca_delta": lambda: plot_cluster(many, method="pca", feature="delta",
                                                  title="t"),
        "cluster_pca_bucketed": lambda: plot_cluster(many, None, "pca", "bucketed"),
        "cluster_pca_full": lambda: plot_cluster(many, ["u", "v"] * 6, "pca", "full",
                                                 color_by="model", n_samples=4),
        "cluster_tsne": lambda: plot_cluster(many, method="tsne", feature="mean"),
        "cluster_tsne_wasserstein": lambda: plot_cluster(many, method="tsne",
                                                         metric="wasserstein"),
        "layer_importance": lambda: plot_layer_importance(analyzers, subtitle="s"),
        "layer_importance_all": lambda: plot_layer_importance(analyzers, "s", (8, 6)),
        "information_plane": lambda: plot_information_plane(analyzers, subtitle="s"),
        "information_plane_all": lambda: plot_information_plane(analyzers, "", (6, 5)),
        "velocity_entropy": lambda: plot_velocity_entropy(analyzers["a"]),
        "velocity_entropy_ax": lambda: plot_velocity_entropy(analyzers["b"], ax=ax),
    }
    out = {}
    for name, call in calls.items():
        try:
            out[name] = _figure_shape(call())
        except Exception as error:  # a call form that fails is a result too
            out[name] = ["error", type(error).__name__]
        plt.close("all")
        _, ax = plt.subplots()
    try:
        plot_cluster(many, method="pca", metric="jsd")
    except ValueError:
        out["cluster_pca_precomputed"] = "ValueError"
    plt.close("all")
    return out


def run(spec: dict) -> dict:
    """spec: {"threads": int, "api": bool, "definitions": bool, "plots": bool,
    "models": [{"name", "path", "prompts", "max_new_tokens", "full"}]}."""
    torch.set_num_threads(spec.get("threads", 1))
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    out = {}
    if spec.get("api"):
        out["api"] = api_surface()
    if spec.get("definitions"):
        out["definitions"] = definition_results()
    if spec.get("plots"):
        out["plots"] = plot_results()
    for model in spec.get("models", []):
        out[model["name"]] = profiler_results(model["path"], model["prompts"],
                                              model["max_new_tokens"], model["full"])
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        results = run(json.load(f))
    torch.save(results, sys.argv[2])
