"""Torch CPU threads on a machine shared with other work: --threads 1 against the default.

Profiles the same small generation workload (`profile_batch`, SmolLM2-135M, float32) with
torch's default thread count and with one thread, interleaved, both on a quiet machine and
with a competing process that keeps one core busy (what a CI runner or a second job does).
With every core claimed by torch, each parallel region waits for the thread whose core
is taken; one thread does not wait.

    python bench/bench_threads.py [--prompts 8] [--new-tokens 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import time
from contextlib import contextmanager

import torch


def spin(stop) -> None:  # a busy core, like another job's
    while not stop.is_set():
        pass


@contextmanager
def busy_core(enabled: bool):
    if not enabled:
        yield
        return
    stop = multiprocessing.Event()
    process = multiprocessing.Process(target=spin, args=(stop,))
    process.start()
    try:
        yield
    finally:
        stop.set()
        process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from entropy_fast import EntropyProfiler
    from entropy_fast.data import sample_prompts

    default_threads = torch.get_num_threads()
    profiler = EntropyProfiler("smollm2-135m", dtype="float32")
    prompts = sample_prompts()[: args.prompts]
    profiler.profile_batch(prompts[:2], 4)  # warm-up (and the CPU statistics' compilation)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}; {args.prompts} prompts x {args.new_tokens} new tokens")
    print("| extra load | load avg (1 min) at start | threads | median s | tok/s |")
    print("|---|---:|---:|---:|---:|")
    for busy in (False, True):
        times: dict[int, list[float]] = {default_threads: [], 1: []}
        load = os.getloadavg()[0]
        with busy_core(busy):
            for _ in range(args.repeat):
                for threads in times:
                    torch.set_num_threads(threads)
                    started = time.perf_counter()
                    profiler.profile_batch(prompts, args.new_tokens)
                    times[threads].append(time.perf_counter() - started)
        for threads, runs in times.items():
            seconds = statistics.median(runs)
            print(f"| {'one busy core' if busy else 'none'} | {load:.1f} | {threads} | "
                  f"{seconds:.2f} | {args.prompts * args.new_tokens / seconds:.1f} |")


if __name__ == "__main__":
    main()
