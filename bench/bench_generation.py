"""Generation throughput: HF batched left-padded decoding vs a vLLM engine, same prompts.

Both generate greedy continuations of the same token ids with the same weights (the
built-in SmolLM2-135M-Instruct by default) on this machine; throughput is generated tokens
per second of the `generate` call, median of --repeats calls (engine start and HF model
load are reported apart). Each generator gets one untimed warm-up call on a few prompts.

Needs vLLM, so run it with the vLLM venv's python (see .ci/vllm_tests.sh):

    .venv-vllm/bin/python bench/bench_generation.py --prompts 64 --max-new-tokens 32
    .venv-vllm/bin/python bench/bench_generation.py --out bench/results_generation.jsonl

Every run prints one JSON row per generator (machine, versions, settings, timings) and
appends it to --out when given. VLLM_CPU_NUM_OF_RESERVED_CPU=0 lets vLLM's worker use all
cores (by default it leaves one to its scheduler process).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time

os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _machine() -> dict:
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})"
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"device": device, "torch_threads": torch.get_num_threads(), "load1": load1,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _prompt_ids(tokenizer, n: int) -> list[list[int]]:
    from entropy_fast.data import sample_prompts

    texts = sample_prompts()  # cycled with a round number in front, so all are distinct
    texts = [t if i < len(texts) else f"({i // len(texts)}) {t}"
             for i, t in ((i, texts[i % len(texts)]) for i in range(n))]
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def _repeat(repeats: int, fn, *args) -> tuple[dict, object]:
    """Time `repeats` calls of fn(*args); the median and min seconds and the last result."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        seconds, result = _timed(fn, *args)
        times.append(seconds)
    return {"generate_s": statistics.median(times), "generate_s_min": min(times),
            "repeats": len(times)}, result


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _timed(fn, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=64, help="number of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=8192,
                        help="HF token budget per padded batch (prompt + new tokens)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed generate calls per generator (median and min reported)")
    parser.add_argument("--hf-threads", type=int, help="torch threads for HF (default: torch's)")
    parser.add_argument("--skip", choices=("hf", "vllm"), action="append", default=[])
    parser.add_argument("--out", help="append the JSON rows to this file")
    args = parser.parse_args(argv)

    import torch
    import vllm

    if args.hf_threads:
        torch.set_num_threads(args.hf_threads)

    from entropy_fast.generation import generate_continuations
    from entropy_fast.models import load_model, model_source
    from entropy_fast.settings import SamplingSettings
    from entropy_fast.vllm_generation import VllmGenerator

    load_s, (model, tokenizer, name) = _timed(load_model, args.model, None, args.dtype)
    prompts = _prompt_ids(tokenizer, args.prompts)
    sampling = SamplingSettings(args.max_new_tokens)
    common = {"model": name, "dtype": args.dtype, "n_prompts": len(prompts),
              "prompt_tokens": sum(map(len, prompts)), "max_new_tokens": args.max_new_tokens,
              "torch": torch.__version__, "vllm": vllm.__version__, **_machine()}
    rows, outputs = [], {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    if "hf" not in args.skip:
        def hf(ids):
            return generate_continuations(model, ids, sampling, pad, args.batch_tokens)

        hf(prompts[:4])  # warm-up
        seconds, outputs["hf"] = _repeat(args.repeats, hf, prompts)
        rows.append({"generator": "hf", "startup_s": load_s, "batch_tokens": args.batch_tokens,
                     **seconds, **common})

    if "vllm" not in args.skip:
        reserved = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")
        start_s, engine = _timed(VllmGenerator, model_source(args.model, model), args.dtype)
        try:
            engine.generate(prompts[:4], sampling)  # warm-up
            seconds, outputs["vllm"] = _repeat(args.repeats, engine.generate, prompts, sampling)
        finally:
            engine.close()
        rows.append({"generator": "vllm", "startup_s": start_s, **seconds,
                     "vllm_reserved_cpus": reserved, **common})

    for row in rows:
        tokens = sum(map(len, outputs[row["generator"]]))
        row.update(generated_tokens=tokens, tokens_per_s=tokens / row["generate_s"],
                   tokens_per_s_best=tokens / row["generate_s_min"])
    if len(outputs) == 2:
        pairs = list(zip(outputs["hf"], outputs["vllm"], strict=True))
        same = sum(a == b for a, b in pairs)
        prefix = sum(_common_prefix(a, b) for a, b in pairs)
        for row in rows:
            row["identical_continuations"] = f"{same}/{len(prompts)}"
            row["hf_tokens_before_divergence"] = f"{prefix}/{sum(len(a) for a, _ in pairs)}"
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


if __name__ == "__main__":
    main()
