"""The comparison report of a store: one self-contained HTML page and its PNGs.

`write_report(store, "report.html", group_by="kind")` (CLI: `entropy-fast report`) reports
on the runs a `RunSelection` chooses, the selection of `entropy-fast compare` (by default
the latest complete run of each model and settings), each run one entry under its
selection label, and writes:

- the runs table: label, run, model, mode, settings, prompts, tokens;
- every run's mean profile at relative depth (hidden-state index / last index): the mean
  over prompts of each prompt's mean over its rows, so every prompt weighs the same;
- distance heatmaps and tables between runs, one per metric of `distances.METRICS`: the
  `store.compare.compare_runs` matrices, the numbers `entropy-fast compare --metric M`
  prints and the `model_distances` query computes; with compare's note where the runs
  were made differently;
- with `group_by` (a prompt metadata field, `store.metadata`): per-group mean profiles,
  and how well profiles predict the field, the Entropy-Lens protocol (arXiv 2502.16570):
  features are each prompt's per-layer mean entropy, every alpha of the run concatenated
  (ascending alpha); k-NN accuracy and macro one-vs-rest ROC-AUC under stratified k-fold
  CV (10 folds, fewer with a note when a class has fewer members), against a stratified
  dummy classifier; mean ± std (ddof 0) over folds.

Rows with pos < skip_positions are left out of everything (a prompt left with no rows is
left out, and counted). The images are embedded as base64 PNG and also written beside
the HTML (`report-profiles.png`, ... for `report.html`).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from entropy_fast.errors import ConfigError
from entropy_fast.store.compare import METRICS, RunComparison, compare_runs
from entropy_fast.store.records import RunInfo
from entropy_fast.store.schema import PROMPTS_SCHEMA
from entropy_fast.store.selection import RunSelection, SelectedRun, run_mode

FOLDS = 10
NEIGHBORS = 5
SEED = 0
SCORES = ("knn_accuracy", "dummy_accuracy", "knn_roc_auc", "dummy_roc_auc")


@dataclass(frozen=True)
class RunProfiles:
    """One chosen run's per-prompt mean profiles.

    features: (n_prompts x n_alphas x n_layers) float64, mean entropy over each prompt's
    rows with pos >= skip_positions; alphas ascending, layers as `info.layer_indices`.
    """

    run: SelectedRun
    prompt_ids: np.ndarray
    alphas: tuple[float, ...]
    features: np.ndarray
    n_tokens: int
    n_dropped: int

    @property
    def info(self) -> RunInfo:
        return self.run.info

    @property
    def label(self) -> str:
        return self.run.label


@dataclass(frozen=True)
class Predictability:
    """How well one run's profiles predict a label, per CV fold (see the module).

    scores: {name: (folds,) float64} for each of SCORES.
    """

    label: str
    n_prompts: int
    classes: tuple[str, ...]
    folds: int
    scores: dict[str, np.ndarray]
    note: str | None = None


@dataclass(frozen=True)
class Report:
    """What `write_report` wrote and computed: comparisons[metric] is compare_runs' result
    for each metric of METRICS, its runs in the order of `runs`."""

    html: Path
    pngs: list[Path]
    runs: list[RunProfiles]
    comparisons: dict[str, RunComparison]
    predictability: list[Predictability]
    notes: list[str]

    @property
    def distances(self) -> dict[str, np.ndarray]:
        """{metric: (runs x runs) distances}, rows and columns in the order of `runs`."""
        return {metric: c.distances for metric, c in self.comparisons.items()}


def write_report(store: Any, path: str | Path, selection: RunSelection | None = None, *,
                 group_by: str | None = None, skip_positions: int = 0,
                 bin_width: float = 0.25, neighbors: int = NEIGHBORS, folds: int = FOLDS,
                 **criteria: Any) -> Report:
    """Write the HTML report of the runs of `store` (a path or ProfileStore) that
    `selection` (or its fields as keywords: models, runs, mode, alpha, where, latest)
    chooses, as `store.compare.compare_runs` does.

    Args:
        group_by: a prompt metadata field: per-group profiles and predictability.
        skip_positions: leave out each prompt's rows with pos < N.
        bin_width: jsd's histogram bin width in nats (as compare's).
        neighbors, folds: k of the k-NN and the number of CV folds.
    The profiles and distances are at the selection's alpha (default 1.0, as compare's);
    predictability uses every alpha of a run.

    Raises:
        ConfigError: a bad option, or a group_by field the store's prompts lack (the
            message lists those they have).
        StoreError: no run matches the selection (see RunSelection.select).
    """
    from entropy_fast.store.sql import ProfileStore

    for name, value, minimum in (("neighbors", neighbors, 1), ("folds", folds, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}",
                              param=name)
    selection = RunSelection.of(selection, criteria)
    options = (group_by, skip_positions, bin_width, neighbors, folds)
    if isinstance(store, ProfileStore):
        return _write(store, Path(path), selection, *options)
    with ProfileStore(store) as db:
        return _write(db, Path(path), selection, *options)


def _write(db: Any, path: Path, selection: RunSelection, group_by: str | None, skip: int,
           bin_width: float, neighbors: int, folds: int) -> Report:
    if group_by is not None:
        check_group_field(db, group_by)
    comparisons = {metric: compare_runs(db, selection, metric=metric, bin_width=bin_width,
                                        skip_positions=skip) for metric in METRICS}
    first = comparisons[METRICS[0]]
    data = [run_profiles(db, run, skip) for run in first.runs]
    notes = [*filter(None, [first.note]),
             *[f"{d.label}: {d.n_dropped} prompts have no rows at pos >= {skip} and are "
               "left out" for d in data if d.n_dropped]]
    predictions: list[Predictability] = []
    figures = {"profiles": _profiles_figure(data, first.alpha),
               "distances": _distances_figure(comparisons)}
    if group_by is not None:
        groups = {d.info.run_id: prompt_labels(db, d.info.run_id, group_by) for d in data}
        figures["groups"] = _groups_figure(data, groups, first.alpha, group_by)
        predictions = [_predict_run(d, groups[d.info.run_id], neighbors, folds) for d in data]
    pngs = _save_figures(figures, path)
    page = _page(db, data, comparisons, predictions, pngs, notes, group_by, bin_width,
                 neighbors)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return Report(path, list(pngs.values()), data, comparisons, predictions, notes)


# -- what the store holds ----------------------------------------------------------------


def metadata_fields(db: Any) -> list[str]:
    """The prompt metadata fields that are columns of the store's `prompts` view."""
    stored = {"model", "run_id", *PROMPTS_SCHEMA.names}
    return [c for c in db.sql("SELECT * FROM prompts LIMIT 0").column_names
            if c not in stored]


def check_group_field(db: Any, field: str) -> None:
    """ConfigError unless `field` is a prompt metadata field of the store, listing them."""
    fields = metadata_fields(db)
    if field in fields:
        return
    hint = (f"prompt metadata fields in the store: {', '.join(fields)}" if fields else
            "the store's prompts hold no metadata: profile a .jsonl corpus with fields "
            "beside the text (or a .parquet one with other columns)")
    raise ConfigError(f"group_by {field!r} is not a prompt metadata field of "
                      f"{db.store.root}", hint, param="group_by")


def run_profiles(db: Any, run: SelectedRun, skip: int) -> RunProfiles:
    """Per-prompt mean profiles of one run, rows with pos < skip left out (DuckDB: the
    prompt ids come back with the features, for the groups of `prompt_labels`)."""
    info = run.info
    table = db.sql("SELECT prompt_id, alpha, layer, avg(entropy) AS mean, count(*) AS n "
                   "FROM entropy WHERE run_id = $run AND pos >= $skip GROUP BY ALL "
                   "ORDER BY prompt_id, alpha, layer", {"run": info.run_id, "skip": skip},
                   output="numpy")
    prompt_ids, alphas = np.unique(table["prompt_id"]), np.unique(table["alpha"])
    features = np.asarray(table["mean"], dtype=np.float64).reshape(
        len(prompt_ids), len(alphas), len(info.layer_indices))
    n_tokens = int(np.asarray(table["n"])[::len(alphas) * len(info.layer_indices)].sum())
    n_stored = db.sql("SELECT count(*) AS n FROM prompts WHERE run_id = $run",
                      {"run": info.run_id}).to_pylist()[0]["n"]
    return RunProfiles(run, prompt_ids.astype(np.int64), tuple(float(a) for a in alphas),
                       features, n_tokens, n_stored - len(prompt_ids))


def prompt_labels(db: Any, run_id: str, field: str) -> dict[int, str]:
    """prompt_id -> the field's value as text, for the run's prompts that have one."""
    column = '"' + field.replace('"', '""') + '"'
    rows = db.sql(f"SELECT prompt_id, CAST({column} AS VARCHAR) AS label FROM prompts "
                  "WHERE run_id = $run", {"run": run_id}).to_pylist()
    return {r["prompt_id"]: r["label"] for r in rows if r["label"] is not None}


# -- predictability ----------------------------------------------------------------------


def predictability(features: np.ndarray, labels: Sequence[str], *, label: str = "",
                   neighbors: int = NEIGHBORS, folds: int = FOLDS, seed: int = SEED
                   ) -> Predictability:
    """k-NN and a stratified dummy under stratified CV on (n x d) features (see module).

    Fewer folds than `folds` when the smallest class has fewer members (with a note); no
    scores (folds 0, a note) with one class or a class of one member.
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels, dtype=object).astype(str)
    classes, counts = np.unique(y, return_counts=True)
    n_splits = min(folds, int(counts.min())) if len(classes) else 0
    if len(classes) < 2 or n_splits < 2:
        why = ("one class only" if len(classes) < 2 else
               f"class {classes[counts.argmin()]!r} has a single prompt")
        return Predictability(label, len(y), tuple(classes), 0, {}, f"no CV: {why}")
    note = None if n_splits == folds else (
        f"{n_splits} folds, not {folds}: class {classes[counts.argmin()]!r} has only "
        f"{counts.min()} prompts")
    splits = StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(features, y)
    per_fold = [_fold_scores(features, y, train, test, neighbors, seed)
                for train, test in splits]
    scores = {name: np.array([fold[name] for fold in per_fold]) for name in SCORES}
    return Predictability(label, len(y), tuple(classes), n_splits, scores, note)


DUMMY_DRAWS = 20
"""Draws of the stratified dummy averaged per fold."""


def _fold_scores(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                 neighbors: int, seed: int) -> dict[str, float]:
    from sklearn.dummy import DummyClassifier
    from sklearn.metrics import accuracy_score
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(min(neighbors, len(train))).fit(x[train], y[train])
    scores = {"knn_accuracy": float(accuracy_score(y[test], knn.predict(x[test]))),
              "knn_roc_auc": macro_roc_auc(y[test], knn.predict_proba(x[test]), knn.classes_)}
    # The stratified dummy is random: one draw per fold would make its spread that of a
    # single seed (0 +- 0 on balanced folds), so each fold averages DUMMY_DRAWS of them.
    dummies = [DummyClassifier(strategy="stratified", random_state=seed * DUMMY_DRAWS + draw)
               .fit(x[train], y[train]) for draw in range(DUMMY_DRAWS)]
    scores["dummy_accuracy"] = float(np.mean([accuracy_score(y[test], d.predict(x[test]))
                                              for d in dummies]))
    scores["dummy_roc_auc"] = float(np.mean([macro_roc_auc(y[test], d.predict_proba(x[test]),
                                                           d.classes_) for d in dummies]))
    return scores


def macro_roc_auc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """ROC-AUC of class probabilities: of the second class for two classes, else the
    unweighted mean of one-vs-rest AUCs."""
    from sklearn.metrics import roc_auc_score

    if len(classes) == 2:
        return float(roc_auc_score(y == classes[1], proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes))


def _predict_run(data: RunProfiles, labels: dict[int, str], neighbors: int, folds: int
                 ) -> Predictability:
    """`predictability` of one run's prompts that have a label, every alpha concatenated."""
    keep = np.array([int(p) in labels for p in data.prompt_ids], dtype=bool)
    features = data.features[keep].reshape(int(keep.sum()), -1)
    return predictability(features, [labels[int(p)] for p in data.prompt_ids[keep]],
                          label=data.label, neighbors=neighbors, folds=folds)


# -- figures ------------------------------------------------------------------------------


def _profiles_figure(data: Sequence[RunProfiles], alpha: float) -> Any:
    from entropy_fast.viz import plot_mean_curves

    curves = {d.label: _curve(d, np.ones(len(d.prompt_ids), dtype=bool), alpha) for d in data}
    figure = plot_mean_curves(curves, title=f"mean profile (alpha={alpha:g}), ± 1 std over "
                              "prompts", unit=_unit(data), relative=True)
    figure.set_size_inches(8, 5)
    return figure


def _curve(data: RunProfiles, keep: np.ndarray, alpha: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(layers, mean, std) over the kept prompts at `alpha`, as plot_mean_curves takes."""
    rows = data.features[keep, data.alphas.index(alpha), :]
    return np.asarray(data.info.layer_indices), rows.mean(axis=0), rows.std(axis=0)


def _unit(data: Sequence[RunProfiles]) -> str:
    units = {d.info.lens.unit for d in data}
    return units.pop() if len(units) == 1 else "mixed units"


def _distances_figure(comparisons: dict[str, RunComparison]) -> Any:
    import matplotlib.pyplot as plt

    from entropy_fast.viz import plot_distance_matrix

    size = 2.5 + 0.45 * len(comparisons[METRICS[0]].labels)
    figure, axes = plt.subplots(1, len(comparisons), figsize=(size * len(comparisons),
                                                              size + 1), squeeze=False)
    for ax, (metric, comparison) in zip(axes[0], comparisons.items(), strict=True):
        plot_distance_matrix(comparison.distances, comparison.labels, metric, ax=ax)
    return figure


def _groups_figure(data: Sequence[RunProfiles], groups: dict[str, dict[int, str]],
                   alpha: float, field: str) -> Any:
    import matplotlib.pyplot as plt

    from entropy_fast.viz import plot_mean_curves

    figure, axes = plt.subplots(1, max(len(data), 1), figsize=(5.5 * max(len(data), 1), 4.5),
                                squeeze=False)
    for ax, d in zip(axes[0], data, strict=False):
        labels = groups[d.info.run_id]
        values = np.array([labels.get(int(p)) for p in d.prompt_ids], dtype=object)
        curves = {f"{field}={v}": _curve(d, values == v, alpha)
                  for v in sorted({v for v in values if v is not None})}
        plot_mean_curves(curves, ax=ax, title=d.label, unit=d.info.lens.unit, relative=True)
    return figure


def _save_figures(figures: dict[str, Any], path: Path) -> dict[str, Path]:
    from entropy_fast.viz import save_figure

    return {name: save_figure(figure, path.with_name(f"{path.stem}-{name}.png"))
            for name, figure in figures.items()}


# -- the page -----------------------------------------------------------------------------


_STYLE = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
          "padding:.25em .6em;text-align:left;font-size:.9em}th{background:#eee}"
          "img{max-width:100%}.note{color:#a50}")


def _page(db: Any, data: Sequence[RunProfiles], comparisons: dict[str, RunComparison],
          predictions: Sequence[Predictability], pngs: dict[str, Path], notes: Sequence[str],
          group_by: str | None, bin_width: float, neighbors: int) -> str:
    e = html.escape
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    first = comparisons[METRICS[0]]
    skip, alpha = first.skip_positions, first.alpha
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>entropy-fast "
             f"report</title><style>{_STYLE}</style></head><body>",
             f"<h1>entropy-fast report</h1><p>store <code>{e(str(db.store.root))}</code>, "
             f"{when}; rows with pos &lt; {skip} left out; profiles and distances at "
             f"alpha={alpha:g}.</p>",
             *[f"<p class='note'>{e(n)}</p>" for n in notes],
             "<h2>Runs</h2>", _table(["label", "run", "model", "mode", "settings", "prompts",
                                      f"tokens (pos ≥ {skip})" if skip else "tokens"],
                                     [_run_row(d) for d in data]),
             "<h2>Mean profiles at relative depth</h2>", _image(pngs["profiles"]),
             "<h2>Distances between runs</h2><p>The numbers of <code>entropy-fast compare "
             f"--metric M</code> on these runs (bin width {bin_width:g} nats): each run's "
             "rows of every prompt pooled, each pair at the layers paired by relative depth "
             "(distances.match_layers); definitions in docs/distances.md.</p>",
             _image(pngs["distances"]),
             *[_matrix(metric, c.distances, c.labels) for metric, c in comparisons.items()]]
    if group_by is not None:
        parts += [f"<h2>Profiles by {e(group_by)}</h2>", _image(pngs["groups"]),
                  f"<h2>Predicting {e(group_by)} from profiles</h2>",
                  f"<p>Features: each prompt's per-layer mean entropy, every alpha of the run "
                  f"concatenated. {neighbors}-NN and a stratified dummy classifier, "
                  "stratified k-fold cross-validation (shuffled, seed 0); mean ± std over "
                  "folds. ROC-AUC: macro one-vs-rest.</p>", _predictions(predictions)]
    return "\n".join([*parts, "</body></html>"])


def _run_row(d: RunProfiles) -> list[str]:
    info = d.info
    lens, sampling = info.lens, info.sampling
    settings = [f"alphas {', '.join(f'{a:g}' for a in lens.alphas)}",
                f"{len(info.layer_indices)} layers (stride {lens.layer_stride})",
                f"dtype {info.dtype}"]
    if sampling.generating:
        settings.append(f"{sampling.max_new_tokens} new tokens, " + (
            f"sampled (T={sampling.temperature:g}, top_p={sampling.top_p:g}, seed "
            f"{sampling.seed})" if sampling.do_sample else "greedy") + f", {info.generator}")
    if sampling.chat_template:
        settings.append("chat template")
    if info.quantization:
        settings.append(info.quantization)
    return [d.label, info.run_id, info.model, run_mode(info), "; ".join(settings),
            str(len(d.prompt_ids)), str(d.n_tokens)]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _matrix(metric: str, matrix: np.ndarray, labels: Sequence[str]) -> str:
    rows = [[a, *(f"{v:.4g}" for v in row)] for a, row in zip(labels, matrix, strict=True)]
    return f"<h3>{html.escape(metric)}</h3>" + _table(["", *labels], rows)


def _predictions(predictions: Sequence[Predictability]) -> str:
    header = ["run", "prompts", "classes", "folds", "k-NN accuracy", "dummy accuracy",
              "k-NN ROC-AUC", "dummy ROC-AUC", "note"]
    rows = [[p.label, str(p.n_prompts), str(len(p.classes)), str(p.folds),
             *(_spread(p.scores.get(name)) for name in SCORES), p.note or ""]
            for p in predictions]
    return _table(header, rows)


def _spread(scores: np.ndarray | None) -> str:
    return "—" if scores is None else f"{scores.mean():.3f} ± {scores.std():.3f}"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(path.name)}' src='data:image/png;base64,{data}'>"


__all__ = ["Predictability", "Report", "RunProfiles", "metadata_fields", "predictability",
           "write_report"]
