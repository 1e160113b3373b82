"""Named DuckDB queries on a real store, each against an independent numpy/scipy computation."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from entropy_fast.corpus import Corpus
from entropy_fast.store import Store
from entropy_fast.store.check import check_store
from entropy_fast.store.sql import ProfileStore, QueryError, named_queries
from tests.test_store import fill, random_profile, run_info

MODELS = {"org/a": [0, 2, 4, 6], "b": list(range(9)), "c": [0, 3, 6]}
N_PROMPTS = 25


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with three models of different depths (model org/a with two runs), and the
    same data as {(model, run_id): {prompt_id: profile}} for the references."""
    root = tmp_path_factory.mktemp("sql") / "store"
    store = Store(root, create=True)
    corpus = Corpus.from_texts([f"prompt {i}" for i in range(N_PROMPTS)])
    rng = np.random.default_rng(42)
    data = {}
    runs = [("org/a", (1.0, 2.0), 3.0), ("org/a", (1.0,), 4.0), ("b", (1.0, 2.0), 6.0),
            ("c", (1.0, 2.0), 5.0)]
    for model, alphas, scale in runs:
        info = run_info(model, corpus, alphas=alphas)
        profiles = {p.prompt_id: random_profile(rng, int(rng.integers(1, 9)), MODELS[model],
                                                alphas=alphas, scale=scale)
                    for p in corpus.prompts}
        fill(store, info, corpus, profiles, rows_per_part=300)
        data[(model, info.run_id)] = profiles
    with ProfileStore(root) as db:
        yield db, data


def values(data, model, layer, alpha=1.0, run=None, prompts=None) -> np.ndarray:
    """Every token's entropy at one layer, float64, pooled over the runs that match and
    have that alpha."""
    out = [p.entropies[alpha][:, p.layer_indices.index(layer)].double().numpy()
           for (m, r), profiles in data.items() if m == model and run in (None, r)
           for i, p in profiles.items()
           if alpha in p.entropies and (prompts is None or i in prompts)]
    return np.concatenate(out)


def run_of(data, model, alphas_len=2) -> str:
    return next(r for (m, r), ps in data.items() if m == model and len(ps[0].alphas) == alphas_len)


def hist_jsd(a: np.ndarray, b: np.ndarray, width: float) -> float:
    """JSD (nats) of histograms on bins [k w, (k + 1) w), via numpy.histogram and scipy."""
    edges = np.arange(math.floor(min(a.min(), b.min()) / width),
                      math.floor(max(a.max(), b.max()) / width) + 2) * width
    ca, _ = np.histogram(a, bins=edges)
    cb, _ = np.histogram(b, bins=edges)
    return jensenshannon(ca / ca.sum(), cb / cb.sum()) ** 2


def matched(short: list[int], long: list[int]) -> dict[int, int]:
    """Nearest relative depth (exact fractions), ties to the shallower layer."""
    return {s: min(long, key=lambda x: (abs(Fraction(s, short[-1]) - Fraction(x, long[-1])), x))
            for s in short}


def test_mean_profile(world):
    db, data = world
    run = run_of(data, "b")
    rows = db.query("mean_profile", model="b", alpha=2.0).to_pylist()
    assert [r["layer"] for r in rows] == MODELS["b"] and {r["run_id"] for r in rows} == {run}
    for row in rows:
        x = values(data, "b", row["layer"], alpha=2.0)
        assert row["n"] == len(x)
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-9)
        assert row["std"] == pytest.approx(x.std(ddof=1), rel=1e-9)
        assert (row["min"], row["max"]) == (x.min(), x.max())
        for column, q in (("q05", 5), ("q25", 25), ("median", 50), ("q75", 75), ("q95", 95)):
            assert row[column] == pytest.approx(np.percentile(x, q), rel=1e-6)
    every = db.query("mean_profile").to_pylist()
    assert len(every) == 4 * 2 + 4 + 9 * 2 + 3 * 2


def test_aggregated_profile_weighs_prompts_equally(world):
    db, data = world
    run = run_of(data, "c")
    rows = db.query("aggregated_profile", run_id=run, alpha=1.0).to_pylist()
    matrix = np.stack([p.entropies[1.0].double().mean(0).numpy()
                       for p in data[("c", run)].values()])
    assert [r["n_prompts"] for r in rows] == [N_PROMPTS] * 3
    np.testing.assert_allclose([r["mean"] for r in rows], matrix.mean(0), rtol=1e-9)
    np.testing.assert_allclose([r["std"] for r in rows], matrix.std(0, ddof=1), rtol=1e-9)


def test_layer_jsd_between_runs_and_prompt_sets(world):
    db, data = world
    run1, run2 = run_of(data, "org/a", 2), run_of(data, "org/a", 1)
    rows = db.query("layer_jsd", model_a="org/a", run_a=run1, run_b=run2,
                    bin_width=0.5).to_pylist()
    assert [r["layer_a"] for r in rows] == [r["layer_b"] for r in rows] == MODELS["org/a"]
    for row in rows:
        a = values(data, "org/a", row["layer_a"], run=run1)
        b = values(data, "org/a", row["layer_a"], run=run2)
        assert (row["n_a"], row["n_b"]) == (len(a), len(b))
        assert row["jsd"] == pytest.approx(hist_jsd(a, b, 0.5), rel=1e-9, abs=1e-12)
        assert row["js_distance"] == pytest.approx(math.sqrt(row["jsd"]), rel=1e-12)
    first, rest = list(range(10)), list(range(10, N_PROMPTS))
    rows = db.query("layer_jsd", model_a="b", prompts_a=first, prompts_b=rest).to_pylist()
    for row in rows:
        a = values(data, "b", row["layer_a"], prompts=first)
        b = values(data, "b", row["layer_a"], prompts=rest)
        assert row["jsd"] == pytest.approx(hist_jsd(a, b, 0.25), rel=1e-9, abs=1e-12)
    same = db.query("layer_jsd", model_a="c").to_pylist()
    assert all(r["jsd"] == pytest.approx(0, abs=1e-12) for r in same)


def test_layer_wasserstein_equals_scipy_across_models(world):
    db, data = world
    rows = db.query("layer_wasserstein", model_a="b", model_b="org/a", alpha=2.0).to_pylist()
    pairs = matched(MODELS["org/a"], MODELS["b"])  # org/a is the shorter model
    assert [(r["layer_b"], r["layer_a"]) for r in rows] == list(pairs.items())
    for row in rows:
        a = values(data, "b", row["layer_a"], alpha=2.0)
        b = values(data, "org/a", row["layer_b"], alpha=2.0)
        assert row["wasserstein"] == pytest.approx(wasserstein_distance(a, b), rel=1e-9)


def test_wasserstein_handles_ties():
    """Tied values across groups (peers must share one CDF step)."""
    corpus = Corpus.from_texts(["x", "y"])
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp, create=True)
        info = run_info("t", corpus, alphas=(1.0,))
        profiles = {}
        for i, column in enumerate(([1.0, 1.0, 2.0, 3.0], [1.0, 2.0, 2.0, 5.0, 5.0])):
            entropy = torch.tensor(column).reshape(-1, 1)
            profiles[i] = random_profile(np.random.default_rng(i), len(column), [0],
                                         alphas=(1.0,))
            profiles[i].entropies[1.0] = entropy
        fill(store, info, corpus, profiles)
        with ProfileStore(tmp) as db:
            row = db.query("layer_wasserstein", model_a="t", prompts_a=[0],
                           prompts_b=[1]).to_pylist()[0]
    expected = wasserstein_distance([1, 1, 2, 3], [1, 2, 2, 5, 5])
    assert row["wasserstein"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("metric", ["jsd", "wasserstein"])
def test_model_distances_matrix(world, metric):
    db, data = world
    runs = [run_of(data, "org/a", 2), run_of(data, "b"), run_of(data, "c")]
    rows = db.query("model_distances", metric=metric, runs=runs, bin_width=0.3).to_pylist()
    matrix = {(r["model_a"], r["model_b"]): r["distance"] for r in rows}
    assert len(matrix) == 9 and all(matrix[(m, m)] == 0 for m in MODELS)

    def reference(x: str, y: str) -> float:
        short, long = sorted((x, y), key=lambda m: (len(MODELS[m]), m))
        gaps = []
        for s, lo in matched(MODELS[short], MODELS[long]).items():
            a = values(data, short, s, run=runs[list(MODELS).index(short)])
            b = values(data, long, lo, run=runs[list(MODELS).index(long)])
            gaps.append(hist_jsd(a, b, 0.3) if metric == "jsd" else wasserstein_distance(a, b))
        return float(np.mean(gaps))

    for x in MODELS:
        for y in MODELS:
            if x != y:
                assert matrix[(x, y)] == pytest.approx(reference(x, y), rel=1e-9)
                assert matrix[(x, y)] == matrix[(y, x)]


def test_model_distances_rejects_unknown_metric(world):
    db, _ = world
    with pytest.raises(QueryError, match="metric must be"):
        db.query("model_distances", metric="cosine")


def test_nearest_prompts(world):
    db, data = world
    run = run_of(data, "b")
    rows = db.query("nearest_prompts", model="b", prompt_id=4, k=5, run_id=run).to_pylist()
    means = {i: p.entropies[1.0].double().mean(0).numpy() for i, p in data[("b", run)].items()}
    distances = sorted((float(np.linalg.norm(m - means[4])), i) for i, m in means.items()
                       if i != 4)
    assert [r["prompt_id"] for r in rows] == [i for _, i in distances[:5]]
    np.testing.assert_allclose([r["distance"] for r in rows], [d for d, _ in distances[:5]],
                               rtol=1e-9)
    assert rows[0]["text"] == f"prompt {rows[0]['prompt_id']}"


def test_layer_dynamics(world):
    db, data = world
    run = run_of(data, "org/a", 2)
    rows = db.query("layer_dynamics", run_id=run, prompt_id=3).to_pylist()
    profile = data[("org/a", run)][3]
    h = profile.entropies[1.0].double().numpy()
    layers = np.asarray(profile.layer_indices)
    velocity = np.diff(h, axis=1) / np.diff(layers)
    assert len(rows) == profile.n_tokens
    for pos, row in enumerate(rows):
        assert row["pos"] == pos and row["token_id"] == profile.token_ids[pos]
        assert row["min_layer"] == layers[np.argmin(h[pos])]
        assert row["min_entropy"] == pytest.approx(h[pos].min())
        assert row["mean_abs_velocity"] == pytest.approx(np.abs(velocity[pos]).mean())
        assert row["max_drop_velocity"] == pytest.approx(velocity[pos].min())
        assert row["max_drop_layer"] == layers[1:][np.argmin(velocity[pos])]


def test_position_effects(world):
    db, data = world
    run = run_of(data, "c")
    rows = db.query("position_effects", run_id=run, layer=3, max_pos=4).to_pylist()
    profiles = data[("c", run)].values()
    assert [r["pos"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        x = np.array([p.entropies[1.0][row["pos"], 1].item() for p in profiles
                      if p.n_tokens > row["pos"]])
        assert row["n"] == len(x)
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-9)
        assert row["std"] == pytest.approx(x.std(ddof=1), rel=1e-9)


def test_integrity_of_a_sound_store(world):
    db, data = world
    rows = db.query("integrity").to_pylist()
    assert len(rows) == 4 and all(r["ok"] for r in rows)
    for row in rows:
        profiles = data[(row["model"], row["run_id"])]
        first = next(iter(profiles.values()))
        tokens = sum(p.n_tokens for p in profiles.values())
        assert row["n_tokens"] == tokens
        assert row["n_rows"] == tokens * first.n_layers * len(first.alphas)


def test_integrity_and_check_find_damage(tmp_path):
    corpus = Corpus.from_texts([f"p{i}" for i in range(6)])
    rng = np.random.default_rng(3)
    profiles = {i: random_profile(rng, 3, [0, 1], alphas=(1.0,)) for i in range(6)}
    profiles[2].entropies[1.0][0, 0] = float("nan")
    profiles[3].entropies[1.0][1, 1] = float("inf")
    store = Store(tmp_path / "s", create=True)
    fill(store, run_info("m", corpus, alphas=(1.0,)), corpus, profiles, rows_per_part=10)
    problems = check_store(store.root).problems
    assert len(problems) == 1 and "1 NaN entropies; 1 infinite entropies" in problems[0]
    # a committed file deleted behind the store's back, and a stray file
    entry = store.manifest()[0]
    (store.root / entry.entropy_file).unlink()
    (store.root / entry.entropy_file).with_name("part-s0of1-999999.parquet").write_bytes(b"x")
    report = check_store(store.root)
    problems, notes = report.problems, report.notes
    assert any("committed in the manifest but missing" in p for p in problems)
    assert any("uncommitted file" in n for n in notes)


def test_bad_queries_and_parameters(world):
    db, _ = world
    with pytest.raises(QueryError, match="unknown query 'nope'"):
        db.query("nope")
    with pytest.raises(QueryError, match="has no parameter bogus; its parameters: model"):
        db.query("mean_profile", bogus=1)
    with pytest.raises(QueryError, match="needs model, prompt_id"):
        db.query("nearest_prompts")
    with pytest.raises(QueryError, match="k must be INTEGER"):
        db.query("nearest_prompts", model="b", prompt_id=1, k="many")
    with pytest.raises(QueryError, match="Catalog Error"):
        db.sql("SELECT * FROM no_such_table")


def test_parameters_are_bound_not_pasted(world):
    db, _ = world
    hostile = "b' OR '1'='1"
    with pytest.raises(QueryError, match="is not in the store"):
        db.query("mean_profile", model=hostile)
    rows = db.sql("SELECT count(*) AS n FROM runs WHERE model = $m", {"m": hostile})
    assert rows["n"][0].as_py() == 0


@pytest.mark.parametrize(("query", "params", "message"), [
    ("mean_profile", {"model": "a"}, "model 'a' (parameter model) is not in the store; "
     "models in the store: b, c, org/a"),
    ("layer_jsd", {"model_a": "b", "model_b": "B"}, "model 'B' (parameter model_b)"),
    ("mean_profile", {"run_id": "nope"}, "run 'nope' (parameter run_id) is not in the store; "
     "runs in the store: "),
    ("layer_jsd", {"model_a": "b", "run_a": "nope"}, "run 'nope' (parameter run_a)"),
    ("model_distances", {"runs": ["nope", "RUN"]}, "run 'nope' (parameter runs)"),
])
def test_a_model_or_run_the_store_lacks_is_an_error_listing_those_it_has(world, query,
                                                                         params, message):
    """Not an empty result, which reads as "nothing there" where the name is a typo."""
    db, data = world
    run = run_of(data, "b")
    params = {k: [run if r == "RUN" else r for r in v] if isinstance(v, list) else v
              for k, v in params.items()}
    with pytest.raises(QueryError, match=re.escape(message)) as raised:
        db.query(query, **params)
    if "runs in the store" in message:
        assert all(f"{r} ({m})" in str(raised.value) for m, r in data)


def test_models_and_runs_the_store_has_pass(world):
    db, data = world
    run = run_of(data, "b")
    assert db.query("mean_profile", model="b", run_id=run).num_rows > 0
    assert db.query("layer_jsd", model_a="b", run_a=run, model_b="org/a").num_rows > 0
    assert db.query("model_distances", runs=[run, run_of(data, "c")]).num_rows == 4


def test_every_named_query_declares_what_it_uses(world):
    """Each query runs with its required parameters only (DuckDB rejects unused ones)."""
    db, _ = world
    required = {"model": "b", "model_a": "b", "prompt_id": 0}
    for name, query in named_queries().items():
        assert query.description, name
        params = {p.name: required[p.name] for p in query.params if p.required}
        db.query(name, **params)
    for output, kind in (("numpy", dict), ("arrow", object)):
        assert isinstance(db.query("mean_profile", output=output), kind)


def test_an_empty_store_has_typed_empty_views(tmp_path):
    Store(tmp_path / "empty", create=True)
    with ProfileStore(tmp_path / "empty") as db:
        for name in ("mean_profile", "integrity", "model_distances"):
            assert db.query(name).num_rows == 0
        assert db.sql("SELECT * FROM entropy").column_names[:3] == ["model", "run_id",
                                                                   "prompt_id"]


def test_sql_distances_equal_the_python_distances(world):
    """The SQL and entropy_fast.distances share one definition of each distance."""
    distances = pytest.importorskip("entropy_fast.distances")
    db, data = world
    run = run_of(data, "b")
    p, q = data[("b", run)][3].at_alpha(1.0), data[("b", run)][7].at_alpha(1.0)
    jsd = db.query("layer_jsd", model_a="b", prompts_a=[3], prompts_b=[7], bin_width=0.5)
    np.testing.assert_allclose(jsd["jsd"].to_numpy(), distances.jsd_layer(p, q, bin_width=0.5),
                               rtol=1e-9, atol=1e-12)
    w1 = db.query("layer_wasserstein", model_a="b", prompts_a=[3], prompts_b=[7])
    np.testing.assert_allclose(w1["wasserstein"].to_numpy(), distances.wasserstein_layer(p, q),
                               rtol=1e-9)
