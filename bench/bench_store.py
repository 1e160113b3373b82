"""Benchmark of the profile store: write throughput, size, and named queries vs pyarrow+numpy.

Writes a synthetic store (default 50 million rows: 4 models x 33 layers x ~379k tokens,
one alpha) through `RunWriter`, exactly as `entropy-fast profile --out` does, then times
mean_profile, layer_jsd, layer_wasserstein and model_distances (both metrics) in DuckDB
beside the same computation done with pyarrow (reading the committed files) and numpy
/ scipy in the same run, and checks that both give the same numbers.

Entropies are realistic in shape, not uniform noise: each model has a smooth mean curve
over depth and tokens scatter around it (gamma-distributed), stored as float32.

    python bench/bench_store.py                     # 50M rows, prints a Markdown table
    python bench/bench_store.py --rows 2000000      # a quick run
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from scipy.stats import wasserstein_distance

from entropy_fast.corpus import Corpus, Prompt
from entropy_fast.profile import EntropyProfile
from entropy_fast.settings import LensSettings, SamplingSettings
from entropy_fast.store import RunInfo, Store
from entropy_fast.store.sql import ProfileStore

BIN_WIDTH = 0.25


def synthetic_profiles(model: int, corpus: Corpus, n_tokens: int, layers: list[int],
                       seed: int) -> Iterator[tuple[Prompt, EntropyProfile]]:
    """(prompt, profile) with entropy = curve(layer) * Gamma(4, 1/4) noise, float32."""
    rng = np.random.default_rng(seed)
    depth = np.asarray(layers) / layers[-1]
    curve = 1.0 + 6.0 * np.exp(-((depth - 0.35 - 0.08 * model) ** 2) / 0.08) + 2.0 * depth
    for prompt in corpus.prompts:
        noise = rng.gamma(4.0, 0.25, size=(n_tokens, len(layers)))
        entropy = torch.from_numpy((curve * noise).astype(np.float32))
        token_ids = torch.from_numpy(rng.integers(0, 50_000, n_tokens))
        yield prompt, EntropyProfile(entropy=entropy, token_ids=token_ids,
                                     layer_indices=layers, model_name=f"model-{model}",
                                     metadata={"prompt_token_ids": [1, 2, 3]})


def write_store(root: Path, n_models: int, n_prompts: int, n_tokens: int,
                layers: list[int]) -> float:
    """Write every model's run; returns the seconds spent (generation excluded)."""
    corpus = Corpus.from_texts([f"synthetic prompt {i}" for i in range(n_prompts)])
    store = Store(root, create=True)
    seconds = 0.0
    for model in range(n_models):
        info = RunInfo(model=f"model-{model}", corpus="synthetic",
                       corpus_sha256=corpus.fingerprint, n_prompts=len(corpus),
                       lens=LensSettings(), sampling=SamplingSettings(n_tokens),
                       dtype="bfloat16", generator="hf")
        items = list(synthetic_profiles(model, corpus, n_tokens, layers, seed=model))
        start = time.perf_counter()
        with store.writer(info) as writer:
            for prompt, profile in items:
                writer.add(prompt, profile)
        seconds += time.perf_counter() - start
        del items
    return seconds


# -- pyarrow + numpy baselines ------------------------------------------------------------


def read_model(store: Store, model: str) -> dict[int, np.ndarray]:
    """{layer: float64 entropies} of one model, read from its committed files."""
    files = [store.root / e.entropy_file for e in store.manifest() if e.model == model]
    table = pq.read_table(files, columns=["layer", "entropy", "alpha"])
    layer = table.column("layer").to_numpy()
    entropy = table.column("entropy").to_numpy().astype(np.float64)
    order = np.argsort(layer, kind="stable")
    bounds = np.flatnonzero(np.diff(layer[order])) + 1
    groups = np.split(order, bounds)
    return {int(layer[g[0]]): entropy[g] for g in groups}


def np_mean_profile(store: Store, models: list[str]) -> list[dict]:
    rows = []
    for model in models:
        for layer, x in read_model(store, model).items():
            q = np.percentile(x, [5, 25, 50, 75, 95])
            rows.append({"model": model, "layer": layer, "n": x.size, "mean": x.mean(),
                         "std": x.std(ddof=1), "min": x.min(), "q05": q[0], "median": q[2],
                         "q95": q[4], "max": x.max()})
    return rows


def np_jsd(x: np.ndarray, y: np.ndarray) -> float:
    bx, by = np.floor(x / BIN_WIDTH).astype(np.int64), np.floor(y / BIN_WIDTH).astype(np.int64)
    lo = min(bx.min(), by.min())
    size = max(bx.max(), by.max()) - lo + 1
    p = np.bincount(bx - lo, minlength=size) / x.size
    q = np.bincount(by - lo, minlength=size) / y.size
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / m), 0) + np.where(q > 0, q * np.log(q / m), 0)
    return float(terms.sum() / 2)


def np_layers(store: Store, a: str, b: str, distance: Callable) -> list[float]:
    xa, xb = read_model(store, a), read_model(store, b)
    return [distance(xa[layer], xb[layer]) for layer in sorted(xa)]


def np_model_distances(store: Store, models: list[str], distance: Callable) -> dict:
    data = {m: read_model(store, m) for m in models}
    return {(a, b): float(np.mean([distance(data[a][lay], data[b][lay]) for lay in data[a]]))
            for a, b in itertools.combinations(models, 2)}


# -- driver -------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def max_gap(a: list[float], b: list[float]) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))))


def run_queries(root: Path, models: list[str]) -> list[tuple[str, float, float, float]]:
    """(query, duckdb seconds, numpy seconds, max |difference|) per query."""
    store = Store(root)
    db = ProfileStore(root)
    a, b = models[0], models[1]
    results = []

    t_sql, sql = timed(lambda: db.query("mean_profile").to_pylist())
    t_np, ref = timed(lambda: np_mean_profile(store, models))
    gap = max(max_gap([r[k] for r in sql], [r[k] for r in ref])
              for k in ("mean", "std", "q05", "median", "q95"))
    results.append(("mean_profile (n, mean, std, min, 5 quantiles, max)", t_sql, t_np, gap))

    for name, column, distance in (("layer_jsd", "jsd", np_jsd),
                                   ("layer_wasserstein", "wasserstein", wasserstein_distance)):
        t_sql, sql = timed(lambda n=name: db.query(n, model_a=a, model_b=b))
        t_np, ref = timed(lambda d=distance: np_layers(store, a, b, d))
        results.append((f"{name} (2 models)", t_sql, t_np,
                        max_gap(sql.column(column).to_pylist(), ref)))

    for metric, distance in (("jsd", np_jsd), ("wasserstein", wasserstein_distance)):
        t_sql, sql = timed(lambda m=metric: db.query("model_distances", metric=m).to_pylist())
        t_np, ref = timed(lambda d=distance: np_model_distances(store, models, d))
        got = {(r["model_a"], r["model_b"]): r["distance"] for r in sql}
        results.append((f"model_distances {metric} ({len(models)} models, "
                        f"{len(ref)} pairs)", t_sql, t_np,
                        max_gap([got[k] for k in ref], list(ref.values()))))
    db.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--layers", type=int, default=33, help="profiled hidden states")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--dir", help="where to build the store (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = parser.parse_args()
    layers = list(range(args.layers))
    n_prompts = -(-args.rows // (args.models * args.layers * args.tokens))
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-store-")) / "store"
    try:
        write_s = write_store(root, args.models, n_prompts, args.tokens, layers)
        n_rows = sum(e.n_rows for e in Store(root).manifest())
        size = sum(p.stat().st_size for p in (root / "entropy").rglob("*.parquet"))
        results = run_queries(root, [f"model-{m}" for m in range(args.models)])
    finally:
        if not args.keep:
            shutil.rmtree(root.parent if not args.dir else root, ignore_errors=True)
    threads = duckdb.sql("SELECT current_setting('threads')").fetchall()[0][0]
    print(f"## Profile store benchmark ({date.today()})\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"(DuckDB threads: {threads}); duckdb {duckdb.__version__}, "
          f"pyarrow {pa.__version__}, numpy {np.__version__}.\n")
    print(f"Store: {n_rows:,} rows ({args.models} models x {args.layers} layers x "
          f"{n_prompts:,} prompts x {args.tokens} tokens, 1 alpha), "
          f"{size / 2**20:,.1f} MiB of entropy parts = {size / n_rows * 1e6 / 2**20:.2f} MiB "
          f"per million rows ({size / n_rows:.2f} bytes/row); written in {write_s:.1f} s = "
          f"{n_rows / write_s / 1e6:.2f} M rows/s (EntropyProfile -> committed Parquet).\n")
    print("| query | DuckDB (s) | pyarrow + numpy (s) | speed-up | max abs difference |")
    print("|---|---:|---:|---:|---:|")
    for name, t_sql, t_np, gap in results:
        print(f"| {name} | {t_sql:.2f} | {t_np:.2f} | {t_np / t_sql:.1f}x | {gap:.1e} |")


if __name__ == "__main__":
    main()
