"""The `entropy-fast` command line: profile, generate, query, compare, info, check, queries.

The CLI parses arguments, calls the library (`pipeline`, `store`) and prints. Options of
the settings classes become flags with their help and defaults (`settings`); library
errors (`EntropyFastError`) print as one line with their hint, Python parameter names
replaced by flags; anything else is a bug and keeps its traceback (`--traceback` shows
one for every error). `main(argv)` runs in-process, for tests. Importing this module
loads no torch: `--help` and the SQL-only commands start at once.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import re
import signal
import sys
import tempfile
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from entropy_fast.errors import EntropyFastError
from entropy_fast.settings import (
    DEFAULT_MODEL,
    LensSettings,
    ModelSettings,
    SamplingSettings,
    flag_of,
)
from entropy_fast.store.errors import StoreError

DEFAULT_PLOT = "entropy_profile.png"
log = logging.getLogger("entropy_fast")


# -- entry point ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return int(exit_.code or 0)
    with _log_to_stderr(), _terminate_as_interrupt():
        try:
            return args.run(args)
        except BrokenPipeError:  # output piped into e.g. head, which stopped reading
            return 141
        except KeyboardInterrupt:
            kept = ("every committed part is kept and the same command resumes"
                    if getattr(args, "out", None) else "nothing was kept (no --out STORE)")
            print(f"entropy-fast: interrupted; {kept}", file=sys.stderr)
            return 130
        except EntropyFastError as err:
            if args.traceback:
                raise
            print(f"entropy-fast {args.command}: error: {_for_cli(err, parser)}",
                  file=sys.stderr)
            return 1


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) ends the run like Ctrl-C: the writer commits
    what it holds and records the run as interrupted."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (in-process callers): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _log_to_stderr() -> Iterator[None]:
    """The library's progress messages (resuming, nothing to do, ...) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _for_cli(err: EntropyFastError, parser: argparse.ArgumentParser) -> str:
    """The error's message and hint on one line, with parameter names as their flags
    (not in a QueryError's: its names are query parameters, passed as --param NAME=V, or
    DuckDB's columns)."""
    from entropy_fast.store.queries import QueryError

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, QueryError):
        return text
    for param, flag in _flags(parser).items():
        text = re.sub(rf"\b{param}=(['\"]?)([^'\"\s,;)]+)\1", rf"{flag} \2", text)
        text = re.sub(rf"(?<![-\w]){param}\b", flag, text)
    return text


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{dest: --flag} of every option of every command (dests are the library's names)."""
    flags = {}
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if long and "_" in action.dest:
                flags[action.dest] = long[0]
    flags["alpha"] = "--alpha"
    return flags


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="entropy-fast",
        description="Logit-lens entropy profiles of causal LMs, at corpus scale.")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, adder in (("profile", _add_profile), ("generate", _add_generate),
                        ("query", _add_query), ("compare", _add_compare), ("show", _add_show),
                        ("report", _add_report), ("info", _add_info),
                        ("check", _add_check), ("queries", _add_queries)):
        doc = inspect.cleandoc(COMMANDS[name].__doc__ or "")
        sub = commands.add_parser(name, help=doc.splitlines()[0], description=doc,
                                  formatter_class=_Formatter)
        sub.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of an error")
        adder(sub)
        sub.set_defaults(run=COMMANDS[name])
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the command's description as written and shows each default once: argparse's
    "(default: X)" is added where the help does not give the default in words already and
    X says something (not None, False or [], which stand for "not given")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (default is None or default is False or default == [] or default == argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        shown = ", ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _add_settings(p: argparse.ArgumentParser, cls: type, only: Sequence[str] | None = None
                  ) -> None:
    """One flag per field of a settings class, with its help, default and type."""
    hints = typing.get_type_hints(cls)
    group = p.add_argument_group(cls.__doc__.splitlines()[0].rstrip("."))
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        kind = _scalar_type(hints[f.name])
        options: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"],
                                   "default": f.default}
        if kind is bool:
            options["action"] = "store_true"
        elif typing.get_origin(hints[f.name]) is tuple:
            options.update(action="append", type=kind, default=None,
                           metavar=f.metadata.get("metavar"))
            options["help"] += f" (default: {', '.join(f'{v:g}' for v in f.default)})"
        else:
            options.update(type=kind, metavar=f.metadata.get("metavar"),
                           choices=f.metadata.get("choices"))
        group.add_argument(flag_of(f), **options)


def _scalar_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
    return _scalar_type(args[0]) if args else hint


def _settings_of(args: argparse.Namespace, cls: type) -> Any:
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    if "alphas" in values and values["alphas"] is None:
        del values["alphas"]
    return cls(**values)


# -- profile and generate -----------------------------------------------------------------


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    """MODEL ... and the corpus options, shared by profile and generate."""
    p.add_argument("models", nargs="*", metavar="MODEL", default=[DEFAULT_MODEL],
                   help="built-in alias, local folder, .gguf file or hub id; several run "
                        "one after another")
    p.add_argument("--name", dest="names", action="append", metavar="LABEL",
                   help="label to file a model under instead of its name or resolved "
                        "path (repeat once per MODEL)")
    p.add_argument("--prompts", metavar="FILE",
                   help="corpus: .txt (a prompt per line), .jsonl or .parquet "
                        "(default: the bundled 42-prompt sample corpus)")
    p.add_argument("--text-field", dest="text_field", default="text",
                   help="JSON field / Parquet column that holds the text")
    p.add_argument("--on-bad-line", dest="on_error", choices=("fail", "skip"), default="fail",
                   help="a malformed corpus record stops the run, or is skipped")
    p.add_argument("--long-prompts", dest="long_prompts", default="fail",
                   choices=("fail", "skip", "truncate_left", "truncate_right"),
                   help="prompts longer than the context window allows: stop before any "
                        "work, skip them, or keep their end (truncate_left) or start")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="only prompts with prompt_id %% N == I (one process per GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_profile(p: argparse.ArgumentParser) -> None:
    _add_corpus_args(p)
    _add_settings(p, SamplingSettings)
    _add_settings(p, LensSettings)
    _add_settings(p, ModelSettings)
    p.add_argument("--out", metavar="STORE", help="write to this store (created if missing; "
                   "an interrupted run resumes where it stopped; continuations stored there "
                   "by `generate` with the same settings are profiled, not regenerated); "
                   "default: a temporary store, deleted at the end")
    p.add_argument("--plot", metavar="PATH", default=DEFAULT_PLOT,
                   help="PNG of the mean profile across prompts (± 1 std)")
    p.add_argument("--no-plot", action="store_true", help="draw no plot")
    p.add_argument("--run-id", dest="run_id",
                   help="run id (default: a hash of model, weights, corpus and settings)")
    p.add_argument("--part-rows", dest="part_rows", type=int, default=1 << 20,
                   help="rows per committed part (one Parquet row group)")
    p.add_argument("--flush-seconds", dest="flush_seconds", type=float, default=60.0,
                   help="commit at least this often: a kill loses at most this much work")
    _add_ray_args(p)


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("Ray scale-out (needs the ray extra; see docs/scale-out.md)")
    group.add_argument("--ray", action="store_true",
                       help="profile on a Ray cluster: lens actors (one per GPU; with "
                            "--generator vllm, a ray.data.llm vLLM engine beside each) "
                            "commit into --out, which every node must see at the same path")
    group.add_argument("--ray-address", dest="ray_address", metavar="ADDRESS",
                       help="the cluster to join: auto, HOST:PORT or ray://HOST:10001; "
                            "without it, $RAY_ADDRESS, else a private cluster on this machine")
    group.add_argument("--workers", type=int, metavar="N",
                       help="lens actors; without it, one per GPU of the cluster (1 on a "
                            "cluster without GPUs)")


def _engine(args: argparse.Namespace) -> Any:
    """'local', or the RayEngine that --ray and its options describe."""
    if not args.ray:
        if args.ray_address or args.workers:
            raise EntropyFastError("--ray-address and --workers go with --ray")
        return "local"
    from entropy_fast.distributed import RayEngine

    return RayEngine(address=args.ray_address, workers=args.workers)


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile a corpus with one or more models, print a per-layer summary and plot it.

    With no arguments: the built-in SmolLM2-135M over the bundled sample corpus. With
    --out STORE the profiles go into a resumable Parquet store; a run killed at any
    moment and started again with the same arguments continues where it stopped, and a
    complete run is not redone. With --ray the same run goes over the GPUs of a Ray
    cluster, into the same store, with the same guarantees.
    """
    from entropy_fast.pipeline import profile_corpus

    engine = _engine(args)
    corpus = _read_corpus(args)
    plot = _png_path(args.plot) if not args.no_plot else None
    with _store_dir(args.out) as folder:
        # The bars close before the summary prints: closing redraws them, below it.
        with _progress(args.no_progress) as on_progress:
            results = profile_corpus(
                args.models, corpus, folder, lens=_settings_of(args, LensSettings),
                sampling=_settings_of(args, SamplingSettings),
                settings=_settings_of(args, ModelSettings), shard=_parse_shard(args.shard),
                run_id=args.run_id, names=args.names, long_prompts=args.long_prompts,
                part_rows=args.part_rows, flush_seconds=args.flush_seconds,
                on_progress=on_progress, engine=engine)
        _report(folder, results, plot)
    if args.out:
        print(f"store: {args.out}")
    return 0


def _add_generate(p: argparse.ArgumentParser) -> None:
    _add_corpus_args(p)
    _add_settings(p, SamplingSettings)
    _add_settings(p, ModelSettings)
    p.add_argument("--out", metavar="STORE", required=True,
                   help="store the continuations here (created if missing; an interrupted "
                        "stage resumes where it stopped)")
    p.add_argument("--part-prompts", dest="part_prompts", type=int, default=1024,
                   help="prompts per generate call and per committed part")


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate continuations of a corpus and store them for a later `profile`.

    The prompt and continuation token ids (and the continuation's text, for people to
    read) go into the store as a generation stage whose id follows the model, weights,
    corpus and generation settings. `entropy-fast profile` with the same model, --prompts,
    --max-new-tokens, --generator, sampling options and --dtype then profiles those
    continuations instead of generating. A stage killed at any moment and started again
    resumes where it stopped; a complete stage is not redone.
    """
    from entropy_fast.pipeline import generate_corpus

    corpus = _read_corpus(args)
    with _progress(args.no_progress) as on_progress:
        results = generate_corpus(
            args.models, corpus, args.out, sampling=_settings_of(args, SamplingSettings),
            settings=_settings_of(args, ModelSettings), shard=_parse_shard(args.shard),
            names=args.names, long_prompts=args.long_prompts, part_prompts=args.part_prompts,
            on_progress=on_progress)
    for result in results:
        if result.prompts:
            info = result.info
            print(f"{info.model} | generation {info.run_id} | {result.prompts} prompts, "
                  f"{result.tokens} new tokens | {info.generator} | {result.seconds:.1f} s")
    print(f"store: {args.out}")
    return 0


def _read_corpus(args: argparse.Namespace) -> Any:
    from entropy_fast.pipeline import as_corpus

    corpus = as_corpus(args.prompts, text_field=args.text_field, on_error=args.on_error)
    if corpus.skipped:
        lines = ", ".join(str(line) for line, _ in corpus.skipped[:10])
        more = " ..." if len(corpus.skipped) > 10 else ""
        print(f"skipped {len(corpus.skipped)} bad records of {corpus.path} "
              f"(lines {lines}{more}); first: {corpus.skipped[0][1]}", file=sys.stderr)
    return corpus


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        shard, n_shards = (int(part) for part in text.split("/"))
    except ValueError:
        raise EntropyFastError(f"--shard must look like I/N (e.g. 0/4), got {text!r}"
                               ) from None
    if not 0 <= shard < n_shards:
        raise EntropyFastError(f"--shard {text}: I must be in 0..N-1")
    return shard, n_shards


def _png_path(plot: str) -> Path:
    path = Path(plot)
    return path if path.suffix.lower() == ".png" else path.with_name(path.name + ".png")


@contextmanager
def _store_dir(out: str | None) -> Iterator[Path]:
    """`out`, or a temporary store folder deleted afterwards."""
    if out:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="entropy-fast-") as tmp:
        yield Path(tmp) / "store"


@contextmanager
def _progress(disabled: bool) -> Iterator[Any]:
    """An on_progress callback (`progress.run_progress`: a bar per run on a terminal, a
    line now and then elsewhere), or HF's own loading bars silenced when the user asked
    for quiet."""
    if disabled:
        _silence_hf_bars()
        yield None
        return
    from entropy_fast.progress import run_progress

    on_progress = run_progress()
    try:
        yield on_progress
    finally:
        on_progress.close()


def _silence_hf_bars() -> None:
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def _report(folder: Path, results: list[Any], plot: Path | None) -> None:
    """Per-layer table of each run, and the plot of all of them."""
    from entropy_fast.store.sql import ProfileStore

    with ProfileStore(folder) as db:
        for result in results:
            _print_summary(db, result)
        infos = [r.info for r in results]
        if plot is not None:
            _plot_runs(db, infos, plot)
            print(f"plot: {plot}")


def _print_summary(db: Any, result: Any) -> None:
    """The per-layer table of one run at its primary alpha, under a one-line header."""
    info = result.info
    alpha = info.lens.alpha
    rows = db.query("mean_profile", run_id=info.run_id, alpha=alpha).to_pylist()
    counts = db.sql("SELECT count(*) AS n, coalesce(sum(n_tokens), 0)::BIGINT AS t FROM prompts "
                    "WHERE run_id = $run", {"run": info.run_id}).to_pylist()[0]
    mode = (f"{info.sampling.max_new_tokens} new tokens" if info.sampling.generating
            else "text mode")
    rate = (f", {result.tokens_per_second:,.0f} tok/s over {result.tokens:,} tokens profiled"
            f" now" if result.seconds > 0 else "")
    n_layers = len(rows)
    print(f"\n{info.model} | run {info.run_id} | {counts['n']} prompts, {counts['t']} tokens "
          f"({mode}) | alpha={_fmt_alpha(alpha)} ({info.lens.unit}) | {n_layers} layers "
          f"(hidden states: 0 = embeddings, {max((r['layer'] for r in rows), default=0)} = "
          f"last block) | {result.seconds:.1f} s{rate}")
    columns = ("layer", "mean", "std", "min", "q25", "median", "q75", "max")
    table = [{c: row[c] for c in columns} for row in rows]
    if info.lens.kl_to_final:  # KL(p_final || p_layer), mean over the same tokens
        kl = {r["layer"]: r["mean_kl"] for r in db.query("kl_to_final", run_id=info.run_id)
              .to_pylist()}
        columns = (*columns, "kl_to_final")
        for row in table:
            row["kl_to_final"] = kl.get(row["layer"])
    print("per layer, over all tokens (each token weighs the same):")
    print(_format_table(table, columns))


def _fmt_alpha(alpha: float) -> str:
    return "inf" if math.isinf(alpha) else f"{alpha:g}"


def _plot_runs(db: Any, infos: Sequence[Any], path: Path) -> None:
    """PNG of the runs' mean profiles across prompts (± 1 std), at each run's primary alpha;
    each model in its colour among all the store's models (`viz.model_colors`), the same
    in every plot of the store."""
    from entropy_fast.viz import model_colors, plot_mean_curves, save_figure

    palette = model_colors(r.model for r in db.store.runs())
    curves, colors = {}, {}
    for info in infos:
        rows = db.query("aggregated_profile", run_id=info.run_id,
                        alpha=info.lens.alpha).to_pydict()
        label = info.model if len(infos) == 1 else f"{info.model} ({info.run_id})"
        curves[label] = (rows["layer"], rows["mean"], rows["std"])
        colors[label] = palette[info.model]
    unit = infos[0].lens.unit if infos else "nats"
    figure = plot_mean_curves(curves, title="mean entropy across prompts (each prompt weighs "
                              "the same; band: ± 1 std across prompts)", unit=unit,
                              colors=colors)
    save_figure(figure, path)


# -- query --------------------------------------------------------------------------------


def _add_query(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE")
    p.add_argument("query", metavar="NAME_OR_SQL",
                   help="a named query (see `entropy-fast queries`) or SQL over the views "
                        "entropy, prompts, runs, manifest, prompt_profile, continuations, "
                        "generations")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="a query parameter, repeatable; lists comma-separated")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table",
                   help="output format")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--max-rows", type=int, default=100,
                   help="rows shown by --format table (all rows go to the other formats)")
    p.add_argument("--restricted", action="store_true",
                   help="SQL may read the store only (no other files, no writes)")


def cmd_query(args: argparse.Namespace) -> int:
    """Run a named query or SQL over a store and print or write the result.

    Named queries take parameters with --param name=value; SQL text may use $name
    placeholders, bound from --param (never pasted into the SQL).
    """
    from entropy_fast.store.sql import ProfileStore

    if args.format == "parquet" and not args.output:
        raise EntropyFastError("--format parquet needs --output FILE")
    params = _parse_params(args.param)
    with ProfileStore(args.store, restricted=args.restricted) as db:
        if _looks_like_sql(args.query):
            table = db.sql(args.query, {k: _guess_type(v) for k, v in params.items()})
        else:
            table = db.query(args.query, **params)
    _write_result(table, args.format, args.output, args.max_rows)
    return 0


def _parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EntropyFastError(f"--param must look like name=value, got {item!r}")
        params[key.strip()] = value
    return params


def _looks_like_sql(text: str) -> bool:
    """SQL has spaces; a query name has none."""
    return any(ch.isspace() for ch in text.strip())


def _guess_type(value: str) -> Any:
    """A --param value for raw SQL: int, float or string, as it reads."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _write_result(table: Any, fmt: str, output: str | None, max_rows: int) -> None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, output, compression="zstd")
        return
    text = {"table": lambda: _format_table(table.to_pylist(), table.column_names, max_rows),
            "csv": lambda: _format_csv(table),
            "json": lambda: json.dumps([_json_row(r) for r in table.to_pylist()], indent=1)}[fmt]()
    if output:
        Path(output).write_text(text + "\n")
    else:
        print(text)


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _json_value(v) for k, v in row.items()}


def _json_value(value: Any) -> Any:
    """JSON-safe: non-finite floats as strings ("inf", "nan"), others as str when odd."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _format_csv(table: Any) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in table.to_pylist():
        writer.writerow([json.dumps(_json_value(v)) if isinstance(v, list) else
                         "" if v is None else v for v in row.values()])
    return buffer.getvalue().rstrip("\n")


def _format_table(rows: list[dict[str, Any]], columns: Sequence[str],
                  max_rows: int | None = None) -> str:
    """Rows as an aligned text table (floats to 4 decimals, or 4 significant digits)."""
    shown = rows if max_rows is None else rows[:max_rows]
    cells = [[_cell(row[c]) for c in columns] for row in shown]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows (--max-rows, or --format csv)")
    if not rows:
        lines.append("(no rows)")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        plain = value == 0 or (math.isfinite(value) and abs(value) >= 1e-3)
        return f"{value:.4f}" if plain else f"{value:.4g}"
    return "NULL" if value is None else str(value)


# -- compare ------------------------------------------------------------------------------


def _add_selection(p: argparse.ArgumentParser) -> None:
    """compare's and report's STORE, run selection (`store.selection.RunSelection`, see
    `_selection`) and how the runs are compared (--bin-width, --skip-positions)."""
    p.add_argument("store", metavar="STORE")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="only runs of these models: the names runs are filed under (a "
                   "model's name or path, or its --name label) or what was loaded")
    p.add_argument("--runs", nargs="+", metavar="RUN",
                   help="exactly these runs, by id or a unique prefix of one (complete or "
                   "not); default: the latest complete run of each model and settings")
    p.add_argument("--mode", choices=("text", "generation"),
                   help="only runs that profiled the text itself, or generated continuations")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="Rényi order to compare (runs without it are left out)")
    p.add_argument("--where", action="append", default=[], metavar="SETTING=VALUE",
                   help="only runs with this setting, repeatable: a column of the runs "
                   "view, e.g. dtype=bfloat16, max_new_tokens=32, layer_stride=2, "
                   "do_sample=true, generator=vllm (`entropy-fast query STORE 'SELECT * "
                   "FROM runs'` shows them)")
    p.add_argument("--all-runs", dest="all_runs", action="store_true",
                   help="every complete run that matches, not only the latest of each "
                   "model and settings")
    p.add_argument("--bin-width", dest="bin_width", type=float, default=0.25,
                   help="histogram bin width in nats (jsd; bins anchored at 0)")
    p.add_argument("--skip-positions", dest="skip_positions", type=int, default=0,
                   metavar="N", help="leave the first N rows of each prompt out (text mode: "
                   "1 drops the row predicted from the first token alone)")


def _selection(args: argparse.Namespace) -> Any:
    """The RunSelection that `_add_selection`'s options ask for."""
    from entropy_fast.store.selection import RunSelection

    return RunSelection(models=args.models, runs=args.runs, mode=args.mode, alpha=args.alpha,
                        where=args.where, latest=not args.all_runs)


def _add_compare(p: argparse.ArgumentParser) -> None:
    from entropy_fast.store.compare import METRICS

    _add_selection(p)
    p.add_argument("--metric", choices=METRICS, default="jsd",
                   help="jsd, wasserstein (per layer, averaged over layers paired at "
                   "relative depth), fisher_rao or srvf (between mean profiles); see "
                   "docs/distances.md")
    p.add_argument("--plot", metavar="PATH", default="compare.png",
                   help="PNG of the entries' mean profiles")
    p.add_argument("--no-plot", action="store_true", help="draw no plot")


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare many models, or runs of one model: a distance matrix and a plot.

    Each chosen run is one entry, never pooled with another; two runs of one model are
    labelled by what differs between them (mode, alphas, dtype, ...). By default the
    latest complete run of each model and settings is chosen; --models, --runs, --mode,
    --alpha and --where narrow the choice. Every entry's tokens are pooled and each pair
    is compared at relative depth (layers paired at the nearest layer / last layer): histogram
    JSD (nats) or Wasserstein-1 per layer, averaged over layers, or Fisher-Rao (radians)
    or elastic SRVF between the mean profiles (docs/distances.md). The model_distances
    query gives the same numbers in SQL (jsd, wasserstein, fisher_rao).
    """
    from entropy_fast.store.compare import compare_runs
    from entropy_fast.store.sql import ProfileStore

    with ProfileStore(args.store) as db:
        result = compare_runs(db, _selection(args), metric=args.metric, bin_width=args.bin_width,
                              skip_positions=args.skip_positions)
        store_models = [r.model for r in db.store.runs()]
    if result.note:
        print(f"note: {result.note}", file=sys.stderr)
    skipped = f", first {args.skip_positions} positions left out" if args.skip_positions else ""
    print(f"{args.metric} distance, alpha={_fmt_alpha(args.alpha)}{skipped}; runs: "
          f"{', '.join(f'{r.label}={r.run_id}' for r in result.runs)}")
    table = [{"entry": a, **{b: result.distance(a, b) for b in result.labels}}
             for a in result.labels]
    print(_format_table(table, ["entry", *result.labels]))
    if not args.no_plot:
        path = _png_path(args.plot)
        _plot_comparison(result, store_models, path)
        print(f"plot: {path}")
    return 0


def _plot_comparison(result: Any, store_models: Sequence[str], path: Path) -> None:
    """PNG of the compared entries' mean profiles across prompts (± 1 std), positions
    skipped as compared, beside the heatmap of their distances; the first entry of a model
    in the model's colour among the store's models (`viz.model_colors`)."""
    import matplotlib.pyplot as plt

    from entropy_fast.viz import model_colors, plot_distance_matrix, plot_mean_curves, save_figure

    palette = model_colors(store_models)
    n = len(result.runs)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12 + 0.3 * n, 4.5 + 0.2 * n))
    curves, colors = {}, {}
    for run in result.runs:
        agg = result.profiles[run.label]
        curves[run.label] = (agg.profiles[0].hidden_state_indices,
                             agg.mean_profile().tolist(), agg.std_profile().tolist())
        colors.setdefault(run.model, run.label)
    unit = result.runs[0].info.lens.unit
    plot_mean_curves(curves, ax=left, title="mean entropy across prompts (each prompt weighs "
                     "the same; band: ± 1 std across prompts)", unit=unit,
                     colors={label: palette[model] for model, label in colors.items()})
    plot_distance_matrix(result.distances, result.labels, result.comparison.metric, ax=right)
    save_figure(figure, path)


# -- show ---------------------------------------------------------------------------------


def _add_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE")
    p.add_argument("--prompt", type=int, required=True, metavar="N",
                   help="the prompt id (its 0-based line in the corpus)")
    p.add_argument("--run", dest="run_id", metavar="RUN_ID",
                   help="the run (id or unique prefix; needed when several runs have top "
                        "tokens)")
    p.add_argument("--rank", type=int, default=1, metavar="K",
                   help="show the K most probable tokens of each cell (default: 1)")
    p.add_argument("--plot", metavar="PNG", help="also save the logit-lens grid as PNG")
    p.add_argument("--max-rows", type=int, default=200, metavar="N",
                   help="rows printed at most (0 = all)")


def cmd_show(args: argparse.Namespace) -> int:
    """Show what the logit lens sees on one prompt: the top tokens at every layer.

    Prints one row per position and layer with the most probable tokens, their text and
    probabilities (runs profiled with --top-tokens K), and with --plot saves the classic
    grid (layers x positions, each cell the top token, coloured by its probability).
    """
    from entropy_fast.store.sql import ProfileStore

    with ProfileStore(args.store) as db:
        info = _run_with_top_tokens(db, args.run_id)
        table = db.query("top_tokens", run_id=info.run_id, prompt_id=args.prompt,
                         max_rank=args.rank)
        if table.num_rows == 0:
            raise StoreError(f"run {info.run_id} has no prompt {args.prompt}",
                             f"its prompts: 0..{info.n_prompts - 1}, those committed so far")
        print(f"{info.model} | run {info.run_id} | prompt {args.prompt} | top {args.rank} of "
              f"{info.lens.top_tokens} tokens per layer (rank 0 = most probable)")
        rows = [{"pos": r["pos"], "predicts": r["next_token"], "layer": r["layer"],
                 "rank": r["rank"], "token": r["text"], "prob": r["prob"]}
                for r in table.to_pylist()]
        print(_format_table(rows, list(rows[0]), args.max_rows or None))
        if args.plot:
            _plot_logit_lens(db, info, args.prompt, Path(args.plot))
    return 0


def _run_with_top_tokens(db: Any, run: str | None) -> Any:
    """The run `show` reads: the one given (by id prefix), else the only one with top
    tokens."""
    runs = [r for r in db.store.runs() if r.lens.top_tokens]
    if run is not None:
        runs = [r for r in runs if r.run_id.startswith(run)]
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise StoreError(f"{db.store.root} has no run{f' {run}' if run else ''} with top "
                         "tokens", "profile with --top-tokens K (e.g. 5) to record them")
    listed = ", ".join(f"{r.run_id} ({r.model})" for r in runs)
    raise StoreError(f"several runs have top tokens: {listed}", "choose one with --run ID")


def _plot_logit_lens(db: Any, info: Any, prompt_id: int, path: Path) -> None:
    from entropy_fast.store.codec import read_profiles
    from entropy_fast.viz import plot_logit_lens, save_figure

    ((_, profile),) = read_profiles(db.store, run_id=info.run_id, prompt_ids=[prompt_id])
    texts = db.sql("SELECT token_id, text FROM vocab WHERE run_id = $run", {"run": info.run_id},
                   output="numpy")
    vocab = dict(zip(texts["token_id"].tolist(), texts["text"].tolist(), strict=True)) or None
    save_figure(plot_logit_lens(profile, vocab).figure, path)
    print(f"plot: {path}")


# -- report -------------------------------------------------------------------------------


def _add_report(p: argparse.ArgumentParser) -> None:
    _add_selection(p)
    p.add_argument("-o", "--out", dest="path", metavar="HTML", default="report.html",
                   help="the report page; its PNGs are written beside it (HTML-profiles.png"
                        ", ...)")
    p.add_argument("--group-by", dest="group_by", metavar="FIELD",
                   help="a prompt metadata field (a .jsonl field beside the text): profiles "
                        "per group and how well profiles predict it (k-NN, CV)")


def cmd_report(args: argparse.Namespace) -> int:
    """Write an HTML report of a store's runs: settings, profiles, distances, groups.

    The runs are those `compare` chooses with the same options, under the same labels: the
    runs table, every run's mean profile at relative depth, heatmaps and tables of the
    distances `compare --metric M` prints for each metric (jsd, wasserstein, fisher_rao,
    srvf) and, with --group-by, profiles per group and k-NN accuracy and ROC-AUC of
    predicting the field from profiles (stratified CV against a stratified dummy). One
    self-contained HTML file; the PNGs are written beside it.
    """
    from entropy_fast.report import write_report

    report = write_report(args.store, args.path, _selection(args), group_by=args.group_by,
                          skip_positions=args.skip_positions, bin_width=args.bin_width)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    for p in report.predictability:
        if p.scores:
            knn, dummy = p.scores["knn_accuracy"], p.scores["dummy_accuracy"]
            print(f"{p.label}: k-NN accuracy {knn.mean():.3f} ± {knn.std():.3f} vs dummy "
                  f"{dummy.mean():.3f} ± {dummy.std():.3f} ({p.folds} folds)")
    print(f"report: {report.html} ({len(report.runs)} runs; "
          f"{', '.join(str(p) for p in report.pngs)})")
    return 0


# -- info, check, queries -----------------------------------------------------------------


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE")


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a store: size, runs and generation stages with their settings and progress."""
    from entropy_fast.store import GENERATION, PROFILE, Store

    store = Store(args.store)
    entries, generated = store.manifest(), store.entries(GENERATION)
    size = sum(f.stat().st_size for f in store.root.rglob("*") if f.is_file())
    print(f"store {store.root} | schema {store.version} | {size / 2**20:.1f} MiB | "
          f"{len(entries)} parts | {sum(e.n_rows for e in entries):,} rows")
    rows = []
    for info in store.records(PROFILE):
        mine = _entries_of(entries, info)
        rows.append({
            **_shard_columns(info, mine, "run"),
            "tokens": sum(e.n_tokens for e in mine), "rows": sum(e.n_rows for e in mine),
            "alphas": ",".join(_fmt_alpha(a) for a in info.lens.alphas),
            "layers": len(info.layer_indices or []),
            "new_tokens": info.sampling.max_new_tokens, "dtype": info.dtype,
            "updated": info.updated_at})
    print(_format_table(rows, list(rows[0]) if rows else ["model"]))
    rows = []
    for info in store.records(GENERATION):
        mine = _entries_of(generated, info)
        rows.append({
            **_shard_columns(info, mine, "generation"),
            "new_tokens": sum(e.n_tokens for e in mine), "generator": info.generator,
            "max_new_tokens": info.sampling.max_new_tokens,
            "sampling": _sampling_text(info.sampling), "dtype": info.dtype,
            "updated": info.updated_at})
    if rows:
        print(f"\ngeneration stages ({len(generated)} parts; `profile` with the same settings "
              "uses them):")
        print(_format_table(rows, list(rows[0])))
    return 0


def _entries_of(entries: list, info: Any) -> list:
    """The committed parts of one run or generation shard."""
    return [e for e in entries if e.run_id == info.run_id and e.shard == info.shard]


def _shard_columns(info: Any, mine: list, id_column: str) -> dict:
    """Identity and progress columns shared by the run and generation tables of `info`."""
    return {"model": info.model, id_column: info.run_id, "shard": info.shard_key,
            "status": info.status,
            "prompts": f"{sum(e.n_prompts for e in mine)}/{len(info.prompt_ids)}"}


def _sampling_text(sampling: SamplingSettings) -> str:
    if not sampling.do_sample:
        return "greedy"
    return f"T={sampling.temperature},top_p={sampling.top_p},seed={sampling.seed}"


def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE")
    p.add_argument("--repair", action="store_true",
                   help="move damaged parts and records into STORE/quarantine/, so that the "
                        "next run recomputes their prompts")


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a store: files against the manifest (rows, sizes, sha256), records, counts.

    Exit status 0 when the store is sound, 1 when a problem was found (after --repair:
    when a problem remains).
    """
    from entropy_fast.store.check import check_store

    report = check_store(args.store, repair=args.repair)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    for line in report.repaired:
        print(f"repaired: {line}")
    if report.repaired:
        report = check_store(args.store)
        print("after repair: " + ("OK" if report.ok else f"{len(report.problems)} problem(s)"))
        return 0 if report.ok else 1
    print(f"{args.store}: " + ("OK" if report.ok else f"{len(report.problems)} problem(s)"))
    return 0 if report.ok else 1


def _add_queries(p: argparse.ArgumentParser) -> None:
    del p  # no options


def cmd_queries(args: argparse.Namespace) -> int:
    """List the named queries and their parameters."""
    from entropy_fast.store.queries import named_queries

    del args
    for query in named_queries().values():
        print(f"{query.name}: {query.description}")
        for param in query.params:
            default = "required" if param.required else f"default {param.default!r}"
            print(f"    {param.name} ({param.type}, {default}) {param.help}")
    return 0


COMMANDS = {"profile": cmd_profile, "generate": cmd_generate, "query": cmd_query,
            "compare": cmd_compare, "show": cmd_show, "report": cmd_report, "info": cmd_info,
            "check": cmd_check,
            "queries": cmd_queries}


if __name__ == "__main__":
    sys.exit(main())
