"""CPU benchmark of pairwise_distances: 2,000 synthetic profiles x 33 layers, every metric.

For each metric, the vectorized `pairwise_distances` on all profiles runs beside a naive
loop over pairs calling `profile_distance` (the library's one-pair function, same
definition). The loop runs on the first `--baseline-profiles` profiles only and is
extrapolated linearly in the number of pairs to N (N - 1) / 2; the output says so.
Synthetic profiles look like real ones: 32 tokens, entropy falling from ~8 to ~1.5 nats
with depth, per-token noise (sd 1) and a per-prompt offset (sd 0.5), clipped at 0.

Usage: python bench/bench_distances.py [--profiles 2000] [--layers 33] [--tokens 32]
           [--baseline-profiles 30] [--repeat 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import numpy as np
import torch

from entropy_fast.distances import METRICS, pairwise_distances, profile_distance
from entropy_fast.profile import EntropyProfile


def synthetic_profiles(n: int, n_layers: int, n_tokens: int, seed: int = 0,
                       ) -> list[EntropyProfile]:
    """n profiles (n_tokens x n_layers), as described in the module docstring."""
    rng = np.random.default_rng(seed)
    trend = np.linspace(8.0, 1.5, n_layers)
    profiles = []
    for _ in range(n):
        values = trend + rng.normal(0.0, 1.0, (n_tokens, n_layers)) + rng.normal(0.0, 0.5)
        profiles.append(EntropyProfile(torch.tensor(np.clip(values, 0.0, None),
                                                    dtype=torch.float32),
                                       torch.zeros(n_tokens, dtype=torch.int64),
                                       list(range(n_layers)), model_name="synthetic"))
    return profiles


def machine() -> dict:
    """CPU model, core count, load and library versions of this run."""
    model = next((line.split(":", 1)[1].strip() for line in
                  subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                  if line.startswith("Model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def time_pairwise(profiles: list[EntropyProfile], metric: str, repeat: int,
                  ) -> tuple[float, float]:
    """Median wall seconds and process CPU seconds (all threads) of pairwise_distances."""
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        pairwise_distances(profiles, metric)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def time_loop(profiles: list[EntropyProfile], metric: str) -> tuple[float, int]:
    """Seconds and pair count of the naive loop over the pairs of `profiles`."""
    start = time.perf_counter()
    n_pairs = 0
    for i in range(len(profiles)):
        for j in range(i + 1, len(profiles)):
            profile_distance(profiles[i], profiles[j], metric)
            n_pairs += 1
    return time.perf_counter() - start, n_pairs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=33)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--baseline-profiles", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)

    profiles = synthetic_profiles(args.profiles, args.layers, args.tokens)
    n_pairs = args.profiles * (args.profiles - 1) // 2
    results = {"machine": machine(), "profiles": args.profiles, "layers": args.layers,
               "tokens": args.tokens, "pairs": n_pairs, "metrics": {}}
    print(f"{results['machine']}\n{args.profiles} profiles x {args.layers} layers x "
          f"{args.tokens} tokens = {n_pairs} pairs\n")
    print("| metric | pairwise_distances_s (wall) | cpu_s (all threads) | "
          "naive_loop_s (wall, extrapolated) | speed-up (wall) |")
    print("|---|---:|---:|---:|---:|")
    for metric in METRICS:
        vectorized_s, cpu_s = time_pairwise(profiles, metric, args.repeat)
        loop_s, loop_pairs = time_loop(profiles[:args.baseline_profiles], metric)
        extrapolated_s = loop_s / loop_pairs * n_pairs
        results["metrics"][metric] = {"pairwise_distances_s": vectorized_s,
                                      "pairwise_distances_cpu_s": cpu_s,
                                      "naive_loop_s_measured": loop_s,
                                      "naive_loop_pairs_measured": loop_pairs,
                                      "naive_loop_s_extrapolated": extrapolated_s}
        print(f"| {metric} | {vectorized_s:.2f} | {cpu_s:.2f} | {extrapolated_s:.0f} "
              f"(from {loop_pairs} pairs) | {extrapolated_s / vectorized_s:.0f}x |", flush=True)
    results["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
