"""Store integrity: exactly once under interruption at every commit step, concurrent shard
layouts, damage that is named (never read as numbers), any location, weights that change
under a path, repair of a lost part, and a restricted SQL mode.

Interrupts are injected at exact commit steps (`PartWriter.step_hook`), never by timing.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from entropy_fast.corpus import Corpus
from entropy_fast.store import PROFILE, Store, StoreError
from entropy_fast.store.check import check_store
from entropy_fast.store.codec import read_profiles
from entropy_fast.store.sql import ProfileStore, QueryError
from entropy_fast.store.verify import sha256_file
from entropy_fast.store.writer import PartWriter
from tests.test_store import fill, random_profile, run_info

LAYERS = [0, 1, 2]


@pytest.fixture
def corpus() -> Corpus:
    return Corpus.from_texts([f"prompt {i}" for i in range(10)])


@pytest.fixture
def profiles(corpus) -> dict:
    rng = np.random.default_rng(3)
    return {p.prompt_id: random_profile(rng, 1 + p.prompt_id % 4, LAYERS)
            for p in corpus.prompts}


def keys(root) -> list[tuple]:
    """Every (model, run, prompt, pos, layer, alpha) of the store, with its entropy."""
    with ProfileStore(root) as db:
        table = db.sql("SELECT model, run_id, prompt_id, pos, layer, alpha, entropy "
                       "FROM entropy ORDER BY ALL")
    return [tuple(r.values()) for r in table.to_pylist()]


def exactly_once(root, n_rows: int) -> None:
    rows = keys(root)
    assert len(rows) == n_rows and len({r[:6] for r in rows}) == n_rows
    assert check_store(root).problems == []


def n_rows(profiles) -> int:
    return sum(p.n_tokens * p.n_layers * len(p.alphas) for p in profiles.values())


@pytest.mark.parametrize("encoders", [1, 2])
@pytest.mark.parametrize("step", ["files", "entry"])
@pytest.mark.parametrize("signal", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_at_a_commit_step_never_commits_twice(tmp_path, corpus, profiles,
                                                            monkeypatch, step, signal, encoders):
    """Ctrl-C (or SIGTERM's SystemExit) right after a part's files or its manifest entry;
    with two encoders the part is written on a background thread while the next one
    buffers (and the error reaches the caller at its next commit or at close)."""
    store = Store(tmp_path / "s", create=True)
    fired = []

    def interrupt(name: str) -> None:
        if name == step and not fired:
            fired.append(name)
            raise signal()

    monkeypatch.setattr(PartWriter, "step_hook", staticmethod(interrupt))
    with pytest.raises(signal), store.writer(run_info("m", corpus), rows_per_part=40,
                                             encoders=encoders) as writer:
        for prompt in corpus.prompts:
            writer.add(prompt, profiles[prompt.prompt_id])
    assert fired == [step]
    assert store.runs()[0].status in ("interrupted", "failed")
    monkeypatch.setattr(PartWriter, "step_hook", None)
    fill(store, run_info("m", corpus), corpus, profiles)  # the resume
    exactly_once(store.root, n_rows(profiles))


def test_two_shard_layouts_started_together_one_refuses(tmp_path, corpus, monkeypatch):
    """--shard 0/1 and --shard 0/2 of one run at once: the second to register refuses."""
    store = Store(tmp_path / "s", create=True)
    inside, release = threading.Event(), threading.Event()
    original = Store.upgrade_marker

    def slow_registration(self):  # called inside the run lock, after the layout check
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(10)
        original(self)

    monkeypatch.setattr(Store, "upgrade_marker", slow_registration)
    errors = {}

    def open_writer(name: str, n_shards: int) -> None:
        try:
            store.writer(run_info("m", corpus, run_id="r", n_shards=n_shards)).close()
        except StoreError as err:
            errors[name] = str(err)

    first = threading.Thread(target=open_writer, args=("first", 1), name="first")
    second = threading.Thread(target=open_writer, args=("second", 2), name="second")
    first.start()
    assert inside.wait(10)
    second.start()
    time.sleep(0.3)  # the second waits on the run lock, not past it
    assert second.is_alive()
    release.set()
    first.join(10)
    second.join(10)
    assert "first" not in errors and "1] shard(s), not 2" in errors["second"]


@pytest.fixture
def filled(tmp_path, corpus, profiles) -> Store:
    store = Store(tmp_path / "s", create=True)
    fill(store, run_info("m", corpus), corpus, profiles, rows_per_part=30)
    fill(store, run_info("other", corpus), corpus, profiles)
    return store


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", [0.2, 0.35, 0.5, 0.65, 0.8])
def test_a_flipped_byte_is_named_and_never_read(filled, where, caplog):
    entry = next(e for e in filled.manifest() if e.model == "m")
    path = filled.root / entry.entropy_file
    flip_byte(path, int(path.stat().st_size * where))
    report = check_store(filled.root)
    assert any(entry.entropy_file in p and "sha256" in p and
               f"prompts {entry.prompt_ids[0]}" in p for p in report.problems), report.problems
    with ProfileStore(filled.root) as db:
        models = db.sql("SELECT DISTINCT model FROM entropy").column(0).to_pylist()
        assert models == ["other"]  # the damaged run is left out, the other one still reads
    (record,) = caplog.records
    assert record.levelname == "WARNING" and record.name == "entropy_fast"
    assert f"{entry.run_id} (m)" in record.getMessage() and "check --repair" in record.getMessage()
    with pytest.raises(StoreError, match="sha256"):
        list(read_profiles(filled, "m"))


@pytest.mark.parametrize("content", [b"", b"\xff\xfe garbage", b"{\"run_id\": 3"])
@pytest.mark.parametrize("kind", ["entry", "record"])
def test_damaged_metadata_is_one_line_naming_the_file(filled, kind, content):
    entry = filled.manifest()[0]
    path = (filled.manifest_dir(PROFILE, entry.run_id) / f"{entry.shard_key}-000001.json"
            if kind == "entry" else filled.record_path(PROFILE, entry.run_id, "s0of1"))
    path.write_bytes(content)
    with pytest.raises(StoreError) as raised:
        ProfileStore(filled.root)
    message = str(raised.value)
    assert str(path) in message and "check --repair" in message and "\n" not in message
    report = check_store(filled.root)
    assert any(str(path) in p for p in report.problems)


def test_repair_sets_a_lost_part_aside_and_the_rerun_recomputes_it(filled, corpus, profiles,
                                                                   caplog):
    entry = next(e for e in filled.manifest() if e.model == "m")
    (filled.root / entry.entropy_file).unlink()
    with ProfileStore(filled.root) as db:
        assert db.sql("SELECT count(*) AS n FROM entropy WHERE model = 'other'")["n"][0].as_py()
    assert "left out" in caplog.text
    report = check_store(filled.root, repair=True)
    assert report.repaired and any("quarantine" in line for line in report.repaired)
    assert check_store(filled.root).problems == []
    info = run_info("m", corpus)
    assert filled.pending(PROFILE, info) == list(entry.prompt_ids)
    fill(filled, info, corpus, profiles)
    assert check_store(filled.root).problems == []
    assert sorted(i for e in filled.manifest() if e.model == "m"
                  for i in e.prompt_ids) == list(range(len(corpus)))


def test_a_run_killed_before_its_first_part_checks_sound(tmp_path, corpus):
    store = Store(tmp_path / "s", create=True)
    writer = store.writer(run_info("m", corpus))
    writer._lock.release()  # killed: the record says running, no part exists
    report = check_store(store.root)
    assert report.ok and any("running" in n for n in report.notes)


@pytest.mark.parametrize("parent", ["model=x/run=y/store", "st*", "st[1]", "a b/it's"])
def test_the_location_of_a_store_does_not_change_its_contents(tmp_path, corpus, profiles,
                                                               parent):
    decoy = Store(tmp_path / "st1", create=True)  # matches the glob st[1] and st*
    fill(decoy, run_info("decoy", corpus), corpus, profiles)
    store = Store(tmp_path / parent, create=True)
    fill(store, run_info("org/m", corpus), corpus, profiles)
    rows = keys(store.root)
    assert len(rows) == n_rows(profiles) and {r[0] for r in rows} == {"org/m"}
    assert {r[1] for r in rows} == {run_info("org/m", corpus).run_id}


def test_the_same_path_with_other_weights_is_another_run(tmp_path, corpus, profiles):
    from entropy_fast.models import identify
    from tests.tiny_models import tiny_model, tiny_tokenizer

    folder = tmp_path / "mdl"
    tiny_model("llama", seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    before = identify(str(folder))
    shutil.rmtree(folder)
    tiny_model("llama", seed=1).save_pretrained(folder)  # same architecture, new weights
    tiny_tokenizer().save_pretrained(folder)
    after = identify(str(folder))
    assert before.label == after.label == str(folder.resolve())
    assert before.weights != after.weights and after.weights == identify(str(folder)).weights
    old = run_info(before.label, corpus, weights=before.weights)
    new = run_info(after.label, corpus, weights=after.weights)
    assert old.run_id != new.run_id
    store = Store(tmp_path / "s", create=True)
    store.writer(run_info(before.label, corpus, weights=before.weights, run_id="fixed")).close()
    with pytest.raises(StoreError, match="other model weights"):
        store.writer(run_info(after.label, corpus, weights=after.weights, run_id="fixed"))


def test_restricted_sql_reads_the_store_and_nothing_else(filled, tmp_path):
    outside = tmp_path / "outside.csv"
    outside.write_text("a\n1\n")
    with ProfileStore(filled.root, restricted=True) as db:
        assert db.sql("SELECT count(*) AS n FROM entropy")["n"][0].as_py() > 0
        for sql in (f"SELECT * FROM read_csv('{outside}')",
                    f"COPY (SELECT 1) TO '{tmp_path / 'leak.csv'}'",
                    f"ATTACH '{tmp_path / 'x.db'}' AS x",
                    "SET enable_external_access = true"):
            with pytest.raises(QueryError):
                db.sql(sql)
    assert not (tmp_path / "leak.csv").exists()
    with ProfileStore(filled.root) as db:  # the default trusts its user
        assert db.sql(f"SELECT * FROM read_csv('{outside}')").num_rows == 1


def test_manifest_entries_carry_sizes_and_checksums(filled):
    for entry in filled.manifest():
        assert set(entry.checksums) == set(entry.files) == set(entry.sizes)
        for relative, digest in entry.checksums.items():
            assert sha256_file(filled.root / relative) == digest
            assert (filled.root / relative).stat().st_size == entry.sizes[relative]
    record = json.loads(next((filled.root / "manifest").glob("*/*.json")).read_text())
    assert len(record["checksums"]) == 2
