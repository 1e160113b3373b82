"""What compiling the CPU lens statistics (`entropy.ChunkMoments`) costs and saves.

For one (rows x columns) float32 logit block of the lens's default shape it times, in
this process: the GEMM that makes the block (d = 768), the eager statistics
(`entropy._eager_chunk_moments`) and the compiled ones (`ChunkMoments`), best of
`--reps`. The first compiled call is timed in fresh processes: with the
inductor cache of this machine (warm after any earlier run) and with an empty one.

    python bench/bench_chunk_moments.py [--threads 1] [--rows 4096] [--columns 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
from bench_lens_cpu import best_of  # this folder is on sys.path when run as a script


def first_compiled_call_s(rows: int, columns: int) -> float:
    """In this (fresh) process: seconds of the first compiled call, imports excluded."""
    import torch._dynamo  # imported first: its import is not the compilation's cost

    from entropy_fast.entropy import ChunkMoments

    logits = torch.randn(rows, columns) * 3
    started = time.perf_counter()
    ChunkMoments(compile=True)(logits, ())
    return time.perf_counter() - started


def fresh_process_first_call(args, cache_dir: str | None) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if cache_dir is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    done = subprocess.run([sys.executable, __file__, "--first-call", "--rows", str(args.rows),
                           "--columns", str(args.columns), "--threads", str(args.threads)],
                          env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--columns", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--first-call", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.first_call:
        print(first_compiled_call_s(args.rows, args.columns))
        return

    from entropy_fast.entropy import ChunkMoments, _eager_chunk_moments

    torch.manual_seed(0)
    hidden, head = torch.randn(args.rows, 768), torch.randn(args.columns, 768)
    logits = torch.randn(args.rows, args.columns) * 3
    compiled = ChunkMoments(compile=True)
    row = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": args.threads, "rows": args.rows, "columns": args.columns,
           "gemm_ms": 1000 * best_of(lambda: hidden @ head.T, args.reps),
           "eager_ms": 1000 * best_of(lambda: _eager_chunk_moments(logits, ()), args.reps),
           "compiled_ms": 1000 * best_of(lambda: compiled(logits, ()), args.reps),
           "first_call_warm_cache_s": fresh_process_first_call(args, None)}
    with tempfile.TemporaryDirectory() as empty:
        row["first_call_empty_cache_s"] = fresh_process_first_call(args, empty)
    row["eager_over_compiled"] = row["eager_ms"] / row["compiled_ms"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
