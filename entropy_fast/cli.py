"""The `entropy-fast` command line: profile, generate, query, compare, info, check, queries.

This module owns argument parsing, the per-layer summary and plots the commands print
and draw, and turning user errors into one line on stderr with a non-zero exit (no
traceback; `--traceback` shows one). `main(argv)` runs in-process, for tests.

`profile` always goes through a store: `--out STORE` (resumable), or a temporary one
that is deleted at the end. Its summary and plot are queries over that store.
`generate` stores continuations in a store (a generation stage); `profile` with the same
model, corpus and generation settings then profiles those instead of generating.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from entropy_fast.corpus import Corpus, Prompt, read_corpus
from entropy_fast.loading import DEFAULT_MODEL
from entropy_fast.profile import AggregatedProfile, EntropyProfile
from entropy_fast.sql import ProfileStore, QueryError, check_store, named_queries
from entropy_fast.store import (
    GENERATION,
    PROFILE,
    SCHEMA_VERSION,
    GenerationInfo,
    RunInfo,
    Store,
    StoreError,
)

DEFAULT_PLOT = "entropy_profile.png"
USER_ERRORS = (ValueError, RuntimeError, ImportError, OSError)
"""Exceptions reported as one line: bad input, missing files, failed loads, I/O."""


# -- entry point ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return int(exit_.code or 0)
    try:
        return args.run(args)
    except BrokenPipeError:  # output piped into e.g. head, which stopped reading
        return 141
    except KeyboardInterrupt:
        print("entropy-fast: interrupted (committed work is kept; run again to resume)",
              file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.traceback:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"entropy-fast {args.command}: error: {message}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="entropy-fast",
        description="Logit-lens entropy profiles of causal LMs, at corpus scale.")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, adder in (("profile", _add_profile), ("generate", _add_generate),
                        ("query", _add_query),
                        ("compare", _add_compare), ("info", _add_info),
                        ("check", _add_check), ("queries", _add_queries)):
        doc = inspect.cleandoc(COMMANDS[name].__doc__ or "")
        sub = commands.add_parser(name, help=doc.splitlines()[0], description=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of an error")
        adder(sub)
        sub.set_defaults(run=COMMANDS[name])
    return parser


# -- profile ------------------------------------------------------------------------------


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    """MODEL ... and the corpus options, shared by profile and generate."""
    p.add_argument("models", nargs="*", metavar="MODEL", default=[DEFAULT_MODEL],
                   help=f"built-in alias, local folder, .gguf file or hub id "
                        f"(default: {DEFAULT_MODEL}); several run one after another")
    p.add_argument("--prompts", metavar="FILE",
                   help="corpus: .txt (a prompt per line), .jsonl or .parquet "
                        "(default: the bundled sample corpus)")
    p.add_argument("--text-field", default="text", help="JSON field / Parquet column of the text")
    p.add_argument("--on-bad-line", choices=("fail", "skip"), default="fail",
                   help="a malformed corpus record stops the run (fail) or is skipped")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """Generation settings and the model's placement, shared by profile and generate."""
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens generated per prompt and profiled; 0 = profile the text itself")
    p.add_argument("--dtype", help="model dtype: float32, bfloat16, float16 "
                   "(default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per padded batch")
    p.add_argument("--generator", choices=("hf", "vllm"), default="hf",
                   help="what generates continuations (vllm needs the vllm extra)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="only prompts with prompt_id %% N == I (one process per GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_profile(p: argparse.ArgumentParser) -> None:
    _add_corpus_args(p)
    _add_generation_args(p)
    p.add_argument("--out", metavar="STORE", help="write to this store (created if missing; "
                   "an interrupted run resumes where it stopped; continuations stored there "
                   "by `generate` with the same settings are profiled, not regenerated)")
    p.add_argument("--plot", metavar="PATH", default=DEFAULT_PLOT,
                   help=f"PNG of the mean profile, mean ± std across prompts "
                        f"(default: {DEFAULT_PLOT})")
    p.add_argument("--no-plot", action="store_true", help="draw no plot")
    p.add_argument("--alpha", type=float, action="append", metavar="A",
                   help="Rényi order, repeatable (1 = Shannon, inf = min-entropy); the first "
                        "is summarized (default: 1)")
    p.add_argument("--layer-stride", type=int, default=1,
                   help="profile hidden states 0, k, 2k, ... and the last")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="lens backend")
    p.add_argument("--top-token", action="store_true",
                   help="also store the lens argmax token per layer")
    p.add_argument("--target-stats", action="store_true",
                   help="also store surprisal and rank of the actual next token per layer")
    p.add_argument("--run-id", help="run id (default: a hash of model, corpus and settings)")
    p.add_argument("--part-rows", type=int, default=1 << 20,
                   help="rows per committed part (one Parquet row group)")
    p.add_argument("--flush-seconds", type=float, default=60.0,
                   help="commit buffered prompts at least this often")


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile a corpus with one or more models, print a per-layer summary and plot it.

    With no arguments: the built-in SmolLM2-135M over the bundled sample corpus. With
    --out STORE the profiles go into a resumable Parquet store; a run killed at any
    moment and started again with the same arguments continues where it stopped, and a
    complete run is not redone.
    """
    corpus = _read_corpus(args)
    shard, n_shards = _parse_shard(args.shard)
    alphas = args.alpha or [1.0]
    _check_generator(args.generator)
    infos = [_run_info(args, model, corpus, alphas, shard, n_shards) for model in args.models]
    with _store_dir(args.out) as folder:
        store = Store(folder, create=True)
        # Every run's source is settled before any model loads or any record is written:
        # a run that cannot start (an unfinished generation stage) leaves the store as it was.
        sources = [_stored_generation(args, store, corpus, info) for info in infos]
        elapsed = {info.run_id: _profile_model(args, store, info, corpus, generation)
                   for info, generation in zip(infos, sources, strict=True)}
        with ProfileStore(folder) as db:
            for info in infos:
                _print_summary(db, info, elapsed[info.run_id])
            if not args.no_plot:
                _plot_runs(db, infos, Path(args.plot))
                print(f"plot: {args.plot}")
    if args.out:
        print(f"store: {args.out}")
    return 0


def _read_corpus(args: argparse.Namespace) -> Corpus:
    from entropy_fast.data import sample_corpus_path

    corpus = read_corpus(args.prompts or sample_corpus_path(), text_field=args.text_field,
                         on_error=args.on_bad_line)
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
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= shard < n_shards:
        raise ValueError(f"--shard {text}: I must be in 0..N-1")
    return shard, n_shards


def _check_generator(generator: str) -> None:
    """Fail before any model is loaded when the chosen generator is not installed."""
    from entropy_fast.vllm_generation import INSTALL_HINT, vllm_available

    if generator == "vllm" and not vllm_available():
        raise ImportError(INSTALL_HINT)


def _dtype_name(args: argparse.Namespace) -> str:
    """The model dtype the run will use, as text ('float32', 'bfloat16', ...)."""
    from entropy_fast.loading import resolve_device, resolve_dtype

    return str(resolve_dtype(args.dtype, resolve_device(args.device))).removeprefix("torch.")


def _sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"do_sample": args.do_sample, "temperature": args.temperature,
            "top_p": args.top_p, "seed": args.seed}


def _run_info(args: argparse.Namespace, model: str, corpus: Corpus, alphas: list[float],
              shard: int, n_shards: int) -> RunInfo:
    settings = {**_sampling_settings(args), "top_token": args.top_token,
                "target_stats": args.target_stats}
    return RunInfo.new(model, corpus.path, corpus.fingerprint, len(corpus), alphas=alphas,
                       layer_stride=args.layer_stride, max_new_tokens=args.max_new_tokens,
                       dtype=_dtype_name(args), generator=args.generator, settings=settings,
                       run_id=args.run_id, shard=shard, n_shards=n_shards)


def _generation_info(args: argparse.Namespace, model: str, corpus: Corpus, shard: int = 0,
                     n_shards: int = 1) -> GenerationInfo:
    """The generation stage these arguments make (or, from `profile`, would reuse)."""
    return GenerationInfo.new(model, corpus.path, corpus.fingerprint, len(corpus),
                              max_new_tokens=args.max_new_tokens, dtype=_dtype_name(args),
                              generator=args.generator, settings=_sampling_settings(args),
                              shard=shard, n_shards=n_shards)


@contextmanager
def _store_dir(out: str | None) -> Iterator[Path]:
    """`out`, or a temporary store folder deleted afterwards."""
    if out:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="entropy-fast-") as tmp:
        yield Path(tmp) / "store"


def _profile_model(args: argparse.Namespace, store: Store, info: RunInfo, corpus: Corpus,
                   generation: GenerationInfo | None) -> float:
    """Profile the run's pending prompts into the store; returns the seconds it took.

    `generation` is the stored stage whose continuations are profiled (None: generate).
    """
    old = store.run(info.run_id, info.shard_key)
    if old is not None and old.status == "complete":
        print(f"{info.model}: run {info.run_id} is complete in {store.root}; nothing to do")
        return 0.0
    start = time.perf_counter()
    options = {"alpha": info.alphas, "layer_stride": info.layer_stride,
               "backend": args.backend, "top_token": args.top_token,
               "target_stats": args.target_stats}
    with _load_profiler(args, info, **options) as profiler, store.writer(
            info, rows_per_part=args.part_rows, flush_seconds=args.flush_seconds) as writer:
        writer.info.revision = getattr(profiler.model.config, "_commit_hash", None)
        pending = writer.pending
        _report_resume(info, pending, "run")
        stream = _profile_stream(args, store, profiler, corpus, info, pending, generation)
        for prompt_id, profile in _progress(stream, len(pending), info.model, args.no_progress):
            writer.add(corpus.prompts[prompt_id], profile)
    return time.perf_counter() - start


def _report_resume(info: RunInfo | GenerationInfo, pending: list[int], what: str) -> None:
    if len(pending) < len(info.prompt_ids):
        print(f"{info.model}: resuming {what} {info.run_id}: "
              f"{len(info.prompt_ids) - len(pending)} prompts already committed")


def _profile_stream(args: argparse.Namespace, store: Store, profiler: Any, corpus: Corpus,
                    info: RunInfo, pending: list[int], generation: GenerationInfo | None
                    ) -> Iterator[tuple[int, EntropyProfile]]:
    """(prompt_id, profile) of the pending prompts, from `generation`'s stored continuations
    when given, else generated now."""
    if generation is None:
        stream = profiler.iter_profiles(
            [corpus.prompts[i].text for i in pending], args.max_new_tokens,
            do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed)
        return ((pending[index], profile) for index, profile in stream)
    print(f"{info.model}: profiling the continuations of generation {generation.run_id}")
    return _stored_profiles(store, profiler, generation, pending)


def _stored_generation(args: argparse.Namespace, store: Store, corpus: Corpus,
                       info: RunInfo) -> GenerationInfo | None:
    """The stored generation stage with this run's model, corpus and settings, if any.

    One that lacks some of the run's pending prompts is an error (finish it first), rather
    than a silent mix of stored and fresh continuations. Reads the store only, so it can
    run before the run's writer opens: prompts committed later by another process only
    shrink what is pending, so the answer stays right.
    """
    if info.max_new_tokens == 0:
        return None
    pending = store.pending(PROFILE, info)
    if not pending:
        return None
    wanted = _generation_info(args, info.model, corpus)
    if all(r.run_id != wanted.run_id for r in store.generations()):
        return None
    stored = {i for e in store.entries(GENERATION, wanted.run_id) for i in e.prompt_ids}
    missing = [i for i in pending if i not in stored]
    if missing:
        raise StoreError(
            f"generation {wanted.run_id} of {info.model} in {store.root} lacks {len(missing)} "
            f"of the prompts to profile (e.g. prompt {missing[0]}); run `entropy-fast "
            "generate` again with the same model, corpus and generation settings to finish "
            "it first")
    return wanted


def _stored_profiles(store: Store, profiler: Any, generation: GenerationInfo,
                     pending: list[int]) -> Iterator[tuple[int, EntropyProfile]]:
    """Profile stored continuations, one committed generation part at a time."""
    for rows in store.read_continuations(generation.run_id, pending):
        pairs = [(r["prompt_token_ids"], r["continuation_token_ids"]) for r in rows]
        stream = profiler.profile_token_ids(pairs, [r["text"] for r in rows],
                                            generator=generation.generator)
        for index, profile in stream:
            yield rows[index]["prompt_id"], profile


def _load_profiler(args: argparse.Namespace, info: RunInfo | GenerationInfo,
                   **options: Any) -> Any:
    from entropy_fast.profiler import EntropyProfiler

    return EntropyProfiler(info.model, dtype=info.dtype, device=args.device,
                           batch_tokens=args.batch_tokens, generator=info.generator, **options)


# -- generate -----------------------------------------------------------------------------


def _add_generate(p: argparse.ArgumentParser) -> None:
    _add_corpus_args(p)
    _add_generation_args(p)
    p.add_argument("--out", metavar="STORE", required=True,
                   help="store the continuations here (created if missing; an interrupted "
                        "stage resumes where it stopped)")
    p.add_argument("--part-prompts", type=int, default=1024,
                   help="prompts per generate call and per committed part")


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate continuations of a corpus and store them for a later `profile`.

    The prompt and continuation token ids (and the continuation's text, for people to
    read) go into the store as a generation stage whose id follows the model, corpus and
    generation settings. `entropy-fast profile` with the same model, --prompts,
    --max-new-tokens, --generator, sampling options and --dtype then profiles those
    continuations instead of generating. A stage killed at any moment and started again
    resumes where it stopped; a complete stage is not redone.
    """
    if args.max_new_tokens < 1:
        raise ValueError("generate needs --max-new-tokens >= 1")
    if args.part_prompts < 1:
        raise ValueError("--part-prompts must be >= 1")
    corpus = _read_corpus(args)
    shard, n_shards = _parse_shard(args.shard)
    _check_generator(args.generator)
    infos = [_generation_info(args, model, corpus, shard, n_shards) for model in args.models]
    store = Store(args.out, create=True)
    for info in infos:
        _generate_model(args, store, info, corpus)
    print(f"store: {args.out}")
    return 0


def _generate_model(args: argparse.Namespace, store: Store, info: GenerationInfo,
                    corpus: Corpus) -> None:
    """Generate the stage's pending prompts part by part, committing each part."""
    from tqdm.auto import tqdm

    from entropy_fast.generation import SamplingConfig

    old = store.record(GENERATION, info.run_id, info.shard_key)
    if old is not None and old.status == "complete":
        print(f"{info.model}: generation {info.run_id} is complete in {store.root}; "
              "nothing to do")
        return
    sampling = SamplingConfig(args.max_new_tokens, args.do_sample, args.temperature,
                              args.top_p, None, args.seed)
    start = time.perf_counter()
    with _load_generation(args, info) as loaded, store.writer(
            info, rows_per_part=args.part_prompts, flush_seconds=math.inf) as writer:
        writer.info.revision = _revision(loaded)
        pending = writer.pending
        _report_resume(info, pending, "generation")
        bar = tqdm(total=len(pending), unit="prompt", desc=info.model,
                   disable=True if args.no_progress else None)
        with bar:
            for first in range(0, len(pending), args.part_prompts):
                prompts = [corpus.prompts[i] for i in pending[first:first + args.part_prompts]]
                ids = [_prompt_ids(loaded, prompt, args.max_new_tokens) for prompt in prompts]
                continuations = loaded.generator.generate(ids, sampling)
                for prompt, prompt_ids, new in zip(prompts, ids, continuations, strict=True):
                    writer.add(prompt, prompt_ids, new, loaded.tokenizer.decode(new))
                writer.commit()
                bar.update(len(prompts))
    n_tokens = sum(e.n_tokens for e in store.entries(GENERATION, info.run_id)
                   if e.shard == info.shard)
    print(f"{info.model} | generation {info.run_id} | {len(info.prompt_ids)} prompts, "
          f"{n_tokens} new tokens | {info.generator} | "
          f"{time.perf_counter() - start:.1f} s")


def _load_generation(args: argparse.Namespace, info: GenerationInfo) -> Any:
    """What `generate` generates with: the HF profiler, or for vLLM only its tokenizer,
    config and engine.

    A vLLM engine loads the weights itself; an HF copy as well would take GPU memory that
    the engine's KV cache needs. (HF generation runs on the profiler's model.)
    """
    if info.generator != "vllm":
        return _load_profiler(args, info)
    from entropy_fast.vllm_generation import VllmGenerationModel

    return VllmGenerationModel(info.model, dtype=info.dtype or "auto")


def _revision(loaded: Any) -> str | None:
    """The commit hash of the model `_load_generation` or `_load_profiler` loaded."""
    config = loaded.model.config if hasattr(loaded, "model") else loaded.config
    return getattr(config, "_commit_hash", None)


def _prompt_ids(loaded: Any, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """The prompt's token ids, as the profiler tokenizes it, checked against the context."""
    ids = list(loaded.tokenizer(prompt.text)["input_ids"])
    limit = loaded.context_length
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise ValueError(f"prompt {prompt.prompt_id} needs {len(ids) + max_new_tokens} "
                         f"positions ({len(ids)} prompt tokens + new tokens) but the model's "
                         f"context window is {limit}: shorten it or lower --max-new-tokens")
    return ids


def _progress(stream: Iterator[tuple[int, Any]], total: int, label: str,
              disabled: bool) -> Iterator[tuple[int, Any]]:
    """Pass `stream` through, showing prompts done and tokens/s on stderr."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="prompt", desc=label, disable=True if disabled else None)
    start, tokens = time.perf_counter(), 0
    try:
        for item in stream:
            tokens += item[1].n_tokens
            bar.update(1)
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tok/s")
            yield item
    finally:
        bar.close()


def _print_summary(db: ProfileStore, info: RunInfo, seconds: float) -> None:
    """The per-layer table of one run at its primary alpha, under a one-line header."""
    rows = db.query("mean_profile", run_id=info.run_id, alpha=info.alphas[0]).to_pylist()
    counts = db.sql("SELECT count(*) AS n, coalesce(sum(n_tokens), 0)::BIGINT AS t FROM prompts "
                    "WHERE run_id = $run", {"run": info.run_id}).to_pylist()[0]
    mode = f"{info.max_new_tokens} new tokens" if info.max_new_tokens else "text mode"
    rate = f" ({counts['t'] / seconds:,.0f} tok/s)" if seconds > 0 else ""
    print(f"\n{info.model} | run {info.run_id} | {counts['n']} prompts, {counts['t']} tokens "
          f"({mode}) | alpha={_fmt_alpha(info.alphas[0])} (nats) | {len(rows)} layers | "
          f"{seconds:.1f} s{rate}")
    columns = ("layer", "mean", "std", "min", "q25", "median", "q75", "max")
    print(_format_table([{c: row[c] for c in columns} for row in rows], columns))


def _fmt_alpha(alpha: float) -> str:
    return "inf" if math.isinf(alpha) else f"{alpha:g}"


def _plot_runs(db: ProfileStore, infos: Sequence[RunInfo], path: Path) -> None:
    """PNG, one panel per run: `viz.plot_aggregated` at the run's primary alpha.

    The panels are drawn from the store's per-prompt mean profiles (the `prompt_profile`
    view; one row of n_layers per prompt, which is all plot_aggregated draws), so memory
    does not grow with the corpus's token count.
    """
    import matplotlib.pyplot as plt

    from entropy_fast.viz import plot_aggregated

    figure, axes = plt.subplots(len(infos), 1, figsize=(8, 4.2 * len(infos)), squeeze=False)
    try:
        for info, ax in zip(infos, axes[:, 0], strict=True):
            aggregated = _prompt_means(db, info, info.alphas[0])
            plot_aggregated(aggregated, ax=ax, show_prompts=len(aggregated) <= 100)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    finally:
        plt.close(figure)


def _prompt_means(db: ProfileStore, info: RunInfo, alpha: float) -> AggregatedProfile:
    """The run's per-prompt mean profiles, each as a one-row EntropyProfile."""
    import torch

    table = db.sql("SELECT prompt_id, list(mean_entropy ORDER BY layer) AS means, "
                   "list(layer ORDER BY layer) AS layers FROM prompt_profile "
                   "WHERE run_id = $run AND alpha = $alpha GROUP BY prompt_id "
                   "ORDER BY prompt_id", {"run": info.run_id, "alpha": alpha}).to_pylist()
    profiles = [EntropyProfile(entropy=torch.tensor([row["means"]]), token_ids=torch.zeros(1),
                               layer_indices=row["layers"], alpha=alpha, model_name=info.model,
                               metadata={"prompt_id": row["prompt_id"],
                                         "note": "per-prompt mean profile from the store"})
                for row in table]
    return AggregatedProfile(profiles, model_name=info.model)


def _plot_means(db: ProfileStore, infos: Sequence[RunInfo], path: Path, alpha: float) -> None:
    """PNG of several runs' mean profiles across prompts (± 1 std) on one Axes."""
    curves = {}
    for info in infos:
        rows = db.query("aggregated_profile", run_id=info.run_id, alpha=alpha).to_pydict()
        curves[info.model] = (rows["layer"], rows["mean"], rows["std"])
    _plot_curves(curves, path, f"mean entropy across prompts (± 1 std), "
                               f"alpha={_fmt_alpha(alpha)}")


def _plot_curves(curves: dict[str, tuple[list[int], list[float], list[float]]], path: Path,
                 title: str) -> None:
    """Draw mean ± std curves; x is the layer, or relative depth when depths differ."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    relative = len({max(layers, default=0) for layers, _, _ in curves.values()}) > 1
    for label, (layers, mean, std) in curves.items():
        x = np.asarray(layers, dtype=float)
        x = x / max(x.max(), 1) if relative else x
        mean, std = np.asarray(mean), np.asarray(std)
        axes.plot(x, mean, marker="o", markersize=3, label=label)
        axes.fill_between(x, mean - std, mean + std, alpha=0.2)
    if not relative:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("relative depth (layer / last layer)" if relative else
                    "layer (hidden-state index; 0 = embeddings)")
    axes.set_ylabel("entropy (nats)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


# -- query --------------------------------------------------------------------------------


def _add_query(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE")
    p.add_argument("query", metavar="NAME_OR_SQL",
                   help="a named query (see `entropy-fast queries`) or SQL over the views "
                        "entropy, prompts, runs, manifest, prompt_profile, continuations, "
                        "generations")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="a query parameter, repeatable; lists comma-separated")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--max-rows", type=int, default=100,
                   help="rows shown by --format table (all rows go to the other formats)")


def cmd_query(args: argparse.Namespace) -> int:
    """Run a named query or SQL over a store and print or write the result.

    Named queries take parameters with --param name=value; SQL text may use $name
    placeholders, bound from --param (never pasted into the SQL).
    """
    if args.format == "parquet" and not args.output:
        raise ValueError("--format parquet needs --output FILE")
    params = _parse_params(args.param)
    with ProfileStore(args.store) as db:
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
            raise QueryError(f"--param must look like name=value, got {item!r}")
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


def _write_result(table: pa.Table, fmt: str, output: str | None, max_rows: int) -> None:
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


def _format_csv(table: pa.Table) -> str:
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


def _add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE")
    p.add_argument("--models", nargs="+", metavar="MODEL", help="only these models")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="these runs (default: the latest "
                   "complete run of each model)")
    p.add_argument("--alpha", type=float, default=1.0, help="Rényi order to compare")
    p.add_argument("--metric", choices=("jsd", "wasserstein"), default="jsd",
                   help="per-layer distance, averaged over matched layers")
    p.add_argument("--bin-width", type=float, default=0.25,
                   help="histogram bin width in nats (jsd; bins anchored at 0)")
    p.add_argument("--plot", metavar="PATH", default="compare.png",
                   help="PNG of the models' mean profiles (default: compare.png)")
    p.add_argument("--no-plot", action="store_true", help="draw no plot")


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare many models profiled over one corpus: a distance matrix and a plot.

    Distances are between the models' pooled per-token entropy distributions at matched
    layers (nearest relative depth), averaged over layers: histogram JSD (nats) or exact
    Wasserstein-1 (see docs/store.md).
    """
    with ProfileStore(args.store) as db:
        runs = _choose_runs(db.store.runs(), args.models, args.runs)
        lacking = [r.run_id for r in runs if args.alpha not in r.alphas]
        if lacking:
            raise StoreError(f"runs {', '.join(lacking)} have no alpha={args.alpha}")
        corpora = {r.corpus_sha256 for r in runs}
        if len(corpora) > 1:
            print("note: these runs profiled different corpora", file=sys.stderr)
        rows = db.query("model_distances", alpha=args.alpha, metric=args.metric,
                        bin_width=args.bin_width, runs=[r.run_id for r in runs]).to_pylist()
        models = sorted({r.model for r in runs})
        print(f"{args.metric} distance, alpha={_fmt_alpha(args.alpha)}, mean over matched "
              f"layers; runs: {', '.join(f'{r.model}={r.run_id}' for r in runs)}")
        matrix = {(r["model_a"], r["model_b"]): r["distance"] for r in rows}
        table = [{"model": a, **{b: matrix.get((a, b)) for b in models}} for a in models]
        print(_format_table(table, ["model", *models]))
        if not args.no_plot:
            _plot_means(db, runs, Path(args.plot), args.alpha)
            print(f"plot: {args.plot}")
    return 0


def _choose_runs(records: list[RunInfo], models: list[str] | None,
                 run_ids: list[str] | None) -> list[RunInfo]:
    """One record per chosen run: given ids, else each model's latest complete run."""
    by_run = {r.run_id: r for r in records}
    if run_ids:
        unknown = [r for r in run_ids if r not in by_run]
        if unknown:
            raise StoreError(f"no run {', '.join(unknown)} in the store")
        chosen = [by_run[r] for r in run_ids]
    else:
        latest: dict[str, RunInfo] = {}
        for r in sorted(by_run.values(), key=lambda r: (r.status == "complete", r.updated_at)):
            latest[r.model] = r
        chosen = list(latest.values())
    chosen = [r for r in chosen if models is None or r.model in models]
    if not chosen:
        raise StoreError("no runs to compare" + (f" for models {models}" if models else ""))
    return sorted(chosen, key=lambda r: r.model)


# -- info, check, queries -----------------------------------------------------------------


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE")


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a store: size, runs and generation stages with their settings and progress."""
    store = Store(args.store)
    entries = store.manifest()
    size = sum(f.stat().st_size for f in store.root.rglob("*") if f.is_file())
    print(f"store {store.root} | schema {SCHEMA_VERSION} | {size / 2**20:.1f} MiB | "
          f"{len(entries)} parts | {sum(e.n_rows for e in entries):,} rows")
    rows = []
    for info in store.runs():
        mine = _entries_of(entries, info)
        rows.append({
            **_shard_columns(info, mine, "run"),
            "tokens": sum(e.n_tokens for e in mine), "rows": sum(e.n_rows for e in mine),
            "alphas": ",".join(_fmt_alpha(a) for a in info.alphas),
            "layers": len(info.layer_indices or []), "new_tokens": info.max_new_tokens,
            "dtype": info.dtype, "updated": info.updated_at})
    print(_format_table(rows, list(rows[0]) if rows else ["model"]))
    _print_generations(store)
    return 0


def _entries_of(entries: list, info) -> list:
    """The committed parts of one run or generation shard."""
    return [e for e in entries if e.run_id == info.run_id and e.shard == info.shard]


def _shard_columns(info, mine: list, id_column: str) -> dict:
    """Identity and progress columns shared by the run and generation tables of `info`."""
    return {"model": info.model, id_column: info.run_id, "shard": info.shard_key,
            "status": info.status,
            "prompts": f"{sum(e.n_prompts for e in mine)}/{len(info.prompt_ids)}"}


def _print_generations(store: Store) -> None:
    """The store's generation stages, one row per shard (nothing when there are none)."""
    entries = store.entries(GENERATION)
    rows = []
    for info in store.generations():
        mine = _entries_of(entries, info)
        rows.append({
            **_shard_columns(info, mine, "generation"),
            "new_tokens": sum(e.n_tokens for e in mine), "generator": info.generator,
            "max_new_tokens": info.max_new_tokens, "sampling": _sampling_text(info.settings),
            "dtype": info.dtype, "updated": info.updated_at})
    if rows:
        print(f"\ngeneration stages ({len(entries)} parts; `profile` with the same settings "
              "uses them):")
        print(_format_table(rows, list(rows[0])))


def _sampling_text(settings: dict[str, Any]) -> str:
    if not settings.get("do_sample"):
        return "greedy"
    return (f"T={settings.get('temperature')},top_p={settings.get('top_p')},"
            f"seed={settings.get('seed')}")


def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE")


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a store: manifest against files, row counts against token counts, NaN/inf.

    Exit status 0 when the store is sound, 1 when a problem was found.
    """
    problems, notes = check_store(args.store)
    for note in notes:
        print(f"note: {note}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"{args.store}: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def _add_queries(p: argparse.ArgumentParser) -> None:
    del p  # no options


def cmd_queries(args: argparse.Namespace) -> int:
    """List the named queries and their parameters."""
    del args
    for query in named_queries().values():
        print(f"{query.name}: {query.description}")
        for param in query.params:
            default = "required" if param.required else f"default {param.default!r}"
            print(f"    {param.name} ({param.type}, {default}) {param.help}")
    return 0


COMMANDS = {"profile": cmd_profile, "generate": cmd_generate, "query": cmd_query,
            "compare": cmd_compare, "info": cmd_info, "check": cmd_check, "queries": cmd_queries}


if __name__ == "__main__":
    sys.exit(main())
