"""Choosing the runs of a store by what they are, and naming each chosen run.

`RunSelection` is the one selection that `entropy-fast compare`, `ProfileStore.profiles`,
`ProfileStore.aggregated` and `store.compare.compare_runs` share: models (by the label runs
are filed under, or by what was loaded), run ids by prefix, mode, a Rényi order, and
filters on the run's settings (the columns of the `runs` view). By default one run is
chosen per model and settings: the latest complete one. Every chosen run stays one entry
(`SelectedRun`), never pooled with another; two runs of one model are labelled by what
differs between them ("smollm2 (mode=text)" vs "smollm2 (mode=generation)", "smollm2
(alphas=1,2)" vs "smollm2 (alphas=1)"). Imports nothing heavy (no torch, no DuckDB).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entropy_fast.store.errors import StoreError
from entropy_fast.store.records import RunInfo

MODES = ("text", "generation")
# What `describe` tells of a run, in the order labels name it.
_DESCRIBED = ("mode", "chat_template", "max_new_tokens", "do_sample", "temperature", "top_p",
              "top_k", "seed", "alphas", "layer_stride", "base", "top_tokens", "kl_to_final",
              "dtype", "generator", "quantization", "weights", "corpus")
# Settings that make two runs of a model measure different things: a label names those
# that differ, a note those that differ between the entries of one comparison.
_MEASUREMENT = ("mode", "chat_template", "max_new_tokens", "do_sample", "temperature",
                "top_p", "top_k", "seed", "dtype", "generator", "quantization", "corpus")


@dataclass(frozen=True)
class SelectedRun:
    """One chosen run: its record (shard 0's; every shard has the same settings), its
    label, and whether every shard of it is complete."""

    info: RunInfo
    label: str
    complete: bool

    @property
    def run_id(self) -> str:
        return self.info.run_id

    @property
    def model(self) -> str:
        return self.info.model


@dataclass(frozen=True)
class RunSelection:
    """Which runs to take, by what they are; every criterion given must hold.

    Args:
        models: model labels (the names runs are filed under: a model's name, path, or the
            `--name` given at profiling) or what was loaded (`source`: alias, path, hub id).
        runs: run ids or unique prefixes of them; these runs are taken as they are
            (complete or not, no "latest" rule). An ambiguous prefix is an error listing
            the runs it matches.
        mode: "text" (the text itself profiled) or "generation" (continuations profiled).
        alpha: only runs that computed this Rényi order.
        where: {setting: value} (or "setting=value" strings) over the run's settings, the
            columns of the `runs` view (`mode`, `dtype`, `max_new_tokens`, `layer_stride`,
            `generator`, `do_sample`, `temperature`, `corpus`, ...); numbers compare as
            numbers, `true`/`false` as booleans, `none` matches an unset value.
        latest: without `runs`, keep only the latest complete run of each model and
            settings (True), or every complete run (False).
    """

    models: Sequence[str] | None = None
    runs: Sequence[str] | None = None
    mode: str | None = None
    alpha: float | None = None
    where: Mapping[str, Any] | Sequence[str] = field(default_factory=dict)
    latest: bool = True

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise StoreError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "where", parse_where(self.where))
        for name in ("models", "runs"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))

    @classmethod
    def of(cls, selection: RunSelection | None, criteria: Mapping[str, Any]) -> RunSelection:
        """`selection`, or one built from its fields given as keywords (not both)."""
        if selection is not None and criteria:
            raise StoreError(f"give a RunSelection or its fields ({', '.join(criteria)}), "
                             "not both")
        return selection if selection is not None else cls(**criteria)

    def select(self, records: Iterable[RunInfo]) -> list[SelectedRun]:
        """The chosen runs of `records` (every shard record of a store), labelled, sorted by
        model and label; StoreError when none is left, saying which criterion removed
        the last ones."""
        runs = _by_run(records)
        if not runs:
            raise StoreError("no runs to choose from: the store has no profile run",
                             "profile into it first (entropy-fast profile ... --out STORE)")
        self._check_names(runs)
        chosen = self._resolve_runs(runs) if self.runs else list(runs.values())
        for name, keep in self._criteria():
            chosen = self._keep(chosen, name, keep)
        if not self.runs:
            chosen = [(info, done) for info, done in chosen if done]
            if not chosen:
                raise StoreError(f"no complete run matches {self._asked()} (only complete "
                                 "runs are compared unless named with --runs)",
                                 "finish a run, or name runs with --runs")
            if self.latest:
                chosen = _latest(chosen)
        labels = run_labels([info for info, _ in chosen])
        picked = [SelectedRun(info, labels[info.run_id], done) for info, done in chosen]
        return sorted(picked, key=lambda r: (r.model, r.label))

    def _criteria(self) -> list[tuple[str, Callable[[RunInfo], bool]]]:
        """(name, test) of each criterion, in the order they are applied."""
        wanted = set(self.models or ())
        return [("models", lambda i: not wanted or bool({i.model, i.source} & wanted)),
                ("mode", lambda i: self.mode is None or run_mode(i) == self.mode),
                ("alpha", lambda i: self.alpha is None or float(self.alpha) in i.lens.alphas),
                ("where", lambda i: all(_matches(settings_of(i).get(k), v, k)
                                        for k, v in self.where.items()))]

    def _keep(self, chosen: list[tuple[RunInfo, bool]], name: str,
              keep: Callable[[RunInfo], bool]) -> list[tuple[RunInfo, bool]]:
        """The runs that pass one criterion; a run named in `runs` that fails it, or no
        run left, is an error."""
        left = [(info, done) for info, done in chosen if keep(info)]
        if self.runs and len(left) < len(chosen):
            dropped = [info.run_id for info, _ in chosen if not keep(info)]
            raise StoreError(f"runs {', '.join(dropped)} do not match {name}="
                             f"{self._criterion(name)}")
        if not left:
            raise StoreError(f"no run in the store matches {self._asked()}",
                             "`entropy-fast info STORE` lists the runs and settings")
        return left

    def _check_names(self, runs: dict[str, tuple[RunInfo, bool]]) -> None:
        """Refuse a model or a setting no run has: a typo, not an empty selection."""
        infos = [info for info, _ in runs.values()]
        unknown = [m for m in self.models or () if not any(m in (i.model, i.source)
                                                            for i in infos)]
        if unknown:
            raise StoreError(f"no run of model {', '.join(map(repr, unknown))} in the store",
                             f"models in the store: "
                             f"{', '.join(sorted({i.model for i in infos}))}")
        known = sorted({k for i in infos for k in settings_of(i)})
        unknown = [k for k in self.where if k not in known]
        if unknown:
            raise StoreError(f"no run setting {', '.join(map(repr, unknown))} to filter on",
                             f"settings: {', '.join(known)}")

    def _resolve_runs(self, runs: dict[str, tuple[RunInfo, bool]],
                      ) -> list[tuple[RunInfo, bool]]:
        """The runs named by id or prefix, in the order given, each once."""
        ids: list[str] = []
        for prefix in self.runs or ():
            matches = [r for r in runs if r == prefix] or [r for r in runs
                                                           if r.startswith(prefix)]
            if not matches:
                raise StoreError(f"no run {prefix!r} in the store",
                                 f"runs in the store: {_run_list(runs, list(runs))}")
            if len(matches) > 1:
                raise StoreError(f"run prefix {prefix!r} is ambiguous: it matches "
                                 f"{_run_list(runs, matches)}", "give more of the run id")
            if matches[0] not in ids:
                ids.append(matches[0])
        return [runs[r] for r in ids]

    def _criterion(self, name: str) -> str:
        value = {"models": self.models, "mode": self.mode, "alpha": self.alpha,
                 "where": dict(self.where)}[name]
        return json.dumps(value, default=str)

    def _asked(self) -> str:
        """The criteria given, as text."""
        asked = {name: self._criterion(name) for name in ("models", "mode", "alpha", "where")
                 if getattr(self, name)}
        if self.runs:
            asked["runs"] = json.dumps(list(self.runs))
        return ", ".join(f"{k}={v}" for k, v in asked.items()) or "the store's runs"


def parse_where(where: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """{setting: value} from a mapping or from "setting=value" strings."""
    if where is None:
        return {}
    if isinstance(where, Mapping):
        return dict(where)
    if isinstance(where, str):
        where = [where]
    parsed = {}
    for item in where:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise StoreError(f"a settings filter is SETTING=VALUE, got {item!r}",
                             "e.g. --where dtype=bfloat16 --where max_new_tokens=32")
        parsed[key.strip()] = value.strip()
    return parsed


def run_mode(info: RunInfo) -> str:
    """'generation' when continuations were profiled, else 'text'."""
    return "generation" if info.sampling.generating else "text"


def settings_of(info: RunInfo) -> dict[str, Any]:
    """A run's settings as the `runs` view has them (flattened), and its mode."""
    return {"mode": run_mode(info), **info.flat()}


def _matches(value: Any, wanted: Any, key: str) -> bool:
    """Whether a run's setting `value` equals `wanted` (a value, or its text)."""
    if not isinstance(wanted, str):
        return value == wanted
    text = wanted.strip().lower()
    if value is None or text in ("none", "null"):
        return value is None and text in ("none", "null", "")
    if isinstance(value, bool):
        return text in (("true", "1", "yes") if value else ("false", "0", "no"))
    if isinstance(value, (int, float)):
        try:
            return float(text) == float(value)
        except ValueError:
            raise StoreError(f"setting {key} is a number, got {wanted!r}") from None
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value] == [t.strip() for t in text.split(",")]
    return str(value).lower() == text or Path(str(value)).name.lower() == text


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower()


def _by_run(records: Iterable[RunInfo]) -> dict[str, tuple[RunInfo, bool]]:
    """{run id: (shard 0's record, whether every shard is complete)}."""
    shards: dict[str, list[RunInfo]] = {}
    for record in records:
        shards.setdefault(record.run_id, []).append(record)
    runs = {}
    for run_id, records_ in sorted(shards.items()):
        first = min(records_, key=lambda r: r.shard)
        done = (len({r.shard for r in records_}) == first.n_shards
                and all(r.status == "complete" for r in records_))
        runs[run_id] = (first, done)
    return runs


def _latest(chosen: list[tuple[RunInfo, bool]]) -> list[tuple[RunInfo, bool]]:
    """The latest run of each model and settings (weights, lens, sampling, dtype, ...);
    runs that differ only in their corpus count as one."""
    latest: dict[tuple[str, str], tuple[RunInfo, bool]] = {}
    for info, done in sorted(chosen, key=lambda c: (c[0].updated_at, c[0].run_id)):
        settings = {k: v for k, v in info.identity().items()
                    if k not in ("model", "corpus_sha256")}
        latest[info.model, json.dumps(settings, sort_keys=True, default=str)] = (info, done)
    return list(latest.values())


def describe(info: RunInfo) -> dict[str, str]:
    """What a run is, as short text by setting (unset or irrelevant settings left out)."""
    sampling, lens = info.sampling, info.lens
    generating = sampling.generating
    values: dict[str, Any] = {
        "mode": run_mode(info),
        "chat_template": sampling.chat_template,
        "max_new_tokens": sampling.max_new_tokens if generating else None,
        "do_sample": sampling.do_sample if generating else None,
        **{k: getattr(sampling, k) if generating and sampling.do_sample else None
           for k in ("temperature", "top_p", "top_k", "seed")},
        "alphas": ",".join(f"{a:g}" for a in lens.alphas),
        "layer_stride": lens.layer_stride, "base": lens.base,
        "top_tokens": lens.top_tokens or None, "kl_to_final": lens.kl_to_final,
        "dtype": info.dtype,
        "generator": info.generator if generating else None,
        "quantization": info.quantization,
        "weights": info.weights[:8] if info.weights else None,
        "corpus": Path(info.corpus).name}
    return {k: f"{v:g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool)
            else str(v) for k, v in values.items() if v is not None}


def run_labels(infos: Sequence[RunInfo]) -> dict[str, str]:
    """{run id: label}: the model's name when it is the model's only run here, else the
    model and what differs between its runs, e.g. "smollm2 (dtype=bfloat16)"; the run
    id's first 8 digits where nothing else tells two runs apart."""
    by_model: dict[str, list[RunInfo]] = {}
    for info in infos:
        by_model.setdefault(info.model, []).append(info)
    labels = {}
    for model, runs in by_model.items():
        if len(runs) == 1:
            labels[runs[0].run_id] = model
            continue
        described = {r.run_id: describe(r) for r in runs}
        keys = _differing(list(described.values()), _DESCRIBED)
        texts = {r: ", ".join(f"{k}={d[k]}" for k in keys if k in d)
                 for r, d in described.items()}
        if len(set(texts.values())) < len(texts) or not all(texts.values()):
            texts = {r: ", ".join(filter(None, (t, f"run={r[:8]}"))) for r, t in texts.items()}
        labels.update({r: f"{model} ({t})" for r, t in texts.items()})
    return labels


def differences(runs: Sequence[SelectedRun]) -> list[str]:
    """The measurement settings (mode, sampling, dtype, corpus, ...) in which the chosen
    runs differ: a distance between two of them may show those as well as the models."""
    return _differing([describe(r.info) for r in runs], _MEASUREMENT)


def _differing(described: Sequence[dict[str, str]], keys: Sequence[str]) -> list[str]:
    """The keys with more than one value among the descriptions that have them (so that
    the settings of generation, which text runs lack, do not restate the mode)."""
    return [k for k in keys if len({d[k] for d in described if k in d}) > 1]


def _run_list(runs: dict[str, tuple[RunInfo, bool]], ids: Sequence[str]) -> str:
    shown = [f"{r} ({runs[r][0].model}, {run_mode(runs[r][0])})" for r in ids[:20]]
    return ", ".join(shown) + (f" ... and {len(ids) - 20} more" if len(ids) > 20 else "")
