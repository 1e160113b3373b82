"""The host stage of a store run: whole batches into rows, and the background writer
(bounded queue, back-pressure, errors and interrupts that lose nothing)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from entropy_fast.forward import TeacherForced
from entropy_fast.host_stage import WriterStage, batch_rows
from entropy_fast.pipeline import profile_corpus
from entropy_fast.profiler import ProfiledBatch
from entropy_fast.store import PROFILE, Store, StoreError
from entropy_fast.store.check import check_store
from entropy_fast.store.writer import RunWriter

TEXTS = [f"prompt number {i} says {'ab' * (i % 5)}" for i in range(24)]
LAYERS, ALPHAS = [0, 2, 3], (1.0, 2.0)


def random_batch(rng: np.random.Generator, extras: bool) -> ProfiledBatch:
    sequences = [TeacherForced(7, [5, 6, 7, 8, 9], 1, False),      # text: rows are tokens 1..4
                 TeacherForced(3, [1, 2, 3, 40, 41], 3, True),     # prompt 1 2 3, generated 2
                 TeacherForced(11, [4, 4], 1, False)]
    n = sum(s.n_rows for s in sequences)
    shape = (n, len(LAYERS))
    columns = {"entropy": torch.from_numpy(rng.random((*shape, len(ALPHAS)), dtype=np.float32)),
               "top_token": torch.from_numpy(rng.integers(0, 99, shape)) if extras else None,
               "target_surprisal": (torch.from_numpy(rng.random(shape, dtype=np.float32))
                                    if extras else None),
               "target_rank": torch.from_numpy(rng.integers(0, 9, shape)) if extras else None,
               "kl_to_final": (torch.from_numpy(rng.random(shape, dtype=np.float32))
                               if extras else None),
               "top_tokens": (torch.from_numpy(rng.integers(0, 99, (*shape, 2))) if extras
                              else None),
               "top_probs": (torch.from_numpy(rng.random((*shape, 2), dtype=np.float32))
                             if extras else None)}
    return ProfiledBatch(sequences, columns)


@pytest.mark.parametrize("extras", [False, True])
def test_batch_rows_are_the_rows_written_one_by_one(extras):
    batch = random_batch(np.random.default_rng(0), extras)
    prompt_ids = [70, 30, 110]
    rows, top_rows = batch_rows(batch, prompt_ids, LAYERS, ALPHAS)
    got = sorted(tuple(r.values()) for r in pa.Table.from_batches([rows]).to_pylist())
    expected, expected_top, offset = [], [], 0
    cols = batch.columns
    for prompt_id, seq in zip(prompt_ids, batch.sequences, strict=True):
        for pos, token in enumerate(seq.ids[seq.first_target:]):
            row = offset + pos
            for k, layer in enumerate(LAYERS):
                for a, alpha in enumerate(ALPHAS):
                    extra = ((int(cols["top_token"][row, k]),
                              float(cols["target_surprisal"][row, k]),
                              int(cols["target_rank"][row, k]),
                              float(cols["kl_to_final"][row, k])) if extras else (None,) * 4)
                    expected.append((prompt_id, pos, token, layer, alpha,
                                     float(cols["entropy"][row, k, a]), *extra))
                if extras:
                    expected_top += [(prompt_id, pos, layer, rank,
                                      int(cols["top_tokens"][row, k, rank]),
                                      float(cols["top_probs"][row, k, rank])) for rank in (0, 1)]
        offset += seq.n_rows
    assert got == sorted(expected)
    if not extras:
        assert top_rows is None
        return
    got_top = [tuple(r.values()) for r in pa.Table.from_batches([top_rows]).to_pylist()]
    assert sorted(got_top) == sorted(expected_top)


class SlowWriter:
    """Stands in for a RunWriter on a slow disk: each batch takes `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.written, self.commits = seconds, [], 0

    def add_batch(self, prompts, rows, n_tokens, layers, prompt_token_ids, top_rows=None):
        time.sleep(self.seconds)
        self.written.append([p.prompt_id for p in prompts])

    def commit(self):
        self.commits += 1

    def flush(self):
        self.flushed = self.commits


def test_a_slow_disk_back_pressures_and_keeps_the_order():
    writer = SlowWriter(0.02)
    rng = np.random.default_rng(1)
    stage = WriterStage(writer, lambda i: SimpleNamespace(prompt_id=i), LAYERS, ALPHAS,
                        max_batches=2)
    most = 0
    for k in range(12):
        stage.put(random_batch(rng, False), [3 * k, 3 * k + 1, 3 * k + 2])
        most = max(most, stage._rows._queue.qsize(), stage._writes._queue.qsize())
    stage.commit()
    stage.close()
    assert most <= 2
    assert writer.written == [[3 * k, 3 * k + 1, 3 * k + 2] for k in range(12)]
    assert writer.commits == writer.flushed == 1
    assert not any(t.name.startswith("entropy-fast-") for t in threading.enumerate())


def test_a_writer_that_fails_stops_the_run_with_its_error(saved_models, tmp_path, monkeypatch):
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        raise StoreError("the disk is on fire")

    monkeypatch.setattr(RunWriter, "add_batch", failing)
    done = threading.Event()
    with pytest.raises(StoreError, match="on fire"):
        try:
            profile_corpus(saved_models["llama"], TEXTS, tmp_path / "s", max_new_tokens=0,
                           batch_tokens=64)
        finally:
            done.set()
    assert done.is_set() and len(calls) == 1  # the first failure ends the run
    assert Store(tmp_path / "s").runs()[0].status == "failed"
    assert not any(t.name.startswith("entropy-fast-") for t in threading.enumerate())


def test_an_interrupt_commits_what_was_queued_and_the_rerun_is_exact(saved_models, tmp_path):
    options = dict(max_new_tokens=0, batch_tokens=64, flush_seconds=0)
    profile_corpus(saved_models["llama"], TEXTS, tmp_path / "ref", **options)

    def interrupt_midway(label, prompts, tokens, total):
        if prompts >= len(TEXTS) // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_corpus(saved_models["llama"], TEXTS, tmp_path / "s",
                       on_progress=interrupt_midway, **options)
    store = Store(tmp_path / "s")
    (run,) = store.runs()
    assert run.status == "interrupted" and 0 < len(store.committed(PROFILE, run)) < len(TEXTS)
    (resumed,) = profile_corpus(saved_models["llama"], TEXTS, tmp_path / "s", **options)
    assert resumed.done_before + resumed.prompts == len(TEXTS)
    assert check_store(tmp_path / "s").problems == []

    def rows(root):
        from entropy_fast.store.sql import ProfileStore

        with ProfileStore(root) as db:
            return db.sql("SELECT prompt_id, pos, token_id, layer, alpha, entropy FROM entropy "
                          "ORDER BY ALL").to_pylist()

    assert rows(tmp_path / "s") == rows(tmp_path / "ref")
