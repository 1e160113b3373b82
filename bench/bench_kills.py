"""Randomized kill loop: `entropy-fast profile --out` killed at uniformly random moments.

Each round profiles a corpus into a fresh store with a tiny random model (text mode, one
prompt per part: many small commits), killing the process `--kills-per-round` times
(SIGKILL, SIGINT or SIGTERM, drawn at random), restarting it after each kill, then letting
it finish. A kill lands at a moment drawn uniformly over the profiling phase (after the
process's first commit, over the span the uninterrupted run spent committing), or, one
time in four, uniformly over the whole run from process start (start-up included). The
finished store is compared row by row with an uninterrupted reference run: rows lost,
duplicated and wrong must all be 0, and `check` must find nothing. Also reports, for
kills that land while the process is profiling (after its first commit), the work lost:
the seconds since its last commit.

    python bench/bench_kills.py --kills 50 --kills-per-round 9   # rounds until 50 kills
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


def make_model(folder: Path) -> None:
    from tests.tiny_models import tiny_model, tiny_tokenizer

    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def command(model: Path, corpus: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "entropy_fast.cli", "profile", str(model), "--prompts",
            str(corpus), "--out", str(store), "--max-new-tokens", "0", "--alpha", "1",
            "--alpha", "2", "--batch-tokens", "256", "--part-rows", "1",
            "--flush-seconds", "0", "--no-plot", "--no-progress", "--dtype", "float32"]


def rows(store: Path) -> dict[tuple, float]:
    from entropy_fast.store.sql import ProfileStore

    with ProfileStore(store) as db:
        table = db.sql("SELECT prompt_id, pos, layer, alpha, entropy FROM entropy").to_pylist()
    out: dict[tuple, float] = {}
    duplicates = 0
    for r in table:
        key = (r["prompt_id"], r["pos"], r["layer"], r["alpha"])
        duplicates += key in out
        out[key] = r["entropy"]
    return out if not duplicates else {**out, ("duplicates",): duplicates}


def commit_times(store: Path) -> list[float]:
    return sorted(p.stat().st_mtime for p in store.glob("manifest/*/*.json"))


def wait_for_commit(proc: subprocess.Popen, store: Path, before: int) -> bool:
    """Wait until the process has committed a part; False if it ended first."""
    while len(commit_times(store)) <= before:
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return True


def kill_round(model: Path, corpus: Path, store: Path, duration: float, span: float,
               kills: int, rng: random.Random, env: dict) -> list[dict]:
    events = []
    while len(events) < kills:
        started = time.time()
        before = len(commit_times(store))
        proc = subprocess.Popen(command(model, corpus, store), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0, duration))
        elif wait_for_commit(proc, store, before):
            time.sleep(rng.uniform(0, span))
        name = rng.choice(list(SIGNALS))
        if proc.poll() is not None:  # finished before the kill: the round's run is done
            break
        killed_at = time.time()
        proc.send_signal(SIGNALS[name])
        proc.wait()
        mine = commit_times(store)[before:]  # this process's commits
        lost = round(killed_at - mine[-1], 2) if mine else None  # None: killed in start-up
        events.append({"signal": name, "at_s": round(killed_at - started, 2),
                       "returncode": proc.returncode, "lost_s": lost})
    subprocess.run(command(model, corpus, store), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="rounds run until this many")
    parser.add_argument("--kills-per-round", type=int, default=9)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_kills.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ENTROPY_FAST_COMPILE": "0",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(f"prompt {i}: " + "lorem ipsum " * (1 + i % 7)
                                    for i in range(args.prompts)))
        started = time.time()
        subprocess.run(command(tmp / "model", corpus, tmp / "reference"), env=env, check=True)
        duration = time.time() - started
        stamps = commit_times(tmp / "reference")
        span = stamps[-1] - stamps[0]
        reference = rows(tmp / "reference")
        results = []
        from entropy_fast.store.check import check_store

        round_ = 0
        while sum(len(r["kills"]) for r in results) < args.kills:
            store = tmp / f"round{round_}"
            round_ += 1
            events = kill_round(tmp / "model", corpus, store, duration, span,
                                args.kills_per_round, rng, env)
            got = rows(store)
            results.append({
                "kills": events,
                "rows_lost": len(set(reference) - set(got)),
                "rows_duplicated": int(got.get(("duplicates",), 0)),
                "rows_wrong": sum(got.get(k) != v for k, v in reference.items() if k in got),
                "check_problems": check_store(store).problems})
            print(f"round {round_}: {len(events)} kills, lost {results[-1]['rows_lost']}, "
                  f"duplicated {results[-1]['rows_duplicated']}, wrong "
                  f"{results[-1]['rows_wrong']}, check {results[-1]['check_problems'] or 'OK'}")
    kills = [e for r in results for e in r["kills"]]
    profiling = [e["lost_s"] for e in kills if e["lost_s"] is not None]
    summary = {
        "date": str(date.today()), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "prompts": args.prompts, "reference_run_s": round(duration, 2),
        "reference_commit_span_s": round(span, 2),
        "kills": len(kills), "by_signal": {s: sum(e["signal"] == s for e in kills)
                                           for s in SIGNALS},
        "rows_reference": len(reference),
        "rows_lost": sum(r["rows_lost"] for r in results),
        "rows_duplicated": sum(r["rows_duplicated"] for r in results),
        "rows_wrong": sum(r["rows_wrong"] for r in results),
        "check_problems": sum(len(r["check_problems"]) for r in results),
        "kills_while_profiling": len(profiling),
        "lost_s_mean": round(sum(profiling) / max(len(profiling), 1), 3),
        "lost_s_max": max(profiling, default=0.0),
        "rounds": results}
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))


if __name__ == "__main__":
    main()
