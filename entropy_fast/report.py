"""The comparison report of a store: one self-contained HTML page and its PNGs.

`write_report(store, "report.html", group_by="kind")` (CLI: `entropy-fast report`) reads
the complete runs of a store through its DuckDB views and writes:

- the runs table: label, run, model, mode, settings, prompts, tokens;
- every run's mean profile at relative depth (hidden-state index / last index): the mean
  over prompts of each prompt's mean over its rows, so every prompt weighs the same;
- distance heatmaps between runs, one per metric of `distances.METRICS`, computed by
  `distances.pairwise_distances` on each run's pooled rows (every prompt) taken at K
  matched relative depths (K = the fewest layers among the runs; each depth takes the
  run's nearest layer), so runs of models of different depths compare;
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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from entropy_fast.errors import ConfigError
from entropy_fast.store.records import RunInfo
from entropy_fast.store.schema import PROMPTS_SCHEMA

FOLDS = 10
NEIGHBORS = 5
SEED = 0
SCORES = ("knn_accuracy", "dummy_accuracy", "knn_roc_auc", "dummy_roc_auc")


@dataclass(frozen=True)
class RunProfiles:
    """One run's per-prompt mean profiles.

    features: (n_prompts x n_alphas x n_layers) float64, mean entropy over each prompt's
    rows with pos >= skip_positions; alphas ascending, layers as `info.layer_indices`.
    """

    info: RunInfo
    label: str
    prompt_ids: np.ndarray
    alphas: tuple[float, ...]
    features: np.ndarray
    n_tokens: int
    n_dropped: int

    @property
    def depth(self) -> np.ndarray:
        """Relative depth of each layer: hidden-state index / the last one."""
        layers = np.asarray(self.info.layer_indices, dtype=np.float64)
        return layers / layers[-1]


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
    """What `write_report` wrote and computed: distances[metric] is (runs x runs), rows
    and columns in the order of `runs`."""

    html: Path
    pngs: list[Path]
    runs: list[RunProfiles]
    distances: dict[str, np.ndarray]
    predictability: list[Predictability]
    notes: list[str]


def write_report(store: Any, path: str | Path, *, group_by: str | None = None,
                 skip_positions: int = 0, alpha: float = 1.0,
                 runs: Sequence[str] | None = None, neighbors: int = NEIGHBORS,
                 folds: int = FOLDS) -> Report:
    """Write the HTML report of the complete runs of `store` (a path or ProfileStore).

    Args:
        group_by: a prompt metadata field: per-group profiles and predictability.
        skip_positions: leave out each prompt's rows with pos < N.
        alpha: the Rényi order of the profiles and distances (runs without it are left
            out of them); predictability uses every alpha of a run.
        runs: run ids or unique id prefixes (default: every complete run).
        neighbors, folds: k of the k-NN and the number of CV folds.

    Raises:
        ConfigError: a bad option, or a group_by field the store's prompts lack (the
            message lists those they have).
    """
    from entropy_fast.store.sql import ProfileStore

    for name, value, minimum in (("skip_positions", skip_positions, 0),
                                 ("neighbors", neighbors, 1), ("folds", folds, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}",
                              param=name)
    if isinstance(store, ProfileStore):
        return _write(store, Path(path), group_by, skip_positions, float(alpha), runs,
                      neighbors, folds)
    with ProfileStore(store) as db:
        return _write(db, Path(path), group_by, skip_positions, float(alpha), runs,
                      neighbors, folds)


def _write(db: Any, path: Path, group_by: str | None, skip: int, alpha: float,
           runs: Sequence[str] | None, neighbors: int, folds: int) -> Report:
    if group_by is not None:
        check_group_field(db, group_by)
    infos = select_runs(db, runs)
    labels = run_labels(infos)
    data = [run_profiles(db, info, labels[info.run_id], skip) for info in infos]
    notes = [*_comparability(infos),
             *[f"{d.label}: {d.n_dropped} prompts have no rows at pos >= {skip} and are "
               "left out" for d in data if d.n_dropped]]
    shown = [d for d in data if alpha in d.alphas]
    notes += [f"{d.label} has no alpha={alpha:g}: left out of profiles and distances"
              for d in data if alpha not in d.alphas]
    distances = run_distances(db, [d.info for d in shown], alpha, skip) if shown else {}
    predictions: list[Predictability] = []
    figures = {"profiles": _profiles_figure(shown, alpha),
               "distances": _distances_figure(distances, [d.label for d in shown])}
    if group_by is not None:
        groups = {d.info.run_id: prompt_labels(db, d.info.run_id, group_by) for d in data}
        figures["groups"] = _groups_figure(shown, groups, alpha, group_by)
        predictions = [_predict_run(d, groups[d.info.run_id], neighbors, folds) for d in data]
    pngs = _save_figures(figures, path)
    page = _page(db, data, shown, distances, predictions, pngs, notes, group_by, skip, alpha,
                 neighbors)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return Report(path, list(pngs.values()), data, distances, predictions, notes)


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


def select_runs(db: Any, runs: Sequence[str] | None) -> list[RunInfo]:
    """The complete runs (every shard complete), or those `runs` names by id or unique
    id prefix; one record per run, ordered by model and creation."""
    shards: dict[str, list[RunInfo]] = {}
    for record in db.store.runs():
        shards.setdefault(record.run_id, []).append(record)
    complete = {run: records[0] for run, records in shards.items()
                if len(records) == records[0].n_shards
                and all(r.status == "complete" for r in records)}
    if runs:
        chosen = [complete[_resolve(run, shards, complete)] for run in runs]
    else:
        chosen = list(complete.values())
    if not chosen:
        raise ConfigError(f"{db.store.root} has no complete run to report on",
                          "finish a run (the same profile command resumes it)")
    return sorted(chosen, key=lambda r: (r.model, r.created_at, r.run_id))


def _resolve(prefix: str, shards: dict[str, list[RunInfo]], complete: dict[str, RunInfo]
             ) -> str:
    matches = [run for run in shards if run.startswith(prefix)]
    if len(matches) != 1:
        what = "no run" if not matches else f"{len(matches)} runs ({', '.join(matches)})"
        raise ConfigError(f"{what} in the store match {prefix!r}",
                          f"runs: {', '.join(sorted(shards)) or 'none'}", param="runs")
    if matches[0] not in complete:
        raise ConfigError(f"run {matches[0]} is not complete",
                          "finish it (the same profile command resumes it)", param="runs")
    return matches[0]


def _comparability(infos: Sequence[RunInfo]) -> list[str]:
    """Notes for the reader where the runs were made differently (mode, sampling, dtype:
    their distances then mix two effects) or profiled different corpora."""
    from entropy_fast.store.compare import check_comparable
    from entropy_fast.store.errors import StoreError

    try:
        note = check_comparable(list(infos))
    except StoreError as err:
        return [err.message]
    return [note] if note else []


def run_labels(infos: Sequence[RunInfo]) -> dict[str, str]:
    """The model's label, with the run id's first 8 digits where a model has several."""
    counts = Counter(r.model for r in infos)
    return {r.run_id: r.model if counts[r.model] == 1 else f"{r.model} [{r.run_id[:8]}]"
            for r in infos}


def run_profiles(db: Any, info: RunInfo, label: str, skip: int) -> RunProfiles:
    """Per-prompt mean profiles of one run, rows with pos < skip left out."""
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
    return RunProfiles(info, label, prompt_ids.astype(np.int64),
                       tuple(float(a) for a in alphas), features, n_tokens,
                       n_stored - len(prompt_ids))


def prompt_labels(db: Any, run_id: str, field: str) -> dict[int, str]:
    """prompt_id -> the field's value as text, for the run's prompts that have one."""
    column = '"' + field.replace('"', '""') + '"'
    rows = db.sql(f"SELECT prompt_id, CAST({column} AS VARCHAR) AS label FROM prompts "
                  "WHERE run_id = $run", {"run": run_id}).to_pylist()
    return {r["prompt_id"]: r["label"] for r in rows if r["label"] is not None}


# -- distances between runs --------------------------------------------------------------


def run_distances(db: Any, infos: Sequence[RunInfo], alpha: float, skip: int
                  ) -> dict[str, np.ndarray]:
    """{metric: (runs x runs)} of `distances.pairwise_distances` on each run's pooled
    rows at K matched relative depths (see the module)."""
    from entropy_fast.distances import METRICS, pairwise_distances

    n_depths = min(len(info.layer_indices) for info in infos)
    profiles = [pooled_profile(db, info, alpha, skip, n_depths) for info in infos]
    return {metric: pairwise_distances(profiles, metric) for metric in METRICS}


def matched_columns(layer_indices: Sequence[int], n_depths: int) -> list[int]:
    """For each of n_depths equally spaced relative depths in [0, 1], the column of the
    layer nearest to it (layers at hidden-state index / last index)."""
    depth = np.asarray(layer_indices, dtype=np.float64) / max(layer_indices[-1], 1)
    return [int(np.abs(depth - d).argmin()) for d in np.linspace(0.0, 1.0, n_depths)]


def pooled_profile(db: Any, info: RunInfo, alpha: float, skip: int, n_depths: int) -> Any:
    """One EntropyProfile of every row (pos >= skip) of every prompt of a run, at
    `n_depths` matched relative depths (its layer_indices are 0..n_depths-1)."""
    import torch

    from entropy_fast.profile import EntropyProfile

    table = db.sql("SELECT entropy FROM entropy WHERE run_id = $run AND alpha = $alpha AND "
                   "pos >= $skip ORDER BY prompt_id, pos, layer",
                   {"run": info.run_id, "alpha": alpha, "skip": skip}, output="numpy")
    values = np.asarray(table["entropy"], dtype=np.float32).reshape(
        -1, len(info.layer_indices))[:, matched_columns(info.layer_indices, n_depths)]
    return EntropyProfile(torch.from_numpy(np.ascontiguousarray(values)),
                          torch.zeros(len(values), dtype=torch.int64), list(range(n_depths)),
                          alpha=alpha, model_name=info.model)


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


def _fold_scores(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                 neighbors: int, seed: int) -> dict[str, float]:
    from sklearn.dummy import DummyClassifier
    from sklearn.metrics import accuracy_score
    from sklearn.neighbors import KNeighborsClassifier

    scores = {}
    for name, model in (("knn", KNeighborsClassifier(min(neighbors, len(train)))),
                        ("dummy", DummyClassifier(strategy="stratified", random_state=seed))):
        model.fit(x[train], y[train])
        scores[f"{name}_accuracy"] = float(accuracy_score(y[test], model.predict(x[test])))
        scores[f"{name}_roc_auc"] = macro_roc_auc(y[test], model.predict_proba(x[test]),
                                                  model.classes_)
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


def _distances_figure(distances: dict[str, np.ndarray], labels: list[str]) -> Any:
    import matplotlib.pyplot as plt

    labels = [_short(label) for label in labels]
    size = 2.5 + 0.45 * len(labels)
    figure, axes = plt.subplots(1, max(len(distances), 1), figsize=(size * len(distances),
                                                                    size + 1), squeeze=False)
    for ax, (metric, matrix) in zip(axes[0], distances.items(), strict=False):
        image = ax.imshow(matrix, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize="small")
        ax.set_yticks(range(len(labels)), labels, fontsize="small")
        ax.set_title(metric, fontsize="medium")
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return figure


def _short(label: str, width: int = 24) -> str:
    """A tick label of at most `width` characters (a path keeps its end)."""
    return label if len(label) <= width else "…" + label[1 - width:]


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


def _page(db: Any, data: Sequence[RunProfiles], shown: Sequence[RunProfiles],
          distances: dict[str, np.ndarray], predictions: Sequence[Predictability],
          pngs: dict[str, Path], notes: Sequence[str], group_by: str | None, skip: int,
          alpha: float, neighbors: int) -> str:
    e = html.escape
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
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
             "<h2>Distances between runs</h2><p>Each run's rows of every prompt, at the "
             f"{min((len(d.info.layer_indices) for d in shown), default=0)} relative depths "
             "the shallowest run has (nearest layer of each run); definitions in "
             "docs/distances.md.</p>", _image(pngs["distances"]),
             *[_matrix(metric, m, [d.label for d in shown]) for metric, m in distances.items()]]
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
    mode = "generation" if info.sampling.generating else "text"
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
    return [d.label, info.run_id, info.model, mode, "; ".join(settings),
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
