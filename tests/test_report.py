"""The HTML report: its numbers against sklearn and scipy written the obvious way on
features read back independently (codec), its distances those of compare (Python, CLI and
SQL) on the runs compare chooses, its page self-contained, its errors clear."""

from __future__ import annotations

import base64
import html
import json
import re

import numpy as np
import pytest
from scipy.stats import wasserstein_distance
from sklearn.dummy import DummyClassifier
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.neighbors import KNeighborsClassifier

from entropy_fast.cli import main
from entropy_fast.corpus import read_corpus
from entropy_fast.errors import ConfigError
from entropy_fast.report import DUMMY_DRAWS, write_report
from entropy_fast.store import Store
from entropy_fast.store.codec import read_profiles
from entropy_fast.store.compare import METRICS, compare_runs
from entropy_fast.store.errors import StoreError
from entropy_fast.store.sql import ProfileStore
from tests.test_compare import SQL_METRICS, cli_matrix
from tests.test_store import random_profile, run_info

N_PROMPTS = 40
SKIP = 2
LAYERS = {"deep": [0, 2, 4, 6, 8], "shallow": [0, 1, 2, 3]}


def _record(i: int) -> dict:
    return {"text": f"prompt {i}", "kind": ["poem", "code", "chat"][i % 3], "even": i % 2 == 0,
            "rare": "x" if i % 10 == 0 else "y"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two runs of different depths over a labelled corpus; entropies depend on the kind
    so that k-NN has something to find; some prompts have fewer rows than SKIP."""
    root = tmp_path_factory.mktemp("report")
    (root / "c.jsonl").write_text("\n".join(json.dumps(_record(i)) for i in range(N_PROMPTS)))
    corpus = read_corpus(root / "c.jsonl")
    store = Store(root / "s", create=True)
    rng = np.random.default_rng(0)
    for model, layers in LAYERS.items():
        with store.writer(run_info(model, corpus)) as writer:
            for p in corpus.prompts:
                n_rows = 1 if p.prompt_id % 13 == 5 else 3 + p.prompt_id % 4
                writer.add(p, random_profile(rng, n_rows, layers,
                                             scale=1.0 + p.prompt_id % 3))
    return store


def independent_features(store: Store, model: str) -> tuple[list[int], np.ndarray]:
    """Each prompt's per-layer mean over rows pos >= SKIP, alphas ascending, concatenated."""
    ids, rows = [], []
    for prompt_id, profile in sorted(read_profiles(store, model), key=lambda x: x[0]):
        if profile.n_tokens <= SKIP:
            continue
        ids.append(prompt_id)
        rows.append(np.concatenate([profile.entropies[a][SKIP:].double().mean(0).numpy()
                                    for a in sorted(profile.entropies)]))
    return ids, np.stack(rows)


@pytest.mark.parametrize(("field", "folds"), [("kind", 10), ("even", 10), ("rare", 4)])
def test_knn_and_roc_auc_equal_sklearns_cross_validation(store, tmp_path, field, folds):
    report = write_report(store.root, tmp_path / "r.html", group_by=field,
                          skip_positions=SKIP)
    by_label = {p.label: p for p in report.predictability}
    for model in LAYERS:
        ids, x = independent_features(store, model)
        value = [_record(i)[field] for i in ids]
        y = np.array([str(v).lower() if isinstance(v, bool) else v for v in value])
        cv = StratifiedKFold(folds, shuffle=True, random_state=0)
        scoring = ["accuracy", "roc_auc_ovr"]
        expected = {"knn": cross_validate(KNeighborsClassifier(n_neighbors=5), x, y, cv=cv,
                                          scoring=scoring)}
        draws = [cross_validate(DummyClassifier(strategy="stratified", random_state=r), x, y,
                                cv=cv, scoring=scoring) for r in range(DUMMY_DRAWS)]
        expected["dummy"] = {key: np.mean([d[key] for d in draws], axis=0)
                             for key in ("test_accuracy", "test_roc_auc_ovr")}
        got = by_label[model]
        assert got.n_prompts == len(ids) and got.folds == folds
        for name in ("knn", "dummy"):
            np.testing.assert_allclose(got.scores[f"{name}_accuracy"],
                                       expected[name]["test_accuracy"], rtol=0, atol=1e-12)
            np.testing.assert_allclose(got.scores[f"{name}_roc_auc"],
                                       expected[name]["test_roc_auc_ovr"], rtol=0, atol=1e-12)
        assert (got.note is None) == (folds == 10)
    if field == "kind":  # the entropies follow the kind: far above chance
        assert all(p.scores["knn_accuracy"].mean() > 0.8 for p in report.predictability)
    assert any(f"{N_PROMPTS - len(ids)} prompts have no rows at pos >= {SKIP}" in n
               for n in report.notes)
    table = report.html.read_text()
    knn = by_label["deep"].scores["knn_accuracy"]
    assert f"{knn.mean():.3f} ± {knn.std():.3f}" in table


def test_distances_match_layers_at_relative_depth(store, tmp_path):
    """Wasserstein entry = mean over the 4 paired depths of scipy's W1 between the pooled
    rows; the deep run's layers nearest to depths 0, 1/3, 2/3, 1 are columns 0, 1, 3, 4."""
    report = write_report(store.root, tmp_path / "r.html", skip_positions=SKIP)
    assert [d.label for d in report.runs] == ["deep", "shallow"]
    pooled = {}
    for model in LAYERS:
        profiles = [p for _, p in sorted(read_profiles(store, model, alpha=1.0),
                                         key=lambda x: x[0])]
        pooled[model] = np.concatenate([p.entropy[SKIP:].double().numpy() for p in profiles])
    columns = {"deep": [0, 1, 3, 4], "shallow": [0, 1, 2, 3]}
    expected = np.mean([wasserstein_distance(pooled["deep"][:, a], pooled["shallow"][:, b])
                        for a, b in zip(columns["deep"], columns["shallow"], strict=True)])
    matrix = report.distances["wasserstein"]
    np.testing.assert_allclose(matrix[0, 1], expected, rtol=1e-6)
    assert set(report.distances) == set(METRICS)
    for m in report.distances.values():
        assert m.shape == (2, 2) and m[0, 0] == 0 and m[0, 1] == m[1, 0] > 0


def _page_matrix(page: str, metric: str, labels: list[str]) -> dict[tuple[str, str], float]:
    """The distance table of one metric on the report page."""
    table = re.search(rf"<h3>{metric}</h3><table>(.*?)</table>", page).group(1)
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in table.split("<tr>")[2:]]
    assert [row[0] for row in rows] == labels
    return {(row[0], b): float(v) for row in rows for b, v in zip(labels, row[1:], strict=True)}


def test_distances_are_compares_in_python_the_cli_and_sql(store, tmp_path, capsys):
    """Every metric's table: compare_runs' matrix exactly, what `compare --metric M` prints
    and the model_distances query, on the same runs under the same labels."""
    report = write_report(store.root, tmp_path / "r.html", skip_positions=SKIP)
    labels = [d.label for d in report.runs]
    page = report.html.read_text()
    with ProfileStore(store.root) as db:
        for metric in METRICS:
            python = compare_runs(db, metric=metric, skip_positions=SKIP)
            assert python.labels == labels
            assert [r.run_id for r in python.runs] == [d.info.run_id for d in report.runs]
            np.testing.assert_array_equal(report.distances[metric], python.distances)
            if metric in SQL_METRICS:
                label_of = {r.run_id: r.label for r in python.runs}
                for row in db.query("model_distances", metric=metric,
                                    skip_positions=SKIP).to_pylist():
                    assert row["distance"] == pytest.approx(python.distance(
                        label_of[row["run_a"]], label_of[row["run_b"]]), rel=1e-9, abs=1e-12)
    for metric in METRICS:
        assert main(["compare", str(store.root), "--metric", metric, "--skip-positions",
                     str(SKIP), "--no-plot"]) == 0
        printed = cli_matrix(capsys.readouterr().out, labels)
        shown = _page_matrix(page, metric, labels)
        assert len(printed) == len(shown) == len(labels) ** 2
        for pair, value in printed.items():
            assert shown[pair] == pytest.approx(value, rel=1e-3, abs=1e-4)
            assert report.distances[metric][tuple(labels.index(x) for x in pair)] == \
                pytest.approx(value, abs=6e-5)


def test_the_page_is_self_contained_and_its_pngs_lie_beside_it(store, tmp_path):
    report = write_report(store.root, tmp_path / "out" / "report.html", group_by="kind")
    page = report.html.read_text()
    names = sorted(p.name for p in report.pngs)
    assert names == ["report-distances.png", "report-groups.png", "report-profiles.png"]
    sources = re.findall(r"""src=['"]([^'"]*)['"]""", page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"href=|<link|<script|url\(", page)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert embedded == {p.read_bytes() for p in report.pngs}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in report.pngs)
    for text in ("deep", "shallow", "Runs", "text", "alphas 2, 1, inf", str(N_PROMPTS)):
        assert text in page


def test_a_bad_group_by_field_is_an_error_listing_the_fields(store, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"'knd' is not a prompt metadata field.*fields in "
                                          r"the store: even, kind, rare"):
        write_report(store.root, tmp_path / "r.html", group_by="knd")
    assert not (tmp_path / "r.html").exists()
    code = main(["report", str(store.root), "-o", str(tmp_path / "r.html"), "--group-by",
                 "text"])
    err = capsys.readouterr().err
    assert code == 1 and "--group-by 'text'" in err and "even, kind, rare" in err


def test_report_from_the_cli_after_profiling_a_labelled_corpus(saved_models, tmp_path,
                                                                capsys):
    """The whole path: .jsonl fields kept by `profile`, grouped and predicted by `report`."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"{w} number {i}", "kind": w})
                                for i in range(6) for w in ("apple", "zebra")))
    for kind in ("llama", "gpt2"):
        assert main(["profile", saved_models[kind], "--prompts", str(corpus), "--out",
                     str(tmp_path / "s"), "--max-new-tokens", "0", "--no-plot",
                     "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "r" / "report.html"
    assert main(["report", str(tmp_path / "s"), "-o", str(out), "--group-by", "kind",
                 "--skip-positions", "1"]) == 0
    printed = capsys.readouterr()
    assert "k-NN accuracy" in printed.out and "6 folds, not 10" in printed.err + \
        out.read_text()
    assert out.exists() and len(list(out.parent.glob("report-*.png"))) == 3


@pytest.fixture
def two_modes(tmp_path):
    """One model profiled twice: the text itself, and 2 generated tokens per prompt."""
    from dataclasses import replace

    from entropy_fast.corpus import Corpus
    from entropy_fast.settings import SamplingSettings

    corpus = Corpus.from_texts([f"p{i}" for i in range(4)])
    store = Store(tmp_path / "s", create=True)
    rng = np.random.default_rng(1)
    text = run_info("m", corpus)
    generation = replace(text, run_id="", sampling=SamplingSettings(max_new_tokens=2))
    for info in (text, generation):
        with store.writer(info) as writer:
            for p in corpus.prompts:
                writer.add(p, random_profile(rng, 2, [0, 1, 2]))
    return store


def test_runs_made_differently_get_compares_labels_and_note(two_modes, tmp_path, capsys):
    report = write_report(two_modes.root, tmp_path / "r.html")
    with ProfileStore(two_modes.root) as db:
        compared = compare_runs(db)
    assert [d.label for d in report.runs] == compared.labels == [
        "m (mode=generation)", "m (mode=text)"]  # one model, two entries
    assert compared.note and "mode" in compared.note and compared.note in report.notes
    page = report.html.read_text()
    assert html.escape(compared.note) in page
    assert "<td>text</td>" in page and "<td>generation</td>" in page
    for command in ("compare", "report"):
        extra = ["--no-plot"] if command == "compare" else ["-o", str(tmp_path / "c.html")]
        assert main([command, str(two_modes.root), *extra]) == 0
        assert f"note: {compared.note}" in capsys.readouterr().err


def test_the_report_chooses_runs_as_compare_does(two_modes, tmp_path, capsys):
    """--mode, --runs (a prefix), --where narrow the report as they narrow compare; a
    selection no run matches is compare's error."""
    with ProfileStore(two_modes.root) as db:
        text_run = db.select(mode="text")[0].run_id
    by_mode = write_report(two_modes.root, tmp_path / "a.html", mode="text")
    by_prefix = write_report(two_modes.root, tmp_path / "b.html", runs=[text_run[:8]])
    assert [d.info.run_id for d in by_mode.runs] == [d.info.run_id for d in by_prefix.runs] \
        == [text_run]
    assert [d.label for d in by_mode.runs] == ["m"] and by_mode.notes == []
    assert main(["report", str(two_modes.root), "-o", str(tmp_path / "c.html"), "--where",
                 "max_new_tokens=2"]) == 0
    assert "(1 runs;" in capsys.readouterr().out
    with pytest.raises(StoreError, match="no run in the store matches"):
        write_report(two_modes.root, tmp_path / "d.html", alpha=3.0)
    assert main(["report", str(two_modes.root), "-o", str(tmp_path / "e.html"), "--models",
                 "nope"]) == 1
    assert "no run of model 'nope'" in capsys.readouterr().err
