"""The Parquet profile store: layout, round trip, commit protocol, resume, locking, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from entropy_fast.corpus import Corpus, Prompt, read_corpus
from entropy_fast.profile import EntropyProfile
from entropy_fast.settings import LensSettings, SamplingSettings
from entropy_fast.store import MARKER, PROFILE, SCHEMA_VERSION, RunInfo, Store, StoreError
from entropy_fast.store.check import check_store
from entropy_fast.store.codec import aggregated, read_profiles
from entropy_fast.store.schema import PROMPTS_SCHEMA
from entropy_fast.store.sql import ProfileStore

ALPHAS = (2.0, 1.0, float("inf"))  # primary first, and not the smallest


def random_profile(rng: np.random.Generator, n_tokens: int, layers: list[int],
                   alphas=ALPHAS, scale: float = 5.0, extras: bool = False) -> EntropyProfile:
    """A profile with random float32 entropies for every alpha (and optional statistics)."""
    entropies = {a: torch.from_numpy(rng.random((n_tokens, len(layers)), dtype=np.float32)
                                     * scale) for a in alphas}
    shape = (n_tokens, len(layers))
    stats = {}
    if extras:
        stats = {"top_token_ids": torch.from_numpy(rng.integers(0, 500, shape)),
                 "target_surprisal": torch.from_numpy(rng.random(shape, dtype=np.float32)),
                 "target_rank": torch.from_numpy(rng.integers(0, 50, shape))}
    return EntropyProfile(
        entropy=entropies[alphas[0]], token_ids=torch.from_numpy(rng.integers(0, 1000, n_tokens)),
        layer_indices=layers, alpha=alphas[0], model_name="m",
        metadata={"prompt_token_ids": [int(t) for t in rng.integers(0, 1000, 3)]},
        entropies=entropies, **stats)


def run_info(model: str, corpus: Corpus, alphas=ALPHAS, **kw) -> RunInfo:
    return RunInfo(model=model, corpus=corpus.path, corpus_sha256=corpus.fingerprint,
                   n_prompts=len(corpus), lens=LensSettings(alphas=alphas),
                   sampling=SamplingSettings(max_new_tokens=0), dtype="float32",
                   generator="hf", **kw)


def fill(store: Store, info: RunInfo, corpus: Corpus, profiles: dict[int, EntropyProfile],
         **writer_options) -> None:
    with store.writer(info, **writer_options) as writer:
        for prompt_id in writer.pending:
            writer.add(corpus.prompts[prompt_id], profiles[prompt_id])


@pytest.fixture
def corpus() -> Corpus:
    return Corpus.from_texts([f"prompt number {i}" for i in range(12)])


@pytest.fixture
def profiles(corpus) -> dict[int, EntropyProfile]:
    rng = np.random.default_rng(0)
    lengths = [5, 0, 1, 7, 3, 3, 9, 2, 4, 6, 1, 8]  # a prompt with no rows included
    return {p.prompt_id: random_profile(rng, lengths[p.prompt_id], [0, 2, 4, 5], extras=True)
            for p in corpus.prompts}


@pytest.mark.parametrize("encoders", [1, 2])
def test_round_trip_is_exact(tmp_path, corpus, profiles, encoders):
    """Written as several parts, by one thread or by two encoding parts at once."""
    store = Store(tmp_path / "s", create=True)
    info = run_info("org/model name", corpus)
    fill(store, info, corpus, profiles, rows_per_part=100, encoders=encoders)
    assert len(store.manifest()) > 2
    assert store.runs()[0].status == "complete"
    back = dict(read_profiles(store, "org/model name"))
    assert sorted(back) == list(range(len(corpus)))
    for prompt_id, profile in back.items():
        original = profiles[prompt_id]
        assert profile.alpha == 2.0 and profile.alphas == ALPHAS
        assert profile.layer_indices == [0, 2, 4, 5]
        for alpha in ALPHAS:
            assert torch.equal(profile.entropies[alpha], original.entropies[alpha])
        assert torch.equal(profile.token_ids, original.token_ids)
        assert profile.metadata["prompt"] == corpus.prompts[prompt_id].text
        assert profile.metadata["prompt_token_ids"] == original.metadata["prompt_token_ids"]
        if original.n_tokens:
            assert torch.equal(profile.top_token_ids, original.top_token_ids)
            assert torch.equal(profile.target_surprisal, original.target_surprisal)
            assert torch.equal(profile.target_rank, original.target_rank)
    collection = aggregated(store, "org/model name", alpha=1.0)
    assert [p.alpha for p in collection] == [1.0] * len(corpus)


def test_parquet_layout(tmp_path, corpus, profiles):
    store = Store(tmp_path / "s", create=True)
    info = run_info("org/m", corpus)
    fill(store, info, corpus, profiles, rows_per_part=200)
    entries = store.manifest()
    assert len(entries) > 1
    for entry in entries:
        assert f"model=org%2Fm/run={info.run_id}/" in entry.entropy_file
        meta = pq.ParquetFile(store.root / entry.entropy_file).metadata
        assert meta.num_row_groups == 1 and meta.num_rows == entry.n_rows
        assert meta.metadata[b"entropy_fast.schema_version"] == str(SCHEMA_VERSION).encode()
        columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i)
                   for i in range(meta.num_columns)}
        assert "model" not in columns and "run" not in columns  # hive folders carry them
        assert all(c.compression == "ZSTD" for c in columns.values())
        assert "BYTE_STREAM_SPLIT" in columns["entropy"].encodings
        assert columns["layer"].has_dictionary_page
        # whole prompts per part; a part closes once it reaches rows_per_part
        assert entry.n_rows == sum(3 * 4 * profiles[i].n_tokens for i in entry.prompt_ids)
    assert all(e.n_rows >= 200 for e in entries[:-1])
    assert sorted(i for e in entries for i in e.prompt_ids) == list(range(len(corpus)))


def test_run_ids_are_deterministic(corpus):
    a, b = run_info("m", corpus), run_info("m", corpus)
    assert a.run_id == b.run_id and len(a.run_id) == 16
    assert run_info("m", corpus, alphas=(1.0,)).run_id != a.run_id
    assert run_info("other", corpus).run_id != a.run_id
    assert run_info("m", Corpus.from_texts(["x"])).run_id != a.run_id
    assert run_info("m", corpus, run_id="mine").run_id == "mine"
    with pytest.raises(StoreError, match="run id"):
        run_info("m", corpus, run_id="../escape")


def test_resume_skips_committed_and_removes_uncommitted(tmp_path, corpus, profiles):
    store = Store(tmp_path / "s", create=True)
    info = run_info("m", corpus)
    writer = store.writer(info, rows_per_part=10**9, flush_seconds=10**9)
    for prompt_id in range(5):
        writer.add(corpus.prompts[prompt_id], profiles[prompt_id])
    writer.commit()
    for prompt_id in range(5, 8):  # buffered, then "killed": never committed
        writer.add(corpus.prompts[prompt_id], profiles[prompt_id])
    writer._lock.release()  # what the kernel does when the process dies
    # a part renamed into place but not recorded, and a temp file: a kill between steps
    entropy, *_ = store.part_paths(PROFILE, info, 2)
    orphan = entropy.parent / entropy.name
    orphan.write_bytes(b"junk")
    temp = entropy.parent / f".{entropy.name}.123.tmp"
    temp.write_bytes(b"junk")
    manifest_temp = store.manifest_dir(PROFILE, info.run_id) / ".s0of1-000002.json.123.tmp"
    manifest_temp.write_text("{")
    with ProfileStore(store.root) as db:  # readers see committed rows only
        assert db.sql("SELECT count(DISTINCT prompt_id) AS n FROM entropy")["n"][0].as_py() == 4
    resumed = store.writer(run_info("m", corpus))
    assert resumed.done == {0, 1, 2, 3, 4}
    assert not orphan.exists() and not temp.exists() and not manifest_temp.exists()
    for prompt_id in resumed.pending:
        resumed.add(corpus.prompts[prompt_id], profiles[prompt_id])
    resumed.close()
    assert store.run(info.run_id).status == "complete"
    ids = [i for e in store.manifest() for i in e.prompt_ids]
    assert sorted(ids) == list(range(len(corpus)))  # nothing twice, nothing lost
    problems = check_store(store.root).problems
    assert problems == []


def test_a_second_writer_of_the_same_shard_is_refused(tmp_path, corpus):
    store = Store(tmp_path / "s", create=True)
    info = run_info("m", corpus)
    with store.writer(info), pytest.raises(StoreError, match="another process"):
        store.writer(run_info("m", corpus))
    store.writer(run_info("m", corpus)).close()  # released


def test_explicit_run_id_with_other_settings_is_refused(tmp_path, corpus):
    store = Store(tmp_path / "s", create=True)
    store.writer(run_info("m", corpus, run_id="r1")).close()
    with pytest.raises(StoreError, match=r"already exists .* with other settings"):
        store.writer(run_info("m", corpus, alphas=(1.0,), run_id="r1"))
    with pytest.raises(StoreError, match="shard"):
        store.writer(run_info("m", corpus, run_id="r1", shard=0, n_shards=2))


def test_shards_split_the_corpus(tmp_path, corpus, profiles):
    store = Store(tmp_path / "s", create=True)
    for shard in range(3):
        info = run_info("m", corpus, shard=shard, n_shards=3)
        assert list(info.prompt_ids) == list(range(shard, len(corpus), 3))
        fill(store, info, corpus, profiles)
    assert len({r.run_id for r in store.runs()}) == 1 and len(store.runs()) == 3
    assert sorted(i for e in store.manifest() for i in e.prompt_ids) == list(range(len(corpus)))


def test_store_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "none")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data.csv").write_text("x")
    with pytest.raises(StoreError, match="not an entropy-fast store"):
        Store(tmp_path / "plain")
    with pytest.raises(StoreError, match="not empty and is not an entropy-fast store"):
        Store(tmp_path / "plain", create=True)
    Store(tmp_path / "new", create=True)
    marker = tmp_path / "new" / MARKER
    payload = json.loads(marker.read_text())
    marker.write_text(json.dumps({**payload, "schema_version": 99}))
    with pytest.raises(StoreError, match=r"schema version 99.*upgrade entropy-fast"):
        Store(tmp_path / "new")


def test_profile_lacking_an_alpha_or_with_other_layers_is_refused(tmp_path, corpus):
    store = Store(tmp_path / "s", create=True)
    rng = np.random.default_rng(1)
    with store.writer(run_info("m", corpus)) as writer:
        with pytest.raises(StoreError, match="lacks alphas"):
            writer.add(corpus.prompts[0], random_profile(rng, 2, [0, 1], alphas=(1.0,)))
        writer.add(corpus.prompts[0], random_profile(rng, 2, [0, 1]))
        with pytest.raises(StoreError, match="has layers"):
            writer.add(corpus.prompts[1], random_profile(rng, 2, [0, 2]))
        with pytest.raises(StoreError, match="already committed"):
            writer.commit()
            writer.add(corpus.prompts[0], random_profile(rng, 2, [0, 1]))


WRITER_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from tests.test_store import random_profile, run_info
    from entropy_fast.corpus import Corpus
    from entropy_fast.store import Store

    model = sys.argv[2]
    corpus = Corpus.from_texts([f"p{i}" for i in range(100)])
    rng = np.random.default_rng(len(model))
    store = Store(sys.argv[1], create=True)
    with store.writer(run_info(model, corpus), rows_per_part=400) as writer:
        for prompt in corpus.prompts:
            writer.add(prompt, random_profile(rng, 4, [0, 1, 2, 3]))
""")


def test_two_processes_write_one_store(tmp_path):
    """Different models written at the same time by two processes (a new store included)."""
    root = str(tmp_path / "shared")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, root, model], env=env,
                              stderr=subprocess.PIPE, text=True)
             for model in ("model-a", "model-b")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    store = Store(root)
    assert sorted(r.model for r in store.runs()) == ["model-a", "model-b"]
    assert all(r.status == "complete" for r in store.runs())
    problems = check_store(root).problems
    with ProfileStore(root) as db:
        counts = db.sql("SELECT model, count(*) AS n FROM entropy GROUP BY ALL").to_pydict()
    assert problems == []
    assert counts["n"] == [100 * 4 * 4 * 3] * 2


# Record files as entropy-fast wrote them before RunInfo and GenerationInfo shared a base
# record: reading and writing them again must give the same text and the same run ids.
OLD_RUN_RECORD = (
    '{"model": "org/m", "run_id": "448827dc439d59bc", "corpus": "c.txt", "corpus_sha256": '
    '"abc123", "n_prompts": 7, "alphas": [2.0, 1.0, Infinity], "layer_stride": 2, '
    '"max_new_tokens": 4, "dtype": "float32", "generator": "hf", "settings": {"do_sample": '
    'false, "seed": null}, "shard": 1, "n_shards": 3, "revision": "deadbeef", '
    '"layer_indices": [0, 2, 4], "status": "running", "error": null, "tool_version": '
    '"0.1.0", "schema_version": 1, "created_at": "2024-01-01T00:00:00+00:00", "updated_at": '
    '"2024-01-01T00:00:00+00:00"}')
OLD_GENERATION_RECORD = (
    '{"model": "org/m", "run_id": "e4159ce06a7dc2eb", "corpus": "c.txt", "corpus_sha256": '
    '"abc123", "n_prompts": 7, "max_new_tokens": 4, "dtype": "float32", "generator": '
    '"vllm", "settings": {"do_sample": true, "seed": 3}, "shard": 1, "n_shards": 3, '
    '"revision": null, "status": "running", "error": null, "tool_version": "0.1.0", '
    '"schema_version": 1, "created_at": "2024-01-01T00:00:00+00:00", "updated_at": '
    '"2024-01-01T00:00:00+00:00"}')


def test_schema_1_records_are_read_with_their_run_ids():
    """Records written by schema version 1 (flat settings) read into the v2 classes."""
    from entropy_fast.store import GenerationInfo

    run = RunInfo.from_json(json.loads(OLD_RUN_RECORD))
    assert run.run_id == "448827dc439d59bc" and run.layer_indices == [0, 2, 4]
    assert run.lens == LensSettings(alphas=(2.0, 1.0, float("inf")), layer_stride=2)
    assert run.sampling == SamplingSettings(max_new_tokens=4)
    assert (run.shard_key, run.revision) == ("s1of3", "deadbeef")
    generation = GenerationInfo.from_json(json.loads(OLD_GENERATION_RECORD))
    assert generation.run_id == "e4159ce06a7dc2eb" and generation.generator == "vllm"
    assert generation.sampling == SamplingSettings(max_new_tokens=4, do_sample=True, seed=3)
    assert list(generation.prompt_ids) == [1, 4]


def test_records_round_trip_and_ids_follow_the_identity():
    from dataclasses import replace

    from entropy_fast.store import GenerationInfo

    run = RunInfo(model="org/m", corpus="c.txt", corpus_sha256="abc123", n_prompts=7,
                  lens=LensSettings(alphas=(2.0, float("inf")), base=2.0, top_token=True),
                  sampling=SamplingSettings(4, do_sample=True, top_k=5, seed=3),
                  dtype="float32", generator="hf", weights="0123456789abcdef")
    back = RunInfo.from_json(json.loads(json.dumps(run.to_json())))
    assert back == run and back.lens.base == 2.0 and back.sampling.top_k == 5
    for change in ({"weights": "fedcba9876543210"}, {"dtype": "bfloat16"},
                   {"lens": replace(run.lens, base=None)},
                   {"sampling": replace(run.sampling, top_k=None)}):
        other = replace(run, run_id="", **change)
        assert other.run_id != run.run_id, change
    assert replace(run, run_id="", shard=1, n_shards=2).run_id == run.run_id
    generation = run.generation_identity()
    assert isinstance(generation, GenerationInfo) and generation.run_id != run.run_id


def test_corpus_fields_are_typed_columns_of_the_prompts_view(tmp_path):
    records = [{"text": "p0", "kind": "poem", "n": 1, "ok": True, "tags": ["a"], "source": "x"},
               {"text": "p1", "kind": "chat", "n": 2.5, "ok": False},
               {"text": "p2"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    corpus = read_corpus(tmp_path / "c.jsonl")
    store = Store(tmp_path / "s", create=True)
    rng = np.random.default_rng(0)
    fill(store, run_info("m", corpus), corpus,
         {p.prompt_id: random_profile(rng, 2, [0, 1]) for p in corpus.prompts})
    with ProfileStore(store.root) as db:
        described = db.sql("DESCRIBE prompts").to_pydict()
        rows = db.sql("SELECT kind, n, ok, tags, source, metadata ->> '$.source' AS field "
                      "FROM prompts ORDER BY prompt_id").to_pylist()
    types = dict(zip(described["column_name"], described["column_type"], strict=True))
    assert {k: types[k] for k in ("kind", "n", "ok", "tags", "source")} == {
        "kind": "VARCHAR", "n": "DOUBLE", "ok": "BOOLEAN", "tags": "JSON", "source": "VARCHAR"}
    assert [r["kind"] for r in rows] == [r.get("kind") for r in records]
    assert [r["n"] for r in rows] == [r.get("n") for r in records]
    assert [r["ok"] for r in rows] == [r.get("ok") for r in records]
    assert [None if r["tags"] is None else json.loads(r["tags"]) for r in rows] == [
        ["a"], None, None]
    # a field named like a column stays in `metadata`: the column keeps its meaning
    assert [(r["source"], r["field"]) for r in rows] == [(corpus.path, "x"), (corpus.path, None),
                                                         (corpus.path, None)]


def test_a_version_2_store_reads_with_null_metadata_and_takes_version_3_runs(
        tmp_path, monkeypatch, corpus, profiles):
    import entropy_fast.store.writer as writer_module

    old_prompts = pa.schema([f for f in PROMPTS_SCHEMA if f.name != "metadata"])
    monkeypatch.setattr(writer_module, "PROMPTS_SCHEMA", old_prompts)
    root = tmp_path / "s"
    fill(Store(root, create=True), run_info("old", corpus), corpus, profiles)
    monkeypatch.undo()
    for entry in (root / "manifest").rglob("*.json"):  # as entropy-fast 0.4 wrote them
        payload = json.loads(entry.read_text())
        del payload["metadata_fields"]
        entry.write_text(json.dumps(payload))
    marker = json.loads((root / MARKER).read_text())
    (root / MARKER).write_text(json.dumps({**marker, "schema_version": 2}))
    assert pq.read_schema(next((root / "prompts").rglob("*.parquet"))).names == \
        old_prompts.names
    with ProfileStore(root) as db:
        assert db.sql("SELECT count(*) AS n, count(metadata) AS m FROM prompts").to_pylist() \
            == [{"n": len(corpus), "m": 0}]

    labelled = Corpus(corpus.path, [Prompt(p.prompt_id, p.text, p.source_line,
                                           {"kind": f"k{p.prompt_id % 2}"})
                                    for p in corpus.prompts])
    fill(Store(root), run_info("new", labelled), labelled, profiles)
    assert Store(root).version == SCHEMA_VERSION == 3
    with ProfileStore(root) as db:
        kinds = db.sql("SELECT model, prompt_id, kind FROM prompts ORDER BY ALL").to_pylist()
    assert kinds == [{"model": "new", "prompt_id": i, "kind": f"k{i % 2}"}
                     for i in range(len(corpus))] + [
        {"model": "old", "prompt_id": i, "kind": None} for i in range(len(corpus))]
    assert check_store(root).problems == []
