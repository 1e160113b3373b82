"""CPU tuning of the streaming torch lens path, and CPU accuracy of both lens paths.

Tuning (default): for each shape (random weights; rows spanning flat to peaked
distributions) it times the torch backend over a grid of `Lens.row_block` x `Lens.vocab_chunk`,
beside the floor (the same chunked matmuls with no statistics) and, for the matmul dtype
choice, one float32 and one bfloat16 GEMM of the same size. Prints markdown tables;
--out writes JSON too.

Accuracy (--accuracy): max abs error in nats against float64 of the Triton kernel (run
by the interpreter) and of the torch path, fp32 and bf16 inputs, at real shapes: the real
SmolLM2-135M (every layer's states on sample text) and GPT-2-124M / Llama-1B shapes with
random weights and rows that span flat to nearly one-hot distributions.

Usage: python bench/bench_lens_cpu.py [--rows 1024] [--reps 2] [--out FILE]
       [--row-blocks 512 1024] [--vocab-chunks 4096 8192] [--accuracy]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

if "--accuracy" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # the kernel on CPU, set before triton is imported

import torch
from torch import nn

from entropy_fast.lens import Lens

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the tests' float64 reference
from tests.reference import entropy_from_logits, lens_logits_float64

SHAPES = {"smollm2-135m (d=576, V=49152)": (576, 49152),
          "gpt2-124m (d=768, V=50257)": (768, 50257)}
ROW_BLOCKS = (256, 512, 1024, 2048)
VOCAB_CHUNKS = (1024, 2048, 4096, 8192, 16384)


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def make(d: int, vocab: int, rows: int):
    torch.manual_seed(0)
    head = nn.Linear(d, vocab, bias=False)
    nn.init.normal_(head.weight, std=0.02)
    lens = Lens(head, nn.RMSNorm(d, eps=1e-6))
    hidden = torch.randn(rows, d)
    picks = torch.randint(0, vocab, (rows,))
    hidden += torch.rand(rows, 1) ** 2 * 40.0 * head.weight[picks].detach() / 0.02 / d**0.5
    return lens, hidden


@torch.no_grad()
def floor(lens: Lens, hidden: torch.Tensor, chunk: int) -> None:
    rows = lens.normalize(hidden)
    for start in range(0, lens.vocab_size, chunk):
        _ = rows @ lens.head.weight[start:start + chunk].T


ALPHAS = (0.0, 0.5, 0.999, 1.0, 1.001, 2.0, math.inf)


def smollm2_rows(dtype: torch.dtype, per_state: int = 4):
    """The real SmolLM2-135M lens and rows of every state (pre-norm; the last one normed)."""
    from entropy_fast.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m", dtype=dtype, device="cpu")
    with open(os.path.join(os.path.dirname(__file__), "..", "entropy_fast", "data",
                           "sample_prompts.txt")) as f:
        text = f.read()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :64]
    states = model(input_ids=ids, output_hidden_states=True).hidden_states
    pick = torch.linspace(4, ids.shape[1] - 1, per_state).long()
    pre = torch.cat([s[0, pick] for s in states[:-1]])
    return Lens.from_model(model), [(pre, False), (states[-1][0, pick], True)]


def synthetic_rows(d: int, vocab: int, dtype: torch.dtype, n: int = 32):
    lens, hidden = make(d, vocab, n)
    for module in (lens.head, lens.norm):
        module.to(dtype)
    return lens, [(hidden.to(dtype), False)]


@torch.no_grad()
def accuracy(out: str | None, only: str = "") -> None:
    from entropy_fast.kernels.lens_entropy import KernelConfig

    # Big tiles keep the interpreter's step count down at V = 128256 (same math).
    big = KernelConfig(block_n=64, block_v=1024, block_k=256, n_splits=2)
    results = {}
    cases = {"smollm2-135m real (d=576, V=49152)": (smollm2_rows, None),
             "gpt2-124m shape (d=768, V=50257)": (lambda dt: synthetic_rows(768, 50257, dt),
                                                  None),
             "llama-1b shape (d=2048, V=128256)": (
                 lambda dt: synthetic_rows(2048, 128256, dt, n=16), big)}
    for name, (build, config) in cases.items():
        if only not in name:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            lens, parts = build(dtype)
            errors = {}
            for backend in ("triton", "torch"):
                worst = torch.zeros(len(ALPHAS), dtype=torch.float64)
                for hidden, normed in parts:
                    truth = entropy_from_logits(lens_logits_float64(lens, hidden, normed), ALPHAS)
                    got = (lens.kernel_statistics(hidden, ALPHAS, normed=normed, config=config)
                           if backend == "triton" else
                           lens.statistics(hidden, ALPHAS, backend=backend, normed=normed)).entropy
                    worst = torch.maximum(worst, (got.double() - truth).abs().amax(0))
                errors[backend] = dict(zip(map(str, ALPHAS), worst.tolist(), strict=True))
            rows = sum(len(h) for h, _ in parts)
            key = f"{name} {str(dtype).removeprefix('torch.')}"
            results[key] = {"rows": rows, **errors}
            print(f"| {key} | {rows} | " + " | ".join(
                f"{max(errors[b].values()):.1e}" for b in ("triton", "torch")) + " | "
                + ", ".join(f"{a}: {errors['triton'][a]:.0e}/{errors['torch'][a]:.0e}"
                            for a in map(str, ALPHAS)) + " |", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--row-blocks", type=int, nargs="*", default=list(ROW_BLOCKS))
    parser.add_argument("--vocab-chunks", type=int, nargs="*", default=list(VOCAB_CHUNKS))
    parser.add_argument("--accuracy", action="store_true",
                        help="accuracy of both lens paths against float64 instead of tuning")
    parser.add_argument("--accuracy-cases", default="", help="only cases whose name has this")
    args = parser.parse_args(argv)
    if args.accuracy:
        print("| case | rows | kernel max err | torch max err | per order kernel/torch |")
        print("|---|---|---|---|---|")
        return accuracy(args.out, args.accuracy_cases)
    results = {"cpu": platform.processor() or platform.machine(), "threads":
               torch.get_num_threads(), "torch": torch.__version__, "rows": args.rows,
               "shapes": {}}
    for name, (d, vocab) in SHAPES.items():
        lens, hidden = make(d, vocab, args.rows)
        gflop = 2 * args.rows * d * vocab / 1e9
        row = {"gflop": gflop, "grid_s": {}}
        w = lens.head.weight.detach()
        row["matmul_fp32_s"] = best_of(lambda w=w, h=hidden: h @ w.T, args.reps)
        wb, hb = w.bfloat16(), hidden.bfloat16()
        row["matmul_bf16_s"] = best_of(lambda wb=wb, hb=hb: hb @ wb.T, args.reps)
        row["floor_s"] = best_of(lambda lens=lens, h=hidden: floor(lens, h, 4096), args.reps)
        for rb in args.row_blocks:
            for vc in args.vocab_chunks:
                # blocks of exactly rb x vc (block_logits would shrink a narrow one)
                lens.row_block, lens.vocab_chunk, lens.block_logits = rb, vc, rb * vc
                t = best_of(lambda lens=lens, h=hidden: lens.statistics(h, (1.0,), backend="torch"),
                            args.reps)
                row["grid_s"][f"{rb}x{vc}"] = t
                print(f"{name} row_block={rb} vocab_chunk={vc}: {t:.3f}s "
                      f"({gflop / t:.0f} GFLOP/s)", flush=True)
        best = min(row["grid_s"], key=row["grid_s"].get)
        lens.row_block, lens.vocab_chunk = (int(v) for v in best.split("x"))
        lens.block_logits = lens.row_block * lens.vocab_chunk
        row["best"] = best
        row["default_s"] = row["grid_s"].get("1024x4096", float("nan"))
        row["best_3_orders_all_stats_s"] = best_of(
            lambda lens=lens, h=hidden: lens.statistics(
                h, (1.0, 2.0, float("inf")), backend="torch",
                targets=torch.zeros(len(h), dtype=torch.long), with_top_token=True), args.reps)
        results["shapes"][name] = row
    print(f"\n{results['threads']} threads, {args.rows} rows, best of {args.reps}, seconds\n")
    print("| shape | matmul fp32 | matmul bf16 | floor (norm + chunked GEMMs) | old default "
          "1024x4096 | best | best, 3 orders + argmax + targets |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["shapes"].items():
        print(f"| {name} | {r['matmul_fp32_s']:.3f} | {r['matmul_bf16_s']:.3f} | "
              f"{r['floor_s']:.3f} | {r['default_s']:.3f} | {r['grid_s'][r['best']]:.3f} "
              f"({r['best']}) | {r['best_3_orders_all_stats_s']:.3f} |")
    print("\nrow_block x vocab_chunk grid (s):\n")
    for name, r in results["shapes"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["grid_s"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
