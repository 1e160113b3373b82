"""Comparing runs: selection by what runs are, labels, and one metric family in the CLI, the
Python API and SQL, each against scipy / numpy on the store's rows read with DuckDB."""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from entropy_fast.cli import main
from entropy_fast.corpus import Corpus
from entropy_fast.store import Store, StoreError
from entropy_fast.store.compare import compare_runs
from entropy_fast.store.selection import RunSelection
from entropy_fast.store.sql import ProfileStore, QueryError
from tests.cli_runner import run_cli
from tests.test_store import fill, random_profile, run_info

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time there",
           "1, 2, 3, 4,", "Why is the sky blue?", "xy"]
SQL_METRICS = ("jsd", "wasserstein", "fisher_rao")


@pytest.fixture(scope="module")
def store(saved_models, tmp_path_factory) -> str:
    """Tiny Llama in text and generation mode, tiny GPT-2 in text mode with layer stride 2
    (fewer layers: compared at relative depth), under --name labels."""
    root = tmp_path_factory.mktemp("compare")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    path = str(root / "store")
    common = ["--prompts", str(root / "prompts.txt"), "--out", path, "--no-plot",
              "--no-progress"]
    for argv in ([saved_models["llama"], "--name", "llama", "--max-new-tokens", "0"],
                 [saved_models["llama"], "--name", "llama", "--max-new-tokens", "3"],
                 [saved_models["gpt2"], "--name", "gpt2", "--max-new-tokens", "0",
                  "--layer-stride", "2"]):
        assert main(["profile", *argv, *common]) == 0
    return path


def test_default_selection_keeps_runs_of_one_model_apart_and_labels_them(store):
    with ProfileStore(store) as db:
        runs = db.select()
    assert [r.label for r in runs] == ["gpt2", "llama (mode=generation)", "llama (mode=text)"]
    assert all(r.complete for r in runs)
    with ProfileStore(store) as db:
        assert [r.label for r in db.select(mode="text")] == ["gpt2", "llama"]
        assert [r.label for r in db.select(where=["layer_stride=2"])] == ["gpt2"]
        assert [r.label for r in db.select(models=["llama"], where={"max_new_tokens": 3})] \
            == ["llama"]


def cli_matrix(out: str, labels: list[str]) -> dict[tuple[str, str], float]:
    """The distance table `compare` prints: rows 'LABEL v1 v2 ...', one per entry."""
    matrix = {}
    for line in out.splitlines():
        for label in labels:
            if line.strip().startswith(label + " "):
                values = line.strip()[len(label):].split()
                if len(values) == len(labels):
                    matrix.update({(label, b): float(v)
                                   for b, v in zip(labels, values, strict=True)})
    return matrix


def entropies(db: ProfileStore, run_id: str, layer: int, skip: int = 0) -> np.ndarray:
    """Every token's entropy of a run at one layer (alpha 1), straight from the rows."""
    return db.sql("SELECT entropy FROM entropy WHERE run_id = $r AND layer = $l "
                  "AND alpha = 1 AND pos >= $s", {"r": run_id, "l": layer, "s": skip},
                  output="numpy")["entropy"].astype(np.float64)


def paired_layers(a: list[int], b: list[int], a_id: str, b_id: str) -> list[tuple[int, int]]:
    """(layer of a, layer of b) at the nearest relative depth, exact fractions; the run
    with fewer layers (ties: the smaller id) keeps its layers; ties: the shallower."""
    swap = (len(b), b_id) < (len(a), a_id)
    short, long = (b, a) if swap else (a, b)
    pairs = [(s, min(long, key=lambda x: (abs(Fraction(s, short[-1])
                                              - Fraction(x, long[-1])), x))) for s in short]
    return [(y, x) for x, y in pairs] if swap else pairs


def reference(db: ProfileStore, a, b, metric: str, skip: int = 0, width: float = 0.25) -> float:
    """scipy / numpy on the pooled tokens of runs a and b at their paired layers."""
    pairs = paired_layers(a.info.layer_indices, b.info.layer_indices, a.run_id, b.run_id)
    columns = [(entropies(db, a.run_id, la, skip), entropies(db, b.run_id, lb, skip))
               for la, lb in pairs]
    if metric == "wasserstein":
        return float(np.mean([wasserstein_distance(x, y) for x, y in columns]))
    if metric == "jsd":
        gaps = []
        for x, y in columns:
            edges = np.arange(np.floor(min(x.min(), y.min()) / width),
                              np.floor(max(x.max(), y.max()) / width) + 2) * width
            gaps.append(jensenshannon(np.histogram(x, edges)[0],
                                      np.histogram(y, edges)[0]) ** 2)
        return float(np.mean(gaps))
    m1, m2 = (np.array([c[k].mean() for c in columns]) for k in (0, 1))
    return float(2 * np.arccos(min(np.sum(np.sqrt(m1 / m1.sum() * m2 / m2.sum())), 1.0)))


@pytest.mark.parametrize("skip", [0, 1])
@pytest.mark.parametrize("metric", ["jsd", "wasserstein", "fisher_rao", "srvf"])
def test_cli_python_and_sql_give_the_same_distances(store, metric, skip, capsys):
    with ProfileStore(store) as db:
        result = compare_runs(db, metric=metric, skip_positions=skip)
        sql = db.query("model_distances", metric=metric, skip_positions=skip).to_pylist() \
            if metric in SQL_METRICS else []
        references = {(a.label, b.label): reference(db, a, b, metric, skip)
                      for a in result.runs for b in result.runs
                      if a.run_id != b.run_id and metric in SQL_METRICS}
    labels = result.labels
    code, out, err = run_cli(capsys, "compare", store, "--metric", metric, "--skip-positions",
                             str(skip), "--no-plot")
    assert code == 0, err
    printed = cli_matrix(out, labels)
    assert len(printed) == len(labels) ** 2
    np.testing.assert_array_equal(result.distances, result.distances.T)
    label_of = {r.run_id: r.label for r in result.runs}
    by_sql = {(label_of[r["run_a"]], label_of[r["run_b"]]): r["distance"] for r in sql}
    for a in labels:
        for b in labels:
            python = result.distance(a, b)
            assert printed[a, b] == pytest.approx(python, abs=6e-5)
            if metric in SQL_METRICS:
                assert by_sql[a, b] == pytest.approx(python, rel=1e-9, abs=1e-12)
            if a != b and metric in SQL_METRICS:
                assert python == pytest.approx(references[a, b], rel=1e-9)
            if a != b:
                assert python > 0
    assert len(by_sql) == (len(labels) ** 2 if metric in SQL_METRICS else 0)


def test_one_metric_family():
    from entropy_fast import distances
    from entropy_fast.store import compare

    assert compare.METRICS == distances.METRICS


def test_model_distances_never_pools_modes(store):
    with ProfileStore(store) as db:
        every = db.query("model_distances").to_pylist()
        text = db.query("model_distances", mode="text").to_pylist()
        runs = {r.run_id for r in db.select(mode="text")}
    assert len(every) == 9 and {r["run_a"] for r in text} == runs and len(text) == 4
    with ProfileStore(store) as db, pytest.raises(QueryError, match="srvf: entropy-fast "
                                                                    "compare --metric srvf"):
        db.query("model_distances", metric="srvf")


def test_profiles_and_aggregated_skip_positions_and_select_prompts(store):
    with ProfileStore(store) as db:
        whole = db.profiles(mode="text", models=["llama"])["llama"]
        skipped = db.profiles(mode="text", models=["llama"], skip_positions=1)["llama"]
        some = db.aggregated(mode="text", models=["llama"], prompt_ids=[1, 3])["llama"]
        rows = db.sql("SELECT prompt_id, count(*) AS n FROM entropy WHERE model = 'llama' "
                      "AND alpha = 1 AND layer = 0 AND run_id IN (SELECT run_id FROM runs "
                      "WHERE max_new_tokens = 0) GROUP BY ALL ORDER BY prompt_id").to_pylist()
    assert [p.n_tokens for p in whole] == [r["n"] for r in rows]
    assert len(whole) == len(PROMPTS) and len(skipped) == len(PROMPTS) - 1  # "xy": 1 row
    kept = [p for p in whole if p.n_tokens > 1]
    for full, cut in zip(kept, skipped, strict=True):
        np.testing.assert_array_equal(cut.entropy.numpy(), full.entropy.numpy()[1:])
        assert cut.token_ids.tolist() == full.token_ids.tolist()[1:]
    assert [p.metadata["prompt"] for p in some] == [PROMPTS[1], PROMPTS[3]]


def test_compare_plot_and_labels_in_the_output(store, tmp_path, capsys):
    code, out, err = run_cli(capsys, "compare", store, "--models", "llama", "--plot",
                             str(tmp_path / "c.png"))
    assert code == 0, err
    assert "llama (mode=text)=" in out and "gpt2" not in out
    assert "note: these entries differ in mode" in err
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


# -- selection on records ---------------------------------------------------------------


def records(tmp_path) -> Store:
    """A store of synthetic runs: model m with alphas (1,) and (1, 2), twice over two
    corpora with the same settings, and an unfinished run of model n."""
    store = Store(tmp_path / "s", create=True)
    rng = np.random.default_rng(0)
    for k, (model, alphas, corpus_name, ident) in enumerate([
            ("m", (1.0,), "c1", "abc100"), ("m", (1.0, 2.0), "c1", "abc200"),
            ("m", (1.0,), "c2", "abd300"), ("n", (1.0,), "c1", "ff0000")]):
        corpus = Corpus.from_texts([f"{corpus_name} {i}" for i in range(3)])
        info = run_info(model, corpus, alphas=alphas, run_id=ident,
                        updated_at=f"2026-01-0{k + 1}")
        profiles = {p.prompt_id: random_profile(rng, 3, [0, 1, 2], alphas=alphas)
                    for p in corpus.prompts}
        if model == "n":
            store.writer(info).close("stopped")
        else:
            fill(store, info, corpus, profiles)
    return store


def test_latest_run_per_model_and_settings_and_labels(tmp_path):
    runs = records(tmp_path).runs()
    chosen = RunSelection().select(runs)
    assert [(r.run_id, r.label) for r in chosen] == [("abd300", "m (alphas=1)"),
                                                     ("abc200", "m (alphas=1,2)")]
    every = RunSelection(latest=False, alpha=2.0).select(runs)
    assert [r.run_id for r in every] == ["abc200"]
    both = RunSelection(runs=["abc1", "abd"]).select(runs)
    assert [(r.run_id, r.label) for r in both] == [("abc100", "m (run=abc100)"),
                                                   ("abd300", "m (run=abd300)")]
    unfinished = RunSelection(runs=["ff"]).select(runs)
    assert unfinished[0].label == "n" and not unfinished[0].complete


@pytest.mark.parametrize(("selection", "message"), [
    (dict(runs=["ab"]), "run prefix 'ab' is ambiguous: it matches abc100 (m, text), "
                        "abc200 (m, text), abd300 (m, text)"),
    (dict(runs=["zz"]), "no run 'zz' in the store"),
    (dict(models=["nope"]), "no run of model 'nope' in the store; models in the store: m, n"),
    (dict(where=["colour=red"]), "no run setting 'colour' to filter on"),
    (dict(where=["dtype"]), "a settings filter is SETTING=VALUE"),
    (dict(mode="generation"), "no run in the store matches mode="),
    (dict(models=["n"]), "no complete run matches"),
    (dict(runs=["abc1"], alpha=2.0), "runs abc100 do not match alpha=2.0"),
])
def test_selection_errors_name_the_fix(tmp_path, selection, message):
    runs = records(tmp_path).runs()
    with pytest.raises(StoreError, match=re.escape(message)):
        RunSelection(**selection).select(runs)
