"""The Ray engine on a real local Ray cluster: CPU only, loopback, one cluster for the file.

Tiny random models on disk, two lens actors. The store a Ray run writes must equal the
single-process store of `profile_corpus` (same keys and token ids; entropies equal to
float32 rounding, which differs with batch composition in either engine); a crashed
actor, a SIGKILLed actor, a write task killed between a part's files and its manifest
entry, and an actor that raises must all end with every (prompt, pos, layer, alpha) once.

They skip where Ray is not installed, except under ENTROPY_FAST_REQUIRE_RAY=1 (set by
.ci/run, which runs this file alone after the README's suite), where that is a failure. Under
xdist all of them run on one worker (xdist_group), so a test session starts one cluster
(~15 s here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from entropy_fast.cli import main
from entropy_fast.distributed import RayEngine
from entropy_fast.errors import ConfigError
from entropy_fast.pipeline import generate_corpus, profile_corpus
from entropy_fast.store import PROFILE, Store
from entropy_fast.store.check import check_store
from entropy_fast.store.sql import ProfileStore
from tests.tiny_models import tiny_model, tiny_tokenizer

if os.environ.get("ENTROPY_FAST_REQUIRE_RAY") != "1":
    pytest.importorskip("ray", reason="the ray extra is not installed")
import ray

from entropy_fast.ray_stages import FAULTS  # imports ray: after the skip

# at most ~100 s each here: a stalled cluster fails in 10 min with every thread's stack
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray"), pytest.mark.timeout(600)]

N_PROMPTS = 40
KEYS = "model, prompt_id, pos, layer, alpha"


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local cluster: more logical CPUs than the 2 cores, so that write tasks run
    beside the two actors; loopback only, no dashboard."""
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="warning")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for kind, seed in (("llama", 0), ("gpt2", 1)):
        folder = root / kind
        tiny_model(kind, seed=seed).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        paths[kind] = str(folder)
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "prompts.jsonl"  # metadata: kind, i
    path.write_text("\n".join(json.dumps({
        "text": f"prompt {i}: " + "abc defg hi"[: 1 + i % 11] * (1 + i % 3),
        "kind": f"k{i % 3}", "i": i}) for i in range(N_PROMPTS)) + "\n")
    return str(path)


def table(store: Path, sql: str):
    with ProfileStore(store) as db:
        return db.sql(sql)


def assert_exactly_once(store: Path, n_models: int = 1) -> None:
    """Every prompt of every run committed once, each key once, the store sound."""
    entries = Store(store).manifest()
    for run_id in {e.run_id for e in entries}:
        ids = sorted(i for e in entries if e.run_id == run_id for i in e.prompt_ids)
        assert ids == list(range(N_PROMPTS)), run_id
    duplicates = table(store, f"SELECT {KEYS}, count(*) AS n FROM entropy GROUP BY ALL "
                              "HAVING n > 1")
    assert duplicates.num_rows == 0
    assert check_store(store).problems == []
    assert [r.status for r in Store(store).runs()] == ["complete"] * n_models


def test_two_models_equal_the_single_process_store(models, corpus, tmp_path):
    """Two models in one run, two actors: llama profiles the continuations of a stored
    generation stage, gpt2 generates its own in the actors; the store equals the one
    `profile_corpus` writes in one process from the same generation stage."""
    options = dict(max_new_tokens=3, alpha=(1.0, 2.0), part_rows=400)
    generate_corpus(models["llama"], corpus, tmp_path / "ray", max_new_tokens=3)
    shutil.copytree(tmp_path / "ray", tmp_path / "local")
    on_ray = profile_corpus([models["llama"], models["gpt2"]], corpus, tmp_path / "ray",
                            engine=RayEngine(workers=2), **options)
    local = profile_corpus([models["llama"], models["gpt2"]], corpus, tmp_path / "local",
                           **options)
    assert on_ray[0].generation is not None and on_ray[1].generation is None
    assert [r.generation for r in on_ray] == [r.generation for r in local]
    assert [r.prompts for r in on_ray] == [N_PROMPTS, N_PROMPTS]
    assert [r.tokens for r in on_ray] == [r.tokens for r in local]
    assert [r.info.run_id for r in on_ray] == [r.info.run_id for r in local]
    assert_exactly_once(tmp_path / "ray", n_models=2)
    assert len(Store(tmp_path / "ray").manifest()) > 2 * 4  # several units per model

    rows = f"SELECT {KEYS}, token_id, entropy FROM entropy ORDER BY {KEYS}"
    ray_rows, local_rows = table(tmp_path / "ray", rows), table(tmp_path / "local", rows)
    assert ray_rows.drop(["entropy"]).equals(local_rows.drop(["entropy"]))
    # float32 rounding differs with batch composition: measured up to 1.5e-5 here
    np.testing.assert_allclose(ray_rows["entropy"].to_numpy(), local_rows["entropy"].to_numpy(),
                               rtol=0, atol=5e-5)
    prompts = ("SELECT model, prompt_id, text, prompt_token_ids, n_tokens, source, source_line, "
               "metadata, kind, i FROM prompts ORDER BY model, prompt_id")
    assert table(tmp_path / "ray", prompts).equals(table(tmp_path / "local", prompts))
    assert table(tmp_path / "ray", "SELECT DISTINCT kind, i % 3 AS r FROM prompts ORDER BY 1"
                 ).to_pylist() == [{"kind": f"k{r}", "r": r} for r in range(3)]
    records = {r.run_id: r for r in Store(tmp_path / "local").runs()}
    for record in Store(tmp_path / "ray").runs():
        assert record.layer_indices == records[record.run_id].layer_indices
        assert record.identity() == records[record.run_id].identity()

    again = profile_corpus([models["llama"], models["gpt2"]], corpus, tmp_path / "ray",
                           engine=RayEngine(workers=2), **options)
    assert [(r.done_before, r.prompts) for r in again] == [(N_PROMPTS, 0)] * 2


def kill_an_actor(faults: Path, killed: list[int]) -> None:
    """SIGKILL a live lens actor once the other fault has crashed one (so that most units
    are still to do); the pids come from the fault hook."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not killed:
        if (faults / "fired-lens_exit").exists():
            for pid in (int(p.name.removeprefix("actor-")) for p in faults.glob("actor-*")):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # the crashed one
                    continue
                killed.append(pid)
                return
        time.sleep(0.05)


def test_crashed_and_killed_workers_are_retried_exactly_once(models, corpus, tmp_path,
                                                              monkeypatch):
    """An actor's process exits at its 2nd unit, the test then SIGKILLs the other actor,
    and a write task's process exits between a part's files and its entry: Ray restarts
    the actors and retries the tasks, and the run completes with every prompt once; a
    rerun has nothing to do."""
    faults, store = tmp_path / "faults", tmp_path / "store"
    faults.mkdir()
    monkeypatch.setenv(FAULTS, json.dumps({"dir": str(faults), "lens_exit": 2,
                                           "write_exit": True}))
    killed: list[int] = []
    killer = threading.Thread(target=kill_an_actor, args=(faults, killed))
    killer.start()
    try:
        (result,) = profile_corpus(models["llama"], corpus, store, max_new_tokens=0,
                                   part_rows=1, engine=RayEngine(workers=2))
    finally:
        killer.join()
    assert killed, "no live actor was found to kill"
    assert {p.name for p in faults.glob("fired-*")} == {"fired-lens_exit", "fired-write_exit"}
    assert len(list(faults.glob("actor-*"))) >= 3  # two actors and a restart at least
    assert result.prompts == N_PROMPTS
    assert_exactly_once(store)
    assert len(Store(store).manifest()) == N_PROMPTS  # part_rows=1: one prompt per part

    monkeypatch.delenv(FAULTS)
    (again,) = profile_corpus(models["llama"], corpus, store, max_new_tokens=0, part_rows=1,
                              engine=RayEngine(workers=2))
    assert (again.done_before, again.prompts) == (N_PROMPTS, 0)


def test_a_failed_write_stops_the_run_intact_and_the_same_command_finishes_it(
        models, corpus, tmp_path, monkeypatch, capsys):
    """The CLI path: once 5 parts are committed, a write task raises between a part's files
    and its entry (an error is not retried); the run stops as failed with the store sound,
    and the same command then commits exactly the rest."""
    faults, store = tmp_path / "faults", tmp_path / "store"
    faults.mkdir()
    argv = ["profile", models["llama"], "--prompts", corpus, "--out", str(store), "--ray",
            "--workers", "1", "--max-new-tokens", "0", "--part-rows", "1", "--no-plot",
            "--no-progress"]  # one actor: the other tests have two
    monkeypatch.setenv(FAULTS, json.dumps({"dir": str(faults), "write_raise": 5}))
    with pytest.raises(Exception, match="injected fault"):
        main(argv)
    (record,) = Store(store).runs()
    assert record.status == "failed" and "injected fault" in record.error
    # Final: a write task still committing when the job failed finished before the driver
    # recorded the failure, or commits nothing (a CI run saw 5 here, then 6 on resume).
    committed = Store(store).committed(PROFILE, record)
    assert 5 <= len(committed) < N_PROMPTS
    report = check_store(store)
    assert report.problems == [] and any("uncommitted" in n for n in report.notes)

    monkeypatch.delenv(FAULTS)
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert f"{len(committed)} of {N_PROMPTS} prompts already committed" in err
    assert f"| {N_PROMPTS} prompts, " in out and "layer    mean" in out
    assert_exactly_once(store)
    assert not any("uncommitted" in n for n in check_store(store).notes)


def test_cuda_on_a_cluster_without_gpus_is_refused_before_any_work(models, corpus, tmp_path):
    with pytest.raises(ConfigError, match="asks for GPUs but the Ray cluster has none"):
        profile_corpus(models["llama"], corpus, tmp_path / "store", max_new_tokens=0,
                       device="cuda", engine="ray")
    with pytest.raises(ConfigError, match="more than the cluster's 4 CPUs"):
        profile_corpus(models["llama"], corpus, tmp_path / "store", max_new_tokens=0,
                       engine=RayEngine(workers=5))
    assert Store(tmp_path / "store").runs() == []
