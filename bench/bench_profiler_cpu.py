"""CPU benchmark of the profiler against the seed-style baseline and the matmul floor.

Three measurements, each beside its baseline in the same run:

1. seed workload: 16 prompts x 32 new tokens, greedy, all layers. entropy-fast
   (batched generation + one teacher-forced forward + streamed lens) against the seed
   library's method (one prompt at a time, `generate` with hidden states at every step,
   a full float32 softmax per layer and step). The baseline runs on the first
   `--seed-baseline-prompts` prompts only (it is sequential per prompt; tokens/s is its
   rate) to keep the run short.
2. text mode, 8 texts x ~128 tokens: entropy-fast against the same forward pass plus the
   lens matmuls alone (norm + head GEMMs, no softmax statistics): the floor.
3. peak memory: growth of the resident set while profiling two corpus sizes in text mode,
   beside the size the (tokens x vocabulary x layers) logits would have.

Usage: python bench/bench_profiler_cpu.py [--models gpt2-124m smollm2-135m] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from entropy_fast import EntropyProfiler
from entropy_fast.data import sample_prompts
from entropy_fast.forward import find_decoder_layers
from entropy_fast.models import load_model

SAMPLE = sample_prompts()


def build(name: str):
    """(model, tokenizer) for a benchmark model name, float32 on CPU."""
    smollm2, tokenizer, _ = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    if name == "smollm2-135m":
        return smollm2, tokenizer
    config = AutoConfig.for_model("gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                                  vocab_size=50257)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


@torch.no_grad()
def seed_style(model, tokenizer, prompts, max_new_tokens) -> int:
    """The seed library's method; returns the number of profiled tokens."""
    head = model.get_output_embeddings()
    from entropy_fast.lens import Lens

    norm = Lens.from_model(model, verify=False).norm
    n_tokens = 0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             output_hidden_states=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id or 0)
        for step_states in out.hidden_states:
            last = len(step_states) - 1
            for index, hidden in enumerate(step_states):
                h = hidden[:, -1]
                logits = head(h if index == last else norm(h)).float()
                p = torch.softmax(logits, dim=-1)
                _ = -(p * torch.log(p.clamp_min(1e-45))).sum(-1)
            n_tokens += 1
    return n_tokens


@torch.no_grad()
def forward_plus_lens_matmuls(model, batch_ids: list[list[int]], vocab_chunk=4096) -> None:
    """The floor: forward with hidden states, then norm + head GEMMs only, per state."""
    from entropy_fast.lens import Lens

    lens = Lens.from_model(model, verify=False)
    width = max(len(x) for x in batch_ids)
    ids = torch.zeros((len(batch_ids), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, x in enumerate(batch_ids):
        ids[row, :len(x)] = torch.tensor(x)
        mask[row, :len(x)] = 1
    out = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    weight = lens.head.weight
    for hidden in out.hidden_states:
        rows = lens.normalize(hidden[mask.bool()])
        for start in range(0, weight.shape[0], vocab_chunk):
            _ = rows @ weight[start:start + vocab_chunk].T


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def best_interleaved(first, second, repeat=3) -> tuple[float, float]:
    """Best-of-`repeat` times of two functions run alternately (load drifts hit both)."""
    times = ([], [])
    for _ in range(repeat):
        for fn, bucket in zip((first, second), times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def texts_of(tokenizer, n_texts=8, n_tokens=128) -> list[list[int]]:
    stream = tokenizer(" ".join(SAMPLE * (1 + n_texts * n_tokens // 300)))["input_ids"]
    return [stream[i * n_tokens:(i + 1) * n_tokens] for i in range(n_texts)]


def bench_model(name: str, seed_prompts: int, sections: list[str]) -> dict:
    model, tokenizer = build(name)
    profiler = EntropyProfiler(model, tokenizer=tokenizer)
    prompts = SAMPLE[:16]
    row = {"model": name, "n_states": len(find_decoder_layers(model)) + 1,
           "vocab": model.config.vocab_size, "d_model": model.config.hidden_size}
    if "text" in sections:
        row.update(text_mode(model, tokenizer, profiler))
    if "seed" not in sections:
        return row
    cold_s, _ = timed(lambda: profiler.profile_batch(prompts, max_new_tokens=32))
    ours_s, batch = timed(lambda: profiler.profile_batch(prompts, max_new_tokens=32))
    row.update(seed_workload_cold_s=round(cold_s, 2))  # includes one-time compilation
    ours_tokens = sum(p.n_tokens for p in batch)
    base_s, base_tokens = timed(lambda: seed_style(model, tokenizer, prompts[:seed_prompts], 32))
    row.update(seed_workload_tokens=ours_tokens, seed_workload_s=round(ours_s, 2),
               seed_workload_tok_s=round(ours_tokens / ours_s, 1),
               seed_style_tokens=base_tokens, seed_style_s=round(base_s, 2),
               seed_style_tok_s=round(base_tokens / base_s, 1),
               speedup_vs_seed_style=round((ours_tokens / ours_s) / (base_tokens / base_s), 1))
    return row


def text_mode(model, tokenizer, profiler) -> dict:
    """Text mode against the floor: forward pass plus the lens GEMMs alone."""
    texts = texts_of(tokenizer)
    sequences = [(t, []) for t in texts]
    list(profiler.profile_token_ids(sequences))  # warm-up (compiles the CPU statistics)
    text_s, floor_s = best_interleaved(lambda: list(profiler.profile_token_ids(sequences)),
                                       lambda: forward_plus_lens_matmuls(model, texts))
    return dict(text_tokens=sum(len(t) - 1 for t in texts), text_mode_s=round(text_s, 2),
                floor_forward_plus_matmuls_s=round(floor_s, 2),
                text_mode_over_floor=round(text_s / floor_s, 2))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def profiling_memory_mb(name: str, n_texts: int) -> tuple[float, float]:
    """(RSS before, peak RSS growth) while profiling n_texts texts of 128 tokens.

    Runs in this process after a warm-up call, polling the resident set every 2 ms.
    """
    model, tokenizer = build(name)
    profiler = EntropyProfiler(model, tokenizer=tokenizer)
    sequences = [(x, []) for x in texts_of(tokenizer, n_texts)]
    list(profiler.profile_token_ids(sequences[:1]))  # warm-up (and compilation)
    before, peak, done = _rss_mb(), [0.0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    poller = threading.Thread(target=poll)
    poller.start()
    list(profiler.profile_token_ids(sequences))
    done.set()
    poller.join()
    return round(before, 1), round(peak[0] - before, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-124m", "smollm2-135m"])
    parser.add_argument("--seed-baseline-prompts", type=int, default=4)
    parser.add_argument("--sections", nargs="+", default=["text", "seed", "memory"],
                        choices=["text", "seed", "memory"])
    parser.add_argument("--out", default="bench/results_profiler_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        row = bench_model(name, args.seed_baseline_prompts, args.sections)
        print(json.dumps(row), flush=True)
        for n_texts in (4, 32) if "memory" in args.sections else ():
            before, growth = profiling_memory_mb(name, n_texts)
            row[f"rss_mb_before_{n_texts}x128"] = before
            row[f"rss_growth_mb_{n_texts}x128"] = growth
        row["logits_tensor_mb_32x128_if_materialized"] = round(
            32 * 127 * row["vocab"] * row["n_states"] * 4 / 2**20, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    machine = {"cpu": platform.processor() or platform.machine(), "threads":
               torch.get_num_threads(), "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
