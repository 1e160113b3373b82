"""CLI start-up time: each command against `python -c pass`, interleaved, same run.

Commands that need no model (`--help`, `queries`, `query`, `info`, `check`) must start in
well under a second: `import entropy_fast` loads no torch. `--before PATH` also times a
checkout of an older commit (PYTHONPATH=PATH), e.g. one made with
`git worktree add /tmp/before 4a6d1fd`.

    python bench/bench_startup.py [--repeat 7] [--before /tmp/before]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_model(folder: Path) -> Path:
    """A tiny random model folder, for stores to profile."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import tiny_model, tiny_tokenizer

    model = folder / "model"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    return model


def make_store(tree: str, model: Path, folder: Path) -> Path:
    """A small real store (one tiny run) written by `tree`'s own CLI (a store's format
    changes between versions), for its query / info / check to read."""
    corpus = folder / "prompts.txt"
    corpus.write_text("one prompt here\nand another\n")
    store = folder / f"store-{Path(tree).name}"
    subprocess.run([sys.executable, "-m", "entropy_fast.cli", "profile", str(model),
                    "--prompts", str(corpus), "--out", str(store), "--max-new-tokens", "0",
                    "--no-plot", "--no-progress"], env={**os.environ, "PYTHONPATH": tree},
                   cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return store


def timed(argv: list[str], env: dict, cwd: str) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def commands(store: str) -> dict[str, list[str] | None]:
    """The timed commands (None: `python -c pass`, the baseline)."""
    return {"python -c pass": None, "--help": ["--help"], "queries": ["queries"],
            "query": ["query", store, "mean_profile"], "info": ["info", store],
            "check": ["check", store]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--before", help="checkout of an older commit to time as well")
    args = parser.parse_args()
    trees = {"now": str(ROOT), **({"before": args.before} if args.before else {})}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp))
        stores = {tree: str(make_store(path, model, Path(tmp))) for tree, path in trees.items()}
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeat):
            for tree, path in trees.items():
                env = {**os.environ, "PYTHONPATH": path}
                for name, rest in commands(stores[tree]).items():
                    argv = ([sys.executable, "-c", "pass"] if rest is None else
                            [sys.executable, "-m", "entropy_fast.cli", *rest])
                    times.setdefault((tree, name), []).append(timed(argv, env, tmp))
    print(f"median of {args.repeat} runs, seconds (python {sys.version.split()[0]})")
    print("| command | " + " | ".join(trees) + " |")
    print("|---|" + "---:|" * len(trees))
    for name in commands(""):
        cells = [f"{statistics.median(times[tree, name]):.2f}" for tree in trees]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
