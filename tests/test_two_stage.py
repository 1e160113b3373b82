"""Two-stage corpus runs: `generate` stores continuations, `profile` reuses them.

Covers the generation stage's commit protocol (resume after a real SIGKILL, nothing
twice, a finished stage does nothing), profiles of stored continuations against profiles
that `profile` makes when it generates itself, `info`, `check` and the `continuations`
view.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from entropy_fast.store import GENERATION, Store
from entropy_fast.store.check import check_store
from entropy_fast.store.codec import read_profiles
from entropy_fast.store.sql import ProfileStore
from tests.cli_runner import run_cli

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time there",
           "1, 2, 3, 4,", "Why is the sky blue?", "Hello"]


@pytest.fixture(scope="module")
def llama(saved_models) -> str:
    """The tiny Llama, by path (the module's tests run the CLI on it)."""
    return saved_models["llama"]


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def test_profile_of_stored_continuations_equals_direct(llama, corpus, tmp_path, capsys):
    store, direct = str(tmp_path / "two-stage"), str(tmp_path / "direct")
    settings = ["--prompts", corpus, "--max-new-tokens", "4", "--no-progress"]
    code, out, err = run_cli(capsys, "generate", llama, *settings, "--out", store,
                             "--part-prompts", "4")
    assert code == 0, err
    assert "6 prompts" in out
    code, out, err = run_cli(capsys, "generate", llama, *settings, "--out", store)
    assert code == 0 and "nothing to do" in err

    code, out, err = run_cli(capsys, "profile", llama, *settings, "--out", store, "--no-plot")
    assert code == 0, err
    assert "profiling the continuations of generation" in err and "| 6 prompts, " in out
    code, out, err = run_cli(capsys, "profile", llama, *settings, "--out", direct, "--no-plot")
    assert code == 0 and "profiling the continuations" not in err, err

    stored, fresh = (dict(read_profiles(Store(s), llama)) for s in (store, direct))
    assert sorted(stored) == list(range(len(PROMPTS)))
    for prompt_id, profile in stored.items():
        assert profile.token_ids.tolist() == fresh[prompt_id].token_ids.tolist()
        assert profile.metadata["generator"] == "hf"
        torch.testing.assert_close(profile.entropy, fresh[prompt_id].entropy,
                                   atol=1e-5, rtol=1e-5)

    with ProfileStore(store) as db:
        rows = db.sql("SELECT prompt_id, continuation_token_ids, generator FROM continuations "
                      "ORDER BY prompt_id").to_pylist()
        assert db.sql("SELECT status FROM generations").to_pylist() == [{"status": "complete"}]
    assert [r["continuation_token_ids"] for r in rows] == [
        stored[i].token_ids.tolist() for i in range(len(PROMPTS))]
    assert {r["generator"] for r in rows} == {"hf"}

    code, out, _ = run_cli(capsys, "info", store)
    assert code == 0 and "generation stages" in out and "6/6" in out and "greedy" in out
    code, out, _ = run_cli(capsys, "check", store)
    assert code == 0 and out.strip().endswith("OK")

    code, out, err = run_cli(capsys, "profile", llama, *settings[:3], "3", "--out", store,
                             "--no-plot", "--no-progress")  # other settings: generates itself
    assert code == 0 and "profiling the continuations" not in err and "| 6 prompts" in out


def test_generate_resumes_after_sigkill(llama, tmp_path, capsys):
    """A generation stage killed with SIGKILL resumes: every prompt exactly once."""
    corpus = tmp_path / "big.txt"
    n = 120
    corpus.write_text("\n".join(f"{PROMPTS[i % 6]} number {i}" for i in range(n)))
    store = tmp_path / "store"
    argv = ["generate", llama, "--prompts", str(corpus), "--out", str(store),
            "--max-new-tokens", "6", "--part-prompts", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "entropy_fast.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (len(list(store.glob(f"{GENERATION.manifest}/*/*.json"))) < 5
           and proc.poll() is None):
        assert time.monotonic() < deadline, "no part committed in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the stage ended before it could be killed"
    entries = Store(store).entries(GENERATION)
    before = {e.continuations_file: (store / e.continuations_file).stat().st_mtime_ns
              for e in entries}
    done_before = sum(e.n_prompts for e in entries)
    assert 5 <= done_before < n

    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert f"{done_before} of 120 prompts already committed" in err
    entries = Store(store).entries(GENERATION)
    assert all((store / f).stat().st_mtime_ns == t for f, t in before.items())
    assert sorted(i for e in entries for i in e.prompt_ids) == list(range(n))
    with ProfileStore(store) as db:
        ids = db.sql("SELECT prompt_id FROM continuations ORDER BY 1").column(0).to_pylist()
    assert ids == list(range(n))
    assert check_store(store).problems == []
    assert Store(store).generations()[0].status == "complete"


def test_incomplete_generation_is_an_error(llama, corpus, tmp_path, capsys):
    store = str(tmp_path / "store")
    settings = ["--prompts", corpus, "--max-new-tokens", "2", "--out", store, "--no-progress"]
    code, _, err = run_cli(capsys, "generate", llama, *settings, "--shard", "0/2")
    assert code == 0, err
    code, _, err = run_cli(capsys, "profile", llama, *settings, "--no-plot")
    assert code == 1 and "lacks 3 of the prompts" in err
    code, _, err = run_cli(capsys, "profile", llama, *settings, "--no-plot", "--shard", "0/2",
                           "--run-id", "sharded")
    assert code == 0, err  # the prompts of shard 0/2 are all stored


def test_check_finds_broken_generation_parts(llama, corpus, tmp_path, capsys):
    store = tmp_path / "store"
    code, _, err = run_cli(capsys, "generate", llama, "--prompts", corpus, "--out", str(store),
                           "--max-new-tokens", "2", "--part-prompts", "3", "--no-progress")
    assert code == 0, err
    first, second = Store(store).entries(GENERATION)
    stray = store / Path(first.continuations_file).with_name("part-s0of1-000009.parquet")
    pq.write_table(pq.read_table(store / first.continuations_file), stray)
    with ProfileStore(store) as db:  # the view reads committed files only
        assert db.sql("SELECT count(*) FROM continuations").column(0).to_pylist() == [6]
    report = check_store(store)
    problems, notes = report.problems, report.notes
    assert problems == [] and any("uncommitted" in n for n in notes)

    table = pq.read_table(store / second.continuations_file)
    shorter = table.set_column(4, "continuation_token_ids",
                               pa.array([[1]] * 3, pa.list_(pa.int32())))
    pq.write_table(shorter, store / second.continuations_file)
    code, out, _ = run_cli(capsys, "check", str(store))
    assert code == 1 and f"{second.continuations_file}: damaged: " in out
    assert f"prompts {', '.join(map(str, second.prompt_ids))}" in out
    (store / first.continuations_file).unlink()
    code, out, _ = run_cli(capsys, "check", str(store))
    assert code == 1 and "committed in the manifest but missing" in out


def test_generate_user_errors(llama, corpus, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "generate", "--help")
    assert code == 0 and "usage: entropy-fast generate" in out
    code, _, err = run_cli(capsys, "generate", llama, "--prompts", corpus, "--out",
                           str(tmp_path / "s"), "--max-new-tokens", "0")
    assert code == 1 and "--max-new-tokens >= 1" in err
