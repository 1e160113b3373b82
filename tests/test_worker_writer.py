"""WorkerWriter: parts committed by processes other than the shard's registered writer.

A distributed run's driver registers the shard (RunWriter, register_layers); its workers
commit parts with WorkerWriter. Retries and overlaps must never commit a prompt twice, and
once the driver has recorded the run's final status no worker commits.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from entropy_fast.corpus import Corpus
from entropy_fast.store import PROFILE, Store, StoreError
from entropy_fast.store.check import check_store
from entropy_fast.store.codec import profile_rows, read_profiles
from entropy_fast.store.writer import WorkerWriter
from tests.test_store import ALPHAS, random_profile, run_info

LAYERS = [0, 2, 4, 5]


class Interrupted(Exception):
    """Stands for a process killed at a commit step."""


@pytest.fixture
def corpus() -> Corpus:
    return Corpus.from_texts([f"prompt {i}" for i in range(12)])


@pytest.fixture
def profiles(corpus):
    rng = np.random.default_rng(1)
    return {p.prompt_id: random_profile(rng, 1 + p.prompt_id % 4, LAYERS)
            for p in corpus.prompts}


@pytest.fixture
def registered(tmp_path, corpus):
    """A store whose run shard a driver has registered (lock held, layers recorded)."""
    store = Store(tmp_path / "s", create=True)
    driver = store.writer(run_info("m", corpus), shared=True)
    driver.register_layers(LAYERS, None)
    yield store, driver
    driver.close()


def commit(store, info, corpus, profiles, ids, hook=None) -> WorkerWriter:
    """What a write task does: one WorkerWriter, one part of `ids`."""
    writer = WorkerWriter(store, info)
    writer.step_hook = hook
    for i in ids:
        profile = profiles[i]
        rows, _ = profile_rows(i, profile, ALPHAS)
        writer.add_batch([corpus.prompts[i]], rows, [profile.n_tokens], profile.layer_indices,
                         [profile.metadata["prompt_token_ids"]])
    writer.commit()
    return writer


def committed_ids(store, info) -> list[int]:
    return sorted(i for e in store.entries(PROFILE, info.run_id) for i in e.prompt_ids)


def test_overlaps_and_retries_commit_nothing_twice(registered, corpus, profiles):
    store, driver = registered
    info = driver.info
    first = commit(store, info, corpus, profiles, range(0, 6))
    assert [e.prompt_ids for e in first.entries] == [tuple(range(6))]
    assert first.entries[0].entropy_file.endswith("part-s0of1-p000000000-000000005.parquet")
    overlapping = commit(store, info, corpus, profiles, range(3, 9))
    assert [e.prompt_ids for e in overlapping.entries] == [(6, 7, 8)]
    assert commit(store, info, corpus, profiles, range(0, 6)).entries == []  # a retry
    commit(store, info, corpus, profiles, [11, 9, 10])
    assert committed_ids(store, info) == list(range(12))

    driver.close()
    assert store.run(info.run_id).status == "complete"
    assert store.run(info.run_id).layer_indices == LAYERS
    assert check_store(store.root).problems == []
    back = dict(read_profiles(store, "m"))
    for i, profile in profiles.items():
        for alpha in ALPHAS:
            assert torch.equal(back[i].entropies[alpha], profile.entropies[alpha])


def test_a_commit_killed_before_its_entry_is_redone_under_the_same_name(registered, corpus,
                                                                         profiles):
    store, driver = registered

    def killed(step: str) -> None:
        if step == "files":
            raise Interrupted

    with pytest.raises(Interrupted):
        commit(store, driver.info, corpus, profiles, [4, 5, 6], hook=killed)
    assert committed_ids(store, driver.info) == []
    parts = sorted(p.name for p in store.root.rglob("*.parquet"))
    retry = commit(store, driver.info, corpus, profiles, [4, 5, 6])
    assert [e.prompt_ids for e in retry.entries] == [(4, 5, 6)]
    assert sorted(p.name for p in store.root.rglob("*.parquet")) == parts  # no orphan
    report = check_store(store.root)
    assert report.problems == [] and not any("uncommitted" in n for n in report.notes)


def test_worker_parts_beside_sequence_numbered_parts(tmp_path, corpus, profiles):
    """A run begun by one process and resumed by workers: their parts never overlap."""
    store = Store(tmp_path / "s", create=True)
    info = run_info("m", corpus)
    with store.writer(info) as local:
        for i in (0, 1, 2):
            local.add(corpus.prompts[i], profiles[i])
    driver = store.writer(run_info("m", corpus))
    driver.register_layers(LAYERS, "abc123")
    written = commit(store, driver.info, corpus, profiles, range(1, 12))
    driver.close()
    assert [e.prompt_ids for e in written.entries] == [tuple(range(3, 12))]
    assert committed_ids(store, info) == list(range(12))
    assert store.run(info.run_id).revision == "abc123"
    assert check_store(store.root).problems == []


def test_register_layers_refuses_other_layers(registered):
    store, driver = registered
    assert store.run(driver.info.run_id).layer_indices == LAYERS  # before any part
    with pytest.raises(StoreError, match="the model now gives"):
        driver.register_layers([0, 1], None)


def test_repair_sets_aside_a_damaged_worker_part(registered, corpus, profiles):
    store, driver = registered
    commit(store, driver.info, corpus, profiles, range(0, 4))
    (damaged,) = commit(store, driver.info, corpus, profiles, range(4, 8)).entries
    path = store.root / damaged.entropy_file
    path.write_bytes(path.read_bytes()[:-9] + b"corrupted")
    assert any("sha256" in p for p in check_store(store.root).problems)
    report = check_store(store.root, repair=True)
    assert any("manifest/" in line and "p000000004-000000007.json" in line
               for line in report.repaired)
    assert check_store(store.root).problems == []
    assert store.pending(PROFILE, driver.info) == list(range(4, 12))


def test_a_part_after_the_driver_ended_the_run_is_refused(registered, corpus, profiles):
    """A failed job's write task that is still running when the driver records the failure
    (Ray cancels it, but cannot stop it at once) commits nothing."""
    store, driver = registered
    commit(store, driver.info, corpus, profiles, [0, 1])
    driver.close("RuntimeError: a write task failed")
    with pytest.raises(StoreError, match="is failed: its driver has ended it"):
        commit(store, driver.info, corpus, profiles, [2, 3])
    assert committed_ids(store, driver.info) == [0, 1]
    assert check_store(store.root).problems == []

    resumed = store.writer(run_info("m", corpus), shared=True)  # the same command again
    assert resumed.pending == list(range(2, 12))
    commit(store, resumed.info, corpus, profiles, range(2, 12))
    resumed.close()
    assert store.run(driver.info.run_id).status == "complete"


def test_the_driver_records_its_final_status_after_a_commit_in_progress(registered, corpus,
                                                                        profiles):
    """The driver's close waits for a worker's commit (the commit lock): the record never
    says "failed" while a part is still being committed, and the driver counts that part."""
    store, driver = registered
    closing = threading.Thread(target=driver.close, args=("RuntimeError: boom",))
    seen = []

    def between_files_and_entry(step: str) -> None:
        if step == "files":
            closing.start()
            time.sleep(0.5)  # the close would have written its record by now
            seen.append(store.run(driver.info.run_id).status)

    commit(store, driver.info, corpus, profiles, [4, 5], hook=between_files_and_entry)
    closing.join()
    assert seen == ["running"]
    assert store.run(driver.info.run_id).status == "failed"
    assert {4, 5} <= driver.done and committed_ids(store, driver.info) == [4, 5]
