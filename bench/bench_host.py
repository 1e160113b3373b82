"""Benchmark of the host side of a store run: everything but the device, at device speed.

The real pipeline runs (`profile_corpus`: corpus file -> tokenize -> length buckets ->
device stage -> statistics -> rows -> committed, checksummed parts), with the device
stage (`EntropyProfiler._forward`: the teacher-forced forward and the lens) replaced by a
stub that returns statistics of the right shapes after a set device time. The stub lives
here only; it is never a user option.

Three modes: "host" (stub, device time 0), "goal" (stub at the GPU goal rate) and "real"
(the real tiny Llama, d=48, V=211, its 12 blocks replaced by a cheap shift, so that the
forward and the lens run for real but cost little). Two workloads, text mode, alpha = 1:

- long: 13 states (a GPT-2-124M-shaped layer count), 512-token prompts;
- short: 32-token prompts, the same 13 states.

For each, with device time 0 (host capacity: tokens/s, rows/s, prompts/s and the cores the
process used) and with the device at the GPU goal (250k tok/s for the GPT-2 shape:
end-to-end against the device rate, over the whole call and, in parentheses, over its run
loop alone: start-up, tokenizing and opening the store excluded), beside one bare pyarrow
write of the same
long-format rows with the store's Parquet options, in the same process (the ratio is what
matters on a noisy machine).

    python bench/bench_host.py                       # both workloads, prints a Markdown table
    python bench/bench_host.py --json out.json --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from entropy_fast.pipeline import profile_corpus  # noqa: E402
from entropy_fast.profiler import EntropyProfiler  # noqa: E402
from entropy_fast.store import layout  # noqa: E402
from entropy_fast.store import writer as writer_module  # noqa: E402
from entropy_fast.store.schema import ENTROPY_SCHEMA  # noqa: E402
from entropy_fast.store.writer import _ENTROPY_OPTIONS  # noqa: E402
from tests.tiny_models import tiny_model, tiny_tokenizer  # noqa: E402

try:
    from entropy_fast.profiler import ProfiledBatch
except ImportError:
    ProfiledBatch = None

N_BLOCKS = 12  # 13 hidden states, as GPT-2-124M
GOAL_TOKENS_PER_SECOND = 250_000.0


@dataclass
class Workload:
    name: str
    n_prompts: int
    n_rows: int  # profiled tokens per prompt (text mode: the text's tokens 1..T-1)


MODES = ("host", "goal", "real", "slow disk")
"""Device stub at 0 s, at the goal rate, the real model with near-free blocks, a slow disk."""
WORKLOADS = {"long": Workload("long", 1000, 512), "short": Workload("short", 20_000, 32)}


class StubDevice:
    """Stands in for `EntropyProfiler._forward`: sleeps `seconds_per_row` per profiled
    token (the device's time, during which the host is free), then returns statistics of
    the right shapes from a buffer made once (no host work that a device would not cause)."""

    def __init__(self, n_layers: int, n_alphas: int, seconds_per_row: float) -> None:
        self.seconds_per_row = seconds_per_row
        self.buffer = torch.rand(1 << 17, n_layers, n_alphas) * 5
        self.rows = 0

    def __call__(self, profiler: EntropyProfiler, batch, keep_states=False):
        n_rows = sum(s.n_rows for s in batch)
        self.rows += n_rows
        if self.seconds_per_row:
            time.sleep(n_rows * self.seconds_per_row)
        columns = {"entropy": self.buffer[:n_rows], "top_token": None,
                   "target_surprisal": None, "target_rank": None}
        if ProfiledBatch is None:  # the tree before the batch path: (columns, states)
            return columns, None
        return ProfiledBatch(list(batch), columns)


def write_corpus(folder: Path, workload: Workload) -> Path:
    """A .txt corpus of distinct prompts of n_rows + 1 characters (one token each)."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    path = folder / f"{workload.name}.txt"
    with open(path, "w") as handle:
        for _ in range(workload.n_prompts):
            handle.write("".join(rng.choice(letters, workload.n_rows + 1)) + "\n")
    return path


def save_model(folder: Path) -> Path:
    path = folder / "model"
    tiny_model("llama", num_hidden_layers=N_BLOCKS, max_position_embeddings=1024
               ).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Shift(torch.nn.Module):
    """A decoder block that costs next to nothing: its input, shifted."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + 0.01


class PeakMemory:
    """The largest resident set of this process while it is entered, sampled every 5 ms
    (ru_maxrss cannot be reset between runs of one process)."""

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = rss_mb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, rss_mb())


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def slow_disk(seconds_per_part: float):
    """Every committed file takes `seconds_per_part` longer to write (a slow disk)."""
    if not seconds_per_part:
        yield
        return
    original = layout.write_atomic

    def slow(*args, **kwargs):
        time.sleep(seconds_per_part)
        return original(*args, **kwargs)

    writer_module.write_atomic = slow
    try:
        yield
    finally:
        writer_module.write_atomic = original


def store_run(model: Path, corpus: Path, store: Path, seconds_per_row: float | None,
              seconds_per_part: float = 0.0, threads: int = 1) -> dict:
    """One profile_corpus run into a fresh store; its figures. seconds_per_row: the stub
    device's time per row, or None for the real model with its blocks replaced by `Shift`
    (the forward and the lens then run for real, on this CPU); seconds_per_part: a slow
    disk's extra time per file written; threads: torch's threads."""
    profiler = EntropyProfiler(str(model), threads=threads)
    stub = StubDevice(len(profiler.layer_indices), 1, seconds_per_row or 0.0)
    if seconds_per_row is None:
        for k in range(len(profiler.layers)):
            profiler.layers[k] = Shift()
    else:
        profiler._forward = lambda batch, keep_states=False: stub(profiler, batch, keep_states)
    cpu, start = cpu_seconds(), time.perf_counter()
    with PeakMemory() as memory, slow_disk(seconds_per_part):
        (result,) = profile_corpus(profiler, corpus, store, max_new_tokens=0,
                                   part_rows=1 << 18 if seconds_per_part else 1 << 20)
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
    rows = result.tokens * len(profiler.layer_indices)
    return {"seconds": wall, "loop_seconds": result.seconds, "prompts": result.prompts,
            "tokens": result.tokens, "rows": rows, "tokens_per_s": result.tokens / wall,
            "rows_per_s": rows / wall, "prompts_per_s": result.prompts / wall,
            "cores_used": cpu / wall, "device_seconds": stub.rows * (seconds_per_row or 0.0),
            "peak_rss_growth_mb": memory.peak - memory.start}


def bare_write(n_rows: int, n_layers: int, folder: Path) -> float:
    """rows/s of one pq.write_table of n_rows long-format rows (the store's options)."""
    rng = np.random.default_rng(1)
    n_tokens = n_rows // n_layers
    columns = {
        "prompt_id": np.repeat(np.arange(n_tokens // 32, dtype=np.int32), 32 * n_layers)[:n_rows],
        "pos": np.tile(np.repeat(np.arange(32, dtype=np.int32), n_layers), n_tokens // 32 + 1
                       )[:n_rows],
        "token_id": np.repeat(rng.integers(0, 50_000, n_tokens).astype(np.int32), n_layers
                              )[:n_rows],
        "layer": np.tile(np.arange(n_layers, dtype=np.int16), n_tokens + 1)[:n_rows],
        "alpha": np.ones(n_rows),
        "entropy": (rng.random(n_rows, dtype=np.float32) * 5),
    }
    table = pa.table({f.name: columns.get(f.name, pa.nulls(n_rows, f.type))
                      for f in ENTROPY_SCHEMA}, schema=ENTROPY_SCHEMA)
    start = time.perf_counter()
    pq.write_table(table, folder / "bare.parquet", row_group_size=1 << 20, **_ENTROPY_OPTIONS)
    return n_rows / (time.perf_counter() - start)


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--device-rate", type=float, default=GOAL_TOKENS_PER_SECOND,
                        help="the device's tokens/s for the end-to-end runs")
    parser.add_argument("--slow-disk", type=float, default=0.2,
                        help="seconds a slow disk adds to each file written ('slow disk' "
                             "mode, parts of 2^18 rows: the device runs ahead of the disk)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's threads (the 'real' mode's forward and lens)")
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="bench-host-") as tmp:
        folder = Path(tmp)
        model = save_model(folder)
        # Once per process, not per row (pyarrow imports pandas at its first conversion
        # when installed, ~0.5 s): a small warm-up run pays it before anything is timed.
        store_run(model, write_corpus(folder, Workload("warm-up", 20, 32)), folder / "warm",
                  0.0)
        for name in args.workloads:
            workload = WORKLOADS[name]
            corpus = write_corpus(folder, workload)
            for repeat in range(args.repeat):
                for label in args.modes:
                    per_row, per_part = {"host": (0.0, 0.0), "goal": (1 / args.device_rate, 0.0),
                                         "real": (None, 0.0),
                                         "slow disk": (0.0, args.slow_disk)}[label]
                    store = folder / f"store-{name}-{label.replace(' ', '-')}-{repeat}"
                    figures = store_run(model, corpus, store, per_row, per_part, args.threads)
                    bare = bare_write(figures["rows"], N_BLOCKS + 1, folder)
                    figures.update(workload=name, mode=label, repeat=repeat,
                                   bare_rows_per_s=bare,
                                   vs_bare=figures["rows_per_s"] / bare,
                                   vs_device=(figures["device_seconds"] / figures["seconds"]
                                              if label == "goal" else None),
                                   loop_vs_device=(figures["device_seconds"]
                                                   / figures["loop_seconds"]
                                                   if label == "goal" else None))
                    rows_out.append(figures)
                    print(_line(figures), flush=True)
    meta = {"date": str(date.today()), "commit": commit(), "machine": platform.processor()
            or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "pyarrow": pa.__version__, "torch_threads": args.threads}
    print(json.dumps(meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))
    return 0


def _line(f: dict) -> str:
    device = (f"{f['vs_device']:.2f} ({f['loop_vs_device']:.2f})"
              if f["vs_device"] is not None else "-")
    return (f"| {f['workload']} | {f['mode']} | {f['tokens_per_s']:,.0f} | "
            f"{f['rows_per_s'] / 1e6:.2f} | {f['prompts_per_s']:,.0f} | "
            f"{f['cores_used']:.2f} | {f['bare_rows_per_s'] / 1e6:.2f} | {f['vs_bare']:.3f} | "
            f"{device} | {f['peak_rss_growth_mb']:.0f} |")


if __name__ == "__main__":
    raise SystemExit(main())
