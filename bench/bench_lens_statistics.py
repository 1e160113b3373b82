"""Cost of the extra lens statistics against the entropies alone, same run (issue 23).

The real SmolLM2-135M's states (every hidden state of sample prompts, layer-major: the
layer groups `kl_to_final` needs) through `Lens.statistics` on the torch backend, four
ways, interleaved rep by rep so that drift hits all alike: entropies alone (Shannon),
+ KL to the final layer, + top-10 tokens, + both. Reports the median seconds of each and
its ratio to the entropies alone (goals: KL <= 1.25x, top-k <= 1.3x, both <= 1.5x).

Usage: python bench/bench_lens_statistics.py [--tokens 128] [--reps 5] [--threads N]
       [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from entropy_fast.profiler import EntropyProfiler

PROMPT = ("The history of the city goes back to a small settlement on the river, where "
          "traders met to exchange salt, grain and cloth. Over the centuries it grew into")
WAYS = {"entropy": {}, "kl": {"kl": True}, "top10": {"top_k": 10},
        "kl+top10": {"kl": True, "top_k": 10}}


def states(profiler: EntropyProfiler, tokens: int) -> torch.Tensor:
    """(layers * tokens x d) pre-norm states of every hidden state, layer-major."""
    ids = profiler.tokenize(PROMPT * 8)[: tokens + 1]
    _, kept = next(iter(profiler.profile_prompt_ids([ids], max_new_tokens=0,
                                                    keep_states=True)))[1:]
    return kept.reshape(-1, kept.shape[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    profiler = EntropyProfiler("smollm2-135m", threads=args.threads)
    rows = states(profiler, args.tokens)
    groups = len(profiler.layer_indices)
    lens = profiler.lens

    def run(kl: bool = False, top_k: int = 0) -> None:
        lens.statistics(rows, (1.0,), backend="torch", top_k=top_k,
                        kl_groups=groups if kl else 0)

    for options in WAYS.values():  # compile and warm every variant first
        run(**options)
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(args.reps):
        for name, options in WAYS.items():
            started = time.perf_counter()
            run(**options)
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["entropy"])
    result = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "rows": len(rows), "layers": groups, "tokens": len(rows) // groups,
              "seconds": {n: statistics.median(t) for n, t in times.items()},
              "ratio": {n: statistics.median(t) / base for n, t in times.items()}}
    print(f"{result['rows']} rows ({groups} layers x {result['tokens']} tokens), "
          f"{result['machine']}")
    print("| statistics | median s | x entropies alone |\n|---|---|---|")
    for name in WAYS:
        print(f"| {name} | {result['seconds'][name]:.3f} | {result['ratio'][name]:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
