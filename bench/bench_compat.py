"""The real entropy-profiler 0.2.1 against our drop-in on 0.2.1's own workload, side by side.

Workload (the issue's): `EntropyProfiler(path, device="cpu", dtype=torch.float32)` then
`profile_batch(16 prompts, max_new_tokens=32)`, greedy, all layers, on a GPT-2-124M-shaped
model (random weights, d=768, 12 blocks, V=50257) and on the real SmolLM2-135M (30 blocks,
V=49152). The script that runs both sides is this file: the real 0.2.1 in its own venv
(`--seed-python`, default .venv-oracle/bin/python; see .ci/oracle.sh), ours in this
interpreter, each in a fresh process with the same torch thread count, alternating:
ours, 0.2.1, ours. Our process times two calls: the first (cold: it includes the one-time
compilation of the CPU lens statistics) and the second (warm); 0.2.1 has nothing to warm
up. Greedy ids must agree between the two.

It also measures what the lens fixes change (docs/migrating-from-0.2.1.md): on the first
`--fix-prompts` profiles, the last column of 0.2.1 (HF's normed last state normed again)
and ours against a float64 lens of the model's own output (tests/oracle.FloatLens), and
the largest difference between the two libraries in the other columns.

`--notebook NAME` instead runs one of 0.2.1's notebooks (seq_tok_analysis,
model_comparison) through the real, unpatched 0.2.1 and through ours, as
tests/test_oracle_notebooks.py does, and prints every line they print differently: what
the lens fixes change in a 0.2.1 user's results.

    python bench/bench_compat.py [--models gpt2-124m smollm2-135m] [--threads 1]
        [--rounds 1] [--fix-prompts 8] [--prompts 16] [--dtype float32]
        [--out bench/results_compat.json]
    python bench/bench_compat.py --notebook seq_tok_analysis
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 32


def prompts(n: int = 16) -> list[str]:
    """The first n prompts of the bundled sample corpus (read without importing torch)."""
    lines = (ROOT / "entropy_fast" / "data" / "sample_prompts.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip()][:n]


def model_folder(name: str) -> Path:
    """A saved model both libraries can load: SmolLM2, or the GPT-2-124M shape beside it."""
    from entropy_fast.models import _cache_root, model_source

    smollm2 = Path(model_source("smollm2-135m"))
    if name == "smollm2-135m":
        return smollm2
    folder = _cache_root() / "bench" / "gpt2-124m-random"
    if not (folder / "config.json").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.for_model("gpt2", n_embd=768, n_layer=12, n_head=12,
                                      n_positions=1024, vocab_size=50257)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(smollm2).save_pretrained(folder)  # V=49152 fits
    return folder


def side(path: str, threads: int, calls: int, n_prompts: int, dtype: str) -> dict:
    """One process's measurement: whichever `entropy_profiler` this interpreter imports."""
    import torch

    torch.set_num_threads(threads)
    from entropy_profiler import EntropyProfiler

    started = time.perf_counter()
    profiler = EntropyProfiler(path, device="cpu", dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - started
    seconds, batch = [], None
    for _ in range(calls):
        started = time.perf_counter()
        batch = profiler.profile_batch(prompts(n_prompts), max_new_tokens=NEW_TOKENS)
        seconds.append(time.perf_counter() - started)
    tokens = sum(p.n_tokens for p in batch.profiles)
    return {"load_s": round(load_s, 2), "call_s": [round(s, 2) for s in seconds],
            "tokens": tokens, "threads": torch.get_num_threads(),
            "ids": [p.token_ids.tolist() for p in batch.profiles],
            "entropy": [p.entropy.tolist() for p in batch.profiles],
            "n_layers": batch.profiles[0].n_layers}


def run_side(python: str, path: Path, calls: int, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([python, __file__, "--side", str(path), "--threads", str(args.threads),
                           "--calls", str(calls), "--prompts", str(args.prompts),
                           "--dtype", args.dtype], env=env, capture_output=True, text=True,
                          cwd="/")
    if done.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> float:
    return round(os.getloadavg()[0], 1)


def lens_fix_sizes(path: Path, seed: dict, ours: dict, n_prompts: int) -> dict:
    """Last column of 0.2.1 and ours against a float64 lens; the other columns between them.

    Values in nats over the first n_prompts profiles (rows = generated tokens).
    """
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from tests.oracle import FloatLens

    lens = FloatLens(str(path))
    last_seed, last_ours, last_truth, inner = [], [], [], []
    for k, text in enumerate(prompts(n_prompts)):
        prompt = lens.tokenizer(text)["input_ids"]
        ids = prompt + seed["ids"][k]
        truth, _ = lens.blocks(ids, list(range(len(prompt) - 1, len(ids) - 1)))
        mine, theirs = np.array(ours["entropy"][k]), np.array(seed["entropy"][k])
        last_seed.append(theirs[:, -1])
        last_ours.append(mine[:, -1])
        last_truth.append(truth[:, -1].numpy())
        inner.append(np.abs(mine[:, :-1] - theirs[:, :-1]).max())
    last_seed, last_ours, last_truth = map(np.concatenate, (last_seed, last_ours, last_truth))
    return {"rows": len(last_truth), "last_mean_entropy_float64": round(last_truth.mean(), 4),
            "last_mean_entropy_seed": round(last_seed.mean(), 4),
            "last_mean_abs_error_seed": float(np.abs(last_seed - last_truth).mean()),
            "last_max_abs_error_seed": float(np.abs(last_seed - last_truth).max()),
            "last_max_abs_error_ours": float(np.abs(last_ours - last_truth).max()),
            "other_columns_max_abs_diff": float(max(inner))}


def bench_model(name: str, args) -> dict:
    path = model_folder(name)
    row: dict = {"model": name, "threads": args.threads, "dtype": args.dtype, "ours": [],
                 "seed": []}
    for _ in range(args.rounds):
        for who, python, calls in (("ours", sys.executable, 2), ("seed", args.seed_python, 1),
                                   ("ours", sys.executable, 2)):
            result = {**run_side(python, path, calls, args), "load_avg": load_average()}
            print(name, who, {k: v for k, v in result.items() if k not in ("ids", "entropy")},
                  flush=True)
            row[who].append(result)
    seed_ids = row["seed"][0]["ids"]
    row["same_greedy_ids"] = all(r["ids"] == seed_ids for r in row["ours"] + row["seed"])
    tokens = row["seed"][0]["tokens"]
    seed_s = min(r["call_s"][0] for r in row["seed"])
    warm_s = min(r["call_s"][1] for r in row["ours"])
    cold_s = min(r["call_s"][0] for r in row["ours"])
    row.update(tokens=tokens, n_layers=row["seed"][0]["n_layers"],
               seed_tok_s=round(tokens / seed_s, 2), ours_warm_tok_s=round(tokens / warm_s, 2),
               ours_cold_tok_s=round(tokens / cold_s, 2),
               speedup_warm=round(seed_s / warm_s, 1), speedup_cold=round(seed_s / cold_s, 1))
    if row["same_greedy_ids"] and args.fix_prompts:
        row["lens_fixes"] = lens_fix_sizes(path, row["seed"][0], row["ours"][0],
                                           args.fix_prompts)
    for result in row["ours"] + row["seed"]:
        del result["ids"], result["entropy"]
    return row


def notebook_diff(name: str, seed_python: str) -> list[dict]:
    """Cells of notebook `name` whose output differs between 0.2.1 and ours, line by line."""
    import tempfile

    sys.path.insert(0, str(ROOT))
    from tests import oracle

    python = Path(seed_python)
    cache = Path(tempfile.gettempdir()) / "entropy-profiler-oracle"
    cache.mkdir(exist_ok=True)
    paths = oracle.notebook_models(cache)
    notebook = oracle.sdist_notebook(python, name)
    spec = oracle.notebook_spec(notebook, paths)
    script = ROOT / "tests" / "oracle_notebooks.py"
    seed = json.loads(oracle.run_cached(python, script, spec, cache,
                                        [*paths.values(), notebook], suffix=".json").read_text())
    oracle.run_script(Path(sys.executable), script, spec, cache / f"ours-{name}.json")
    ours = json.loads((cache / f"ours-{name}.json").read_text())
    changed = []
    for mine, theirs in zip(ours, seed, strict=True):
        lines = [(a, b) for a, b in zip(mine["stdout"].splitlines(),
                                        theirs["stdout"].splitlines(), strict=False) if a != b]
        if lines or mine["ok"] != theirs["ok"]:
            changed.append({"cell": mine["cell"], "ok": [theirs["ok"], mine["ok"]],
                            "lines": [{"0.2.1": b, "ours": a} for a, b in lines]})
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-124m", "smollm2-135m"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--fix-prompts", type=int, default=8,
                        help="profiles on which to measure the lens fixes (0: skip)")
    parser.add_argument("--seed-python", default=str(ROOT / ".venv-oracle" / "bin" / "python"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_compat.json"))
    parser.add_argument("--notebook", choices=["seq_tok_analysis", "model_comparison"])
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.threads, args.calls, args.prompts, args.dtype)))
        return
    if args.notebook:
        print(json.dumps(notebook_diff(args.notebook, args.seed_python), indent=1))
        return
    rows = [bench_model(name, args) for name in args.models]
    import torch

    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k not in ("ours", "seed")}))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
