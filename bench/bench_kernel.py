"""GPU check and benchmark of the fused lens kernel, in one run (bench/gpu_check.sh).

Sections, each under a shared deadline, results written after each one:

1. card, versions, measured bf16 matmul rate (square 8192^3 and lens-shaped);
2. correctness on sampled rows against float64, per shape (GPT-2-124M d=768 V=50257,
   Llama-1B-like d=2048 V=128256, Llama-8B-like d=4096 V=128256) plus a soft-cap + bias
   case and an fp32 case: kernel vs float64 truth, torch backend vs truth (STYLE.md 12),
   kernel vs float64 of its own bf16 operands; argmax, surprisal, rank;
3. the kernel alone on 32768 pre-norm rows (norm included): TFLOP/s counting 2 N d V
   against the measured matmul rate, for a few tile configs (the best one is used below);
4. end to end, teacher-forced, batch 64 x 512, random-weight bf16 models from configs:
   forward only, forward + fused lens on every state, forward + plain-torch chunked lens,
   and the seed-style per-step baseline: tokens/s and peak memory above the weights.

Usage: python bench/bench_kernel.py --out DIR [--budget-s 420] [--shapes gpt2 llama1b llama8b]
Needs torch, triton and transformers only (never duckdb or vllm).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback
import types
from dataclasses import replace
from pathlib import Path

# --smoke: the whole script at toy sizes on CPU under the interpreter (to test the script).
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)  # a GPU run: never the interpreter
ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cpu" if SMOKE else "cuda"


def _import_working_tree() -> None:
    """Import entropy_fast's lens modules from this tree, without the package __init__
    (whose other imports are not needed here) and without an installed copy."""
    for name in [m for m in sys.modules if m == "entropy_fast" or m.startswith("entropy_fast.")]:
        del sys.modules[name]
    package = types.ModuleType("entropy_fast")
    package.__path__ = [str(ROOT / "entropy_fast")]
    kernels = types.ModuleType("entropy_fast.kernels")
    kernels.__path__ = [str(ROOT / "kernels")]
    package.kernels = kernels
    sys.modules["entropy_fast"], sys.modules["entropy_fast.kernels"] = package, kernels


_import_working_tree()

import torch  # noqa: E402
import transformers  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402

from entropy_fast.forward import StateTap, find_decoder_layers  # noqa: E402
from entropy_fast.kernels.lens_entropy import KernelConfig  # noqa: E402
from entropy_fast.lens import Lens  # noqa: E402

sys.path.insert(0, str(ROOT))  # the float64 reference of the tests (torch only)
from tests.reference import entropy_from_logits  # noqa: E402

ALPHAS = (0.0, 0.5, 0.999, 1.0, 1.001, 2.0, math.inf)
SHAPES = {  # name: (d, V, states, norm kind, model config)
    "gpt2": (768, 50257, 13, "layernorm", dict(
        model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024,
        vocab_size=50257)),
    "llama1b": (2048, 128256, 17, "rmsnorm", dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=2048, tie_word_embeddings=True)),
    "llama8b": (4096, 128256, 33, "rmsnorm", dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=2048, tie_word_embeddings=False)),
}
GOALS = {"gpt2": (0.65, 250e3), "llama1b": (0.75, 48e3), "llama8b": (0.80, 12e3)}
CONFIGS = {  # tried in this order while time allows; "default" is the launcher's default
    "default": KernelConfig(),
    # TMA descriptors: the copy engine fetches tiles; Shannon on sm_90 drops from 252 to 179
    # registers at d=4096 (241 -> 186 at d=768; bench/results_kernel_resources.md)
    "tma": KernelConfig(tma=True),
    # Shannon: 127 registers (103 with TMA) and 96 KiB on sm_90, so two blocks per SM and
    # one block's softmax epilogue can overlap the other's MMAs (heavy statistics: one)
    "128x128x64-s3-tma": KernelConfig(block_v=128, tma=True),
    "128x128x64-s3": KernelConfig(block_v=128),
    "flat-tma": KernelConfig(flat=True, tma=True),
    "flat": KernelConfig(flat=True),
    "128x128x64-s4": KernelConfig(block_v=128, num_stages=4),
    "256x128x64-s3": KernelConfig(block_n=256, block_v=128),
    "128x256x64-s4-flat": KernelConfig(num_stages=4, flat=True),
    "128x256x64-g16": KernelConfig(group_n=16),
}
BATCH, SEQ = 64, 512
if SMOKE:
    SHAPES = {"gpt2": (64, 1000, 3, "layernorm", dict(SHAPES["gpt2"][4], n_embd=64, n_layer=2,
                                                      n_head=2, vocab_size=1000)),
              "llama8b": (128, 1024, 3, "rmsnorm", dict(
                  SHAPES["llama8b"][4], hidden_size=128, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=1024))}
    toy = KernelConfig(block_n=64, block_v=256, block_k=64, n_splits=2)
    CONFIGS = {"default": toy, "tma": replace(toy, tma=True), "flat": replace(toy, flat=True)}
    BATCH, SEQ = 2, 16
N_ROWS = BATCH * SEQ
E2E_RESERVE_S = 200  # the kernel sweep stops while this much of the budget is left


class Run:
    """Deadline, results and their files."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.start, self.budget_s = out, time.time(), budget_s
        self.results: dict = {"sections": {}, "errors": []}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.time() - self.start)

    def record(self, section: str, value) -> None:
        self.results["sections"][section] = value
        self.save()

    def error(self, where: str) -> None:
        text = traceback.format_exc(limit=6)
        print(f"!! {where}: {text}", flush=True)
        self.results["errors"].append({"where": where, "error": text[-3000:]})
        self.save()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.time() - self.start, 1)
        (self.out / "kernel_bench.json").write_text(json.dumps(self.results, indent=1,
                                                               default=str))
        (self.out / "kernel_bench.md").write_text(markdown(self.results))


def sync() -> None:
    if not SMOKE:
        torch.cuda.synchronize()


def empty_cache() -> None:
    if not SMOKE:
        torch.cuda.empty_cache()


def memory(kind: str = "allocated") -> int:
    if SMOKE:
        return 0
    if kind == "allocated":
        return torch.cuda.memory_allocated()
    return torch.cuda.max_memory_allocated()


def cuda_ms(fn, reps: int, warmup: int = 1) -> list[float]:
    """Wall times in ms of fn() on the GPU, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if SMOKE:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def summary(times: list[float]) -> dict:
    q = sorted(times)
    return {"p20_ms": q[int(0.2 * (len(q) - 1))], "p50_ms": statistics.median(q),
            "p80_ms": q[int(0.8 * (len(q) - 1))]}


# -- 1. matmul rate ---------------------------------------------------------------------

def matmul_rates(run: Run) -> float:
    out, size, rows = {}, 256 if SMOKE else 8192, 64 if SMOKE else 8192
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    ms = statistics.median(cuda_ms(lambda a=a, b=b: a @ b, reps=20, warmup=3))
    out[f"square_{size}_tflops"] = 2 * size**3 / ms / 1e9
    del a, b
    for name, (d, vocab, *_rest) in SHAPES.items():
        x = torch.randn(rows, d, device=DEVICE, dtype=torch.bfloat16)
        w = torch.randn(vocab, d, device=DEVICE, dtype=torch.bfloat16)
        ms = statistics.median(cuda_ms(lambda x=x, w=w: x @ w.T, reps=5, warmup=1))
        out[f"lens_shaped_{name}_tflops"] = 2 * rows * d * vocab / ms / 1e9
        del x, w
    empty_cache()
    out["matmul_rate_tflops"] = max(v for k, v in out.items() if k.endswith("_tflops"))
    run.record("matmul", out)
    print("matmul", out, flush=True)
    return out["matmul_rate_tflops"]


# -- 2. correctness ---------------------------------------------------------------------

def synthetic_lens(d: int, vocab: int, norm_kind: str, dtype=torch.bfloat16, bias=False,
                   softcap=None, seed: int = 0) -> Lens:
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        head = nn.Linear(d, vocab, bias=bias, dtype=dtype)
        nn.init.normal_(head.weight, std=0.02)
        if bias:
            nn.init.normal_(head.bias, std=0.5)
        norm = (nn.LayerNorm(d, dtype=dtype) if norm_kind == "layernorm"
                else nn.RMSNorm(d, eps=1e-5, dtype=dtype))
        nn.init.normal_(norm.weight, 1.0, 0.2)
        if getattr(norm, "bias", None) is not None:
            nn.init.normal_(norm.bias, 0.0, 0.1)
    return Lens(head, norm, softcap=softcap)


def realistic_rows(lens: Lens, n: int, seed: int = 1) -> torch.Tensor:
    """Pre-norm rows whose lens distributions span flat to nearly one-hot."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = lens.head.weight
    d = w.shape[1]
    rows = torch.randn(n, d, device=DEVICE, generator=g) * 2 + 0.1
    picks = torch.randint(0, w.shape[0], (n,), device=DEVICE, generator=g)
    strength = torch.rand(n, 1, device=DEVICE, generator=g) ** 2 * 3000.0 / math.sqrt(d)
    rows = rows + strength * w[picks].float()
    return rows.to(w.dtype)


def float64_reference(lens: Lens, rows64: torch.Tensor, targets: torch.Tensor) -> dict:
    """Textbook statistics in float64 of normed rows (n x d), vocabulary in chunks."""
    w, b = lens.head.weight, getattr(lens.head, "bias", None)
    z = torch.cat([rows64 @ w[i:i + 16384].double().T for i in range(0, w.shape[0], 16384)], 1)
    if b is not None:
        z = z + b.double()
    z = z * lens.logit_scale
    if lens.softcap:
        z = torch.tanh(z / lens.softcap) * lens.softcap
    logp = torch.log_softmax(z, 1)
    zt = z.gather(1, targets[:, None])
    others = torch.ones_like(z, dtype=torch.bool).scatter_(1, targets[:, None], False)
    tol = 1e-4 + 2e-7 * z.abs().max()
    return {"entropy": entropy_from_logits(z, ALPHAS), "z": z, "tol": float(tol),
            "surprisal": -logp.gather(1, targets[:, None])[:, 0],
            "rank": ((z > zt) & others).sum(1), "near": (((z - zt).abs() <= tol) & others).sum(1)}


def check_one(name: str, lens: Lens, n_sample: int = 32 if SMOKE else 256) -> dict:
    d, vocab = lens.head.weight.shape[1], lens.head.weight.shape[0]
    hidden = realistic_rows(lens, n_sample)
    targets = torch.randint(0, vocab, (n_sample,), device=DEVICE)
    spec = lens.norm_spec
    truth = float64_reference(lens, _norm64(spec, hidden), targets)
    operands = spec.apply(hidden).to(lens.head.weight.dtype).double()
    exact = float64_reference(lens, operands, targets)
    got = lens.statistics(hidden, ALPHAS, backend="triton", targets=targets,
                          with_top_token=True)
    alt = lens.statistics(hidden, ALPHAS, backend="torch")
    err = (got.entropy.double() - truth["entropy"]).abs().amax(0)
    err_torch = (alt.entropy.double() - truth["entropy"]).abs().amax(0)
    err_exact = (got.entropy.double() - exact["entropy"]).abs().amax(0)
    top_logit = exact["z"].gather(1, got.top_token[:, None])[:, 0]
    rank_off = (got.target_rank - exact["rank"]).abs()
    out = {
        "shape": f"d={d} V={vocab} {lens.head.weight.dtype}".replace("torch.", ""),
        "entropy_range": [float(truth["entropy"][:, 3].min()), float(truth["entropy"][:, 3].max())],
        "max_err_vs_float64": dict(zip(map(str, ALPHAS), err.tolist(), strict=True)),
        "torch_backend_max_err_vs_float64": dict(zip(map(str, ALPHAS), err_torch.tolist(),
                                                     strict=True)),
        "max_err_vs_float64_of_own_operands": dict(zip(map(str, ALPHAS), err_exact.tolist(),
                                                       strict=True)),
        "argmax_exact_fraction": float((got.top_token == exact["z"].argmax(1)).float().mean()),
        "argmax_is_maximal": bool((top_logit >= exact["z"].max(1).values - exact["tol"]).all()),
        "surprisal_max_err_vs_own_operands": float(
            (got.target_surprisal.double() - exact["surprisal"]).abs().max()),
        "rank_within_near_ties": bool((rank_off <= exact["near"]).all()),
        "nan": bool(got.entropy.isnan().any()),
    }
    out["pass"] = bool(not out["nan"] and (err_exact <= exact["tol"]).all()
                       and (err <= err_torch + 1e-3).all() and out["argmax_is_maximal"]
                       and out["rank_within_near_ties"]
                       and out["surprisal_max_err_vs_own_operands"] <= exact["tol"])
    print(f"check {name}: pass={out['pass']} max err {err.max():.2e} (torch {err_torch.max():.2e},"
          f" own operands {err_exact.max():.2e})", flush=True)
    return out


def _norm64(spec, hidden: torch.Tensor) -> torch.Tensor:
    x = hidden.double()
    if spec.kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.eps)
    if spec.weight is not None:
        y = y * (spec.weight.double() + spec.weight_offset)
    if spec.bias is not None:
        y = y + spec.bias.double()
    return y


def correctness(run: Run) -> None:
    out = {}
    cases = {name: (d, vocab, kind) for name, (d, vocab, _s, kind, _c) in SHAPES.items()}
    for name, (d, vocab, kind) in cases.items():
        try:
            out[name] = check_one(name, synthetic_lens(d, vocab, kind))
        except Exception:
            run.error(f"correctness {name}")
        run.record("correctness", out)
    (d1, v1), (d2, v2) = ((96, 3001), (80, 1007)) if SMOKE else ((1024, 32003), (512, 10007))
    for name, kwargs in {f"softcap+bias d={d1} V={v1}": dict(d=d1, vocab=v1, bias=True,
                                                            softcap=30.0, norm_kind="rmsnorm"),
                         f"fp32 d={d2} V={v2}": dict(d=d2, vocab=v2, dtype=torch.float32,
                                                     norm_kind="layernorm")}.items():
        try:
            out[name] = check_one(name, synthetic_lens(**kwargs))
        except Exception:
            run.error(f"correctness {name}")
        run.record("correctness", out)
    empty_cache()


def lens_statistics(run: Run) -> None:
    """Top-10 and KL to the final layer through the kernel (issue 23): against float64 on
    G layer groups of realistic rows, and their cost against the entropies alone."""
    groups, n = (2, 32) if SMOKE else (8, 512)
    name = "llama8b" if "llama8b" in SHAPES else next(iter(SHAPES))
    d, vocab, _, kind, _ = SHAPES[name]
    lens = synthetic_lens(d, vocab, kind)
    hidden = realistic_rows(lens, groups * n)
    operands = lens.norm_spec.apply(hidden).to(lens.head.weight.dtype).double()
    exact = float64_reference(lens, operands, torch.zeros(len(hidden), dtype=torch.long,
                                                          device=DEVICE))
    got = lens.statistics(hidden, backend="triton", top_k=10, kl_groups=groups)
    logp = torch.log_softmax(exact["z"], 1)
    want = torch.sort(exact["z"], dim=1, descending=True, stable=True).indices[:, :10]
    gap = (exact["z"].gather(1, got.top_tokens) - exact["z"].gather(1, want)).abs()
    final = logp.view(groups, n, -1)[-1]
    kl = (final.exp() * (final - logp.view(groups, n, -1))).sum(2).reshape(-1)
    out = {"shape": f"{name} d={d} V={vocab}, {groups} groups x {n} tokens",
           "top10_ids_off_beyond_ties": int((gap > exact["tol"]).sum()),
           "top10_prob_max_err": float((got.top_probs.double()
                                        - logp.exp().gather(1, want)).abs().max()),
           "kl_max_err": float((got.kl_to_final.double() - kl).abs().max()),
           "kl_range": [float(kl.min()), float(kl.max())]}
    out["pass"] = bool(out["top10_ids_off_beyond_ties"] == 0 and out["top10_prob_max_err"]
                       <= 1e-3 and out["kl_max_err"] <= 1e-2)
    reps = 2 if SMOKE else 10
    ways = {"entropy": {}, "kl": {"kl_groups": groups}, "top10": {"top_k": 10},
            "kl+top10": {"kl_groups": groups, "top_k": 10}}
    ms = {way: summary(cuda_ms(lambda o=o: lens.statistics(hidden, backend="triton", **o),
                               reps))["p50_ms"] for way, o in ways.items()}
    out["p50_ms"] = ms
    out["ratio"] = {way: ms[way] / ms["entropy"] for way in ways}
    print(f"lens statistics {out['shape']}: pass={out['pass']} ratio {out['ratio']}", flush=True)
    run.record("lens_statistics", out)
    empty_cache()


# -- 3. kernel alone --------------------------------------------------------------------

def kernel_alone(run: Run, rate: float) -> dict[str, KernelConfig]:
    out, best = {}, {}
    order = [name for name in ("llama8b", "llama1b", "gpt2") if name in SHAPES]
    for config_name, config in CONFIGS.items():
        for name in order:
            if run.left() < E2E_RESERVE_S:
                print(f"skip kernel {name} {config_name}: {run.left():.0f}s left", flush=True)
                continue
            d, vocab, _s, kind, _c = SHAPES[name]
            key = f"{name}/{config_name}"
            try:
                lens = synthetic_lens(d, vocab, kind)
                hidden = realistic_rows(lens, N_ROWS)
                started = time.time()
                ref = lens.kernel_statistics(hidden, (1.0,), config=config)
                sync()
                compile_s = time.time() - started
                base = out.get(f"{name}/default", {}).get("_entropy")
                ms = cuda_ms(lambda lens=lens, hidden=hidden, config=config:
                             lens.kernel_statistics(hidden, (1.0,), config=config),
                             reps=5 if d >= 2048 else 10)
                got = lens.kernel_statistics(hidden, (1.0,), config=config).entropy
                row = {**summary(ms), "first_call_s": round(compile_s, 2)}
                flops = 2.0 * N_ROWS * d * vocab
                row["tflops"] = flops / row["p50_ms"] / 1e9
                row["fraction_of_matmul_rate"] = row["tflops"] / rate
                row["goal_fraction"] = GOALS[name][0]
                row["max_diff_vs_default"] = (float((got - base).abs().max())
                                              if base is not None else 0.0)
                if config_name == "default":
                    row["_entropy"] = ref.entropy
                    everything = dict(targets=torch.randint(0, vocab, (N_ROWS,), device=DEVICE),
                                      with_top_token=True)
                    # "all stats" runs the heavy-statistics default tiles; the 128x256 row
                    # checks that choice (kernel_resources.py: 128x256 spills there)
                    for label, alphas, extra in (
                            ("shannon+renyi2+inf", (1.0, 2.0, math.inf), {}),
                            ("all stats", (1.0, 2.0, math.inf), everything),
                            ("all stats 128x256", (1.0, 2.0, math.inf),
                             everything | dict(config=CONFIGS["default"]))):
                        lens.kernel_statistics(hidden, alphas, **extra)
                        t = statistics.median(cuda_ms(
                            lambda a=alphas, e=extra, lens=lens, hidden=hidden: (
                                lens.kernel_statistics(hidden, a, **e)), reps=3))
                        row[f"tflops_{label}"] = flops / t / 1e9
                out[key] = row
                if row["max_diff_vs_default"] < 1e-3 and (
                        name not in best or row["tflops"] > out[best[name]]["tflops"]):
                    best[name] = key
                print(f"kernel {key}: {row['tflops']:.0f} TFLOP/s "
                      f"({100 * row['fraction_of_matmul_rate']:.0f}% of {rate:.0f}), first call "
                      f"{compile_s:.1f}s", flush=True)
                del lens, hidden
            except Exception:
                run.error(f"kernel {key}")
            empty_cache()
            run.record("kernel", {k: {f: v for f, v in r.items() if not f.startswith("_")}
                                  for k, r in out.items()} | {"best": best})
    return {name: CONFIGS[key.split("/")[1]] for name, key in best.items()}


# -- 4. end to end ----------------------------------------------------------------------

def build_model(config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(config)
    cfg = AutoConfig.for_model(params.pop("model_type"), **params)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


@torch.no_grad()
def teacher_forced(model, lens, ids, method: str, config: KernelConfig | None):
    """One forward of the base model; every state reduced by the lens as it appears."""
    layers = find_decoder_layers(model)
    kept = []

    def reduce(index: int, hidden: torch.Tensor) -> None:
        rows = hidden.reshape(-1, hidden.shape[-1])
        if method == "fused":
            kept.append(lens.kernel_statistics(rows, (1.0,), config=config).entropy)
        else:
            kept.append(lens.statistics(rows, (1.0,), backend="torch").entropy)

    if method == "forward":
        model.base_model(input_ids=ids, use_cache=False)
        return
    with StateTap(layers, range(len(layers) + 1), reduce):
        model.base_model(input_ids=ids, use_cache=False)
    assert len(kept) == len(layers) + 1


@torch.no_grad()
def seed_style(model, lens, steps: int) -> float:
    """The seed library's way: generate one token at a time with all hidden states, a full
    float32 softmax per state and step. Returns tokens/s."""
    ids = torch.randint(0, lens.vocab_size, (1, 16), device=DEVICE)
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    started = time.time()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True,
                    output_hidden_states=True)
        last = len(out.hidden_states) - 1
        for i, h in enumerate(out.hidden_states):
            logits = lens.head(h[:, -1] if i == last else lens.norm(h[:, -1])).float()
            p = torch.softmax(logits, -1)
            _ = -(p * torch.log(p.clamp_min(1e-45))).sum(-1).item()
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return steps / (time.time() - started)


def end_to_end(run: Run, best: dict[str, KernelConfig], rate: float) -> None:
    out = {}
    need = {"gpt2": 40, "llama1b": 60, "llama8b": 120}
    for name in [name for name in ("gpt2", "llama1b", "llama8b") if name in SHAPES]:
        if run.left() < need[name]:
            print(f"skip end-to-end {name}: {run.left():.0f}s left", flush=True)
            continue
        d, vocab, n_states, _kind, config = SHAPES[name]
        row = {}
        try:
            model = build_model(config)
            lens = Lens.from_model(model)
            ids = torch.randint(0, vocab, (BATCH, SEQ), device=DEVICE)
            weights = memory()
            for method in ("forward", "fused", "torch"):
                if method == "torch" and run.left() < need[name] / 2:
                    continue
                teacher_forced(model, lens, ids, method, best.get(name))  # warm-up, compile
                sync()
                if not SMOKE:
                    torch.cuda.reset_peak_memory_stats()
                reps = 1 if name == "llama8b" or method == "torch" else 2
                config = best.get(name)
                ms = cuda_ms(lambda m=method, model=model, lens=lens, ids=ids, c=config:
                             teacher_forced(model, lens, ids, m, c), reps, warmup=0)
                row[method] = {"tokens_per_s": N_ROWS / (statistics.median(ms) / 1e3),
                               "peak_above_weights_gb":
                                   (memory("peak") - weights) / 1e9}
                print(f"e2e {name} {method}: {row[method]['tokens_per_s']:.0f} tok/s", flush=True)
            lens_s = 2.0 * N_ROWS * d * vocab * n_states / (rate * 1e12)
            fwd_s = N_ROWS / row["forward"]["tokens_per_s"]
            row["limit_tokens_per_s"] = N_ROWS / (fwd_s + lens_s)
            row["goal_tokens_per_s"] = GOALS[name][1]
            row["one_layer_states_gb"] = N_ROWS * d * 2 / 1e9
            if run.left() > need[name] / 3:
                row["seed_style"] = {"tokens_per_s": seed_style(model, lens, 8 if d > 2048
                                                                else 24)}
            del model, lens
        except Exception:
            run.error(f"end-to-end {name}")
        out[name] = row
        empty_cache()
        run.record("end_to_end", out)


# -- report -----------------------------------------------------------------------------

def markdown(results: dict) -> str:
    s = results["sections"]
    lines = [f"# Lens kernel on {s.get('env', {}).get('gpu', '?')}", "",
             "```", json.dumps(s.get("env", {})), json.dumps(s.get("matmul", {})), "```", ""]
    if "correctness" in s:
        lines += ["## Correctness (256 sampled rows, max abs error in nats)", "",
                  "| case | pass | kernel vs float64 | torch backend vs float64 | "
                  "kernel vs float64 of own operands | argmax exact |", "|---|---|---|---|---|---|"]
        for name, r in s["correctness"].items():
            lines.append(f"| {name} | {r['pass']} | {max(r['max_err_vs_float64'].values()):.2e} | "
                         f"{max(r['torch_backend_max_err_vs_float64'].values()):.2e} | "
                         f"{max(r['max_err_vs_float64_of_own_operands'].values()):.2e} | "
                         f"{r['argmax_exact_fraction']:.3f} |")
    if "lens_statistics" in s:
        r = s["lens_statistics"]
        lines += ["", f"## Top-10 and KL to the final layer ({r['shape']})", "",
                  f"pass={r['pass']}; top-10 ids off beyond ties: "
                  f"{r['top10_ids_off_beyond_ties']}; top-10 prob max err "
                  f"{r['top10_prob_max_err']:.2e}; KL max err {r['kl_max_err']:.2e} nats", "",
                  "| statistics | ms (p50) | x entropies alone |", "|---|---|---|"]
        lines += [f"| {way} | {r['p50_ms'][way]:.2f} | {r['ratio'][way]:.2f} |"
                  for way in r["p50_ms"]]
    if "kernel" in s:
        lines += ["", "## Kernel alone (32768 rows, final norm included, alpha=1)", "",
                  "| shape/config | ms (p50) | TFLOP/s | of matmul rate | goal | 3 orders | "
                  "all stats | all stats 128x256 | first call s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, r in s["kernel"].items():
            if key == "best":
                continue
            lines.append(f"| {key} | {r['p50_ms']:.2f} | {r['tflops']:.0f} | "
                         f"{100 * r['fraction_of_matmul_rate']:.0f}% | "
                         f"{100 * r['goal_fraction']:.0f}% | "
                         f"{r.get('tflops_shannon+renyi2+inf', float('nan')):.0f} | "
                         f"{r.get('tflops_all stats', float('nan')):.0f} | "
                         f"{r.get('tflops_all stats 128x256', float('nan')):.0f} | "
                         f"{r['first_call_s']} |")
    if "end_to_end" in s:
        lines += ["", "## End to end, teacher-forced, 64 x 512 tokens, every state", "",
                  "| shape | forward only | fused lens | torch chunked lens | seed style | "
                  "limit | goal | peak above weights GB (fwd / fused / torch) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in s["end_to_end"].items():
            def tok(m, r=r):
                return f"{r[m]['tokens_per_s']:.0f}" if m in r else "-"

            def mem(m, r=r):
                return f"{r[m]['peak_above_weights_gb']:.2f}" if m in r else "-"
            lines.append(f"| {name} | {tok('forward')} | {tok('fused')} | {tok('torch')} | "
                         f"{tok('seed_style')} | {r.get('limit_tokens_per_s', 0):.0f} | "
                         f"{r.get('goal_tokens_per_s', 0):.0f} | "
                         f"{mem('forward')} / {mem('fused')} / {mem('torch')} |")
    if results["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e['where']}: `{e['error'].splitlines()[-1]}`"
                                          for e in results["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu")))
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="no new section starts after this (hard stop at budget + 60 s)")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on CPU under the Triton interpreter (tests the script)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["correctness", "kernel", "end_to_end"])
    args = parser.parse_args(argv)
    run = Run(args.out, args.budget_s)
    watchdog = threading.Timer(args.budget_s + 60, lambda: (run.save(), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    if not SMOKE and not torch.cuda.is_available():
        print("no CUDA device", flush=True)
        return 2
    props = None if SMOKE else torch.cuda.get_device_properties(0)
    run.record("env", {"gpu": "cpu (smoke)" if SMOKE else props.name,
                       "sms": 0 if SMOKE else props.multi_processor_count,
                       "memory_gb": 0 if SMOKE else round(props.total_memory / 1e9, 1),
                       "torch": torch.__version__, "triton": triton.__version__,
                       "transformers": transformers.__version__,
                       "python": platform.python_version(),
                       "date": time.strftime("%Y-%m-%d %H:%M")})
    rate = 700.0
    try:
        rate = matmul_rates(run)
    except Exception:
        run.error("matmul")
    if "correctness" not in args.skip:
        correctness(run)
        try:
            lens_statistics(run)
        except Exception:
            run.error("lens statistics")
    best = {}
    if "kernel" not in args.skip:
        best = kernel_alone(run, rate)
    if "end_to_end" not in args.skip:
        end_to_end(run, best, rate)
    run.save()
    print((args.out / "kernel_bench.md").read_text(), flush=True)
    failed = [k for k, r in run.results["sections"].get("correctness", {}).items()
              if not r.get("pass")]
    if not run.results["sections"].get("lens_statistics", {}).get("pass", True):
        failed.append("lens_statistics")
    return 1 if failed or run.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
