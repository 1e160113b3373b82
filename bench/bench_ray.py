"""Benchmark of the Ray engine against the single-process run, on the same machine and corpus.

Profiles one corpus (default 2,000 prompts: the bundled sample corpus's 42 prompts, each
with a number appended; text mode; ~11 tokens each) into fresh stores with:

- `local`: `profile_corpus` in this process (torch threads = the machine's cores);
- `ray1`: `profile_corpus(engine=RayEngine(workers=1, cpus_per_worker=cores))`;
- `ray2`: two actors with cores / 2 CPUs (torch threads) each;

each configuration in a fresh Python process, interleaved over the repeats (the machine
is shared; see bench/RESULTS.md). A Ray process starts its private local cluster first
(`distributed.ray_cluster`: loopback, no dashboard, the cores plus one logical CPU per
actor and one more); its wall time is reported with and without that start, since
joining a running cluster (`--ray-address auto`) skips it. Reported per run: end-to-end
wall seconds (model loading included), the CPU seconds used by the process and every
process it started (for Ray: raylet, GCS, workers and actors; sampled every 0.25 s, so a
process's last 0.25 s may be missed; less sensitive than wall time to other jobs on a
shared machine), the driver's peak RSS, the peak RSS summed over
the driver and every process it started (raylet, GCS, workers; an upper bound, shared
pages count twice), and the largest |entropy| difference from the local store of the
same repeat (keys must be equal).

    python bench/bench_ray.py                           # 'mid' random Llama, layer stride 3
    python bench/bench_ray.py --model tiny --repeats 1  # the tests' tiny Llama: fixed costs
    python bench/bench_ray.py --model smollm2-135m --layer-stride 30
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

MODES = ("local", "ray2", "ray1")


def make_corpus(path: Path, n_prompts: int) -> None:
    """n_prompts lines from the bundled sample corpus, each made unique by a suffix."""
    from entropy_fast.data import sample_corpus_path

    base = [line for line in sample_corpus_path().read_text().splitlines() if line.strip()]
    path.write_text("\n".join(f"{base[i % len(base)]} {i}" for i in range(n_prompts)) + "\n")


def make_model(kind: str, folder: Path) -> str:
    """A random-weight Llama saved with a tokenizer: 'tiny' (the tests' model: d=48, 3
    layers, V=211, characters) or 'mid' (d=384, 6 layers, SmolLM2's tokenizer and
    vocabulary of 49,152: the lens dominates, as in real models)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.tiny_models import tiny_model, tiny_tokenizer

        model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    else:
        from entropy_fast.models import load_tokenizer_and_config

        tokenizer, _ = load_tokenizer_and_config("smollm2-135m")
        torch.manual_seed(0)
        config = AutoConfig.for_model(
            "llama", vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1024,
            num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
            max_position_embeddings=2048, initializer_range=0.1, tie_word_embeddings=True)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


class TreeMonitor:
    """Samples this process and all its descendants (psutil): the peak of their summed RSS,
    and the CPU time (user + system) each used, as last seen, summed at the end."""

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        self.root, self.interval = psutil.Process(), interval
        self.peak_rss = 0
        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for proc in [self.root, *self.root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a process that just ended
                    total += proc.memory_info().rss
                    times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
                    title = _process_title(proc)  # a worker becomes an actor, runs tasks
                    if title != "ray::IDLE" or proc.pid not in self.names:
                        self.names[proc.pid] = title
            self.peak_rss = max(self.peak_rss, total)
            self._stop.wait(self.interval)

    def stop(self) -> tuple[int, float]:
        """(peak summed RSS in bytes, CPU seconds of every process seen)."""
        self._stop.set()
        self._thread.join()
        return self.peak_rss, sum(self.cpu.values())

    def cpu_by_title(self) -> dict[str, float]:
        """CPU seconds per process title (Ray names its processes: ray::IDLE, raylet, ...),
        the largest first."""
        totals: dict[str, float] = {}
        for pid, seconds in self.cpu.items():
            title = "driver" if pid == self.root.pid else self.names.get(pid, "?")
            totals[title] = totals.get(title, 0.0) + seconds
        return dict(sorted(totals.items(), key=lambda item: -item[1]))


def _process_title(proc: Any) -> str:
    """A short name for a process: its title (Ray sets ray::<task or actor>), else its
    executable's name, without arguments and paths."""
    argv = proc.cmdline()
    title = (argv[0] if argv else proc.name()).split(" ")[0]
    if title.endswith(("python", "python3")) and len(argv) > 1:
        # Ray's python daemons (log monitor, agents) and workers not yet named
        title = Path(next((a for a in argv[1:] if not a.startswith("-")), argv[1])).name
    title = re.sub(r"\)\.\w+$", ")", title)  # ray::Actor(...).method -> ray::Actor(...)
    return Path(title).name[:48] if "/" in title else title[:48]


def run_one(mode: str, model: str, corpus: str, store: str, stride: int) -> dict:
    """One configuration in this (fresh) process; the figures as a dict."""
    import torch

    from entropy_fast.pipeline import profile_corpus

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    monitor = TreeMonitor()
    start = time.perf_counter()
    engine: Any = "local"
    cluster: Any = contextlib.nullcontext()
    if mode != "local":
        from entropy_fast.distributed import RayEngine, ray_cluster

        workers = int(mode.removeprefix("ray"))
        engine = RayEngine(workers=workers, cpus_per_worker=max(1, cores // workers))
        cluster = ray_cluster(engine)  # the private cluster `--ray` starts for itself
    with cluster:
        init_s = time.perf_counter() - start
        (result,) = profile_corpus(model, corpus, store, max_new_tokens=0,
                                   layer_stride=stride, engine=engine)
    wall_s = time.perf_counter() - start
    peak_rss, cpu_s = monitor.stop()
    return {"mode": mode, "wall_s": wall_s, "init_s": init_s, "profile_s": result.seconds,
            "prompts": result.prompts, "tokens": result.tokens, "cpu_s": cpu_s,
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tree_peak_rss_mb": peak_rss / 2**20,
            "cpu_s_by_process": {k: round(v, 1) for k, v in monitor.cpu_by_title().items()}}


def compare(store: str, reference: str) -> float:
    """Largest |entropy| difference between two stores of one run; keys must be equal."""
    import numpy as np

    from entropy_fast.store.sql import ProfileStore

    query = ("SELECT prompt_id, pos, layer, alpha, token_id, entropy FROM entropy "
             "ORDER BY prompt_id, pos, layer, alpha")
    with ProfileStore(store) as a, ProfileStore(reference) as b:
        left, right = a.sql(query), b.sql(query)
    if not left.drop(["entropy"]).equals(right.drop(["entropy"])):
        raise AssertionError(f"{store} and {reference} hold different keys or tokens")
    return float(np.abs(left["entropy"].to_numpy() - right["entropy"].to_numpy()).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--model", default="mid",
                        help="'mid' or 'tiny' (random Llamas, see make_model), or an alias "
                             "or folder (smollm2-135m: ~4x the work of 'mid')")
    parser.add_argument("--layer-stride", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--one", nargs=4, metavar=("MODE", "MODEL", "CORPUS", "STORE"),
                        help=argparse.SUPPRESS)  # a child process: one configuration
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.layer_stride)))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        corpus = work / "corpus.txt"
        make_corpus(corpus, args.prompts)
        model = (make_model(args.model, work / args.model) if args.model in ("tiny", "mid")
                 else args.model)
        rows = []
        for repeat in range(args.repeats):
            for mode in args.modes:
                store = work / f"{mode}-{repeat}"
                done = subprocess.run(
                    [sys.executable, __file__, "--layer-stride", str(args.layer_stride),
                     "--one", mode, model, str(corpus), str(store)],
                    capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row.update(repeat=repeat, model=args.model, load=os.getloadavg()[0])
                if mode != "local" and "local" in args.modes:
                    row["max_abs_diff"] = compare(store, str(work / f"local-{repeat}"))
                rows.append(row)
                print(json.dumps(row), flush=True)
        report(rows, args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    import ray
    import torch

    print(f"\n{date.today()} | {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores | torch {torch.__version__} | ray {ray.__version__} | "
          f"{args.model}, layer stride {args.layer_stride}, {args.prompts} prompts, text mode")
    print("| repeat | mode | wall s | of which cluster start s | wall without start s "
          "| vs local | CPU s | vs local | driver peak RSS MB | all processes peak RSS MB "
          "| max abs diff | load |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    local = {r["repeat"]: r for r in rows if r["mode"] == "local"}
    for r in rows:
        without = r["wall_s"] - r["init_s"]
        base = local.get(r["repeat"])
        wall = f"{without / base['wall_s']:.2f}x" if base else "-"
        cpu = f"{r['cpu_s'] / base['cpu_s']:.2f}x" if base else "-"
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        print(f"| {r['repeat']} | {r['mode']} | {r['wall_s']:.1f} | {r['init_s']:.1f} | "
              f"{without:.1f} | {wall} | {r['cpu_s']:.0f} | {cpu} | "
              f"{r['driver_peak_rss_mb']:.0f} | {r['tree_peak_rss_mb']:.0f} | {diff} | "
              f"{r['load']:.1f} |")


if __name__ == "__main__":
    main()
