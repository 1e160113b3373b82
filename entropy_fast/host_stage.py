"""The host side of a store run: device batches into rows, rows into the store, off the
thread that drives the device.

`batch_rows` turns a whole `profiler.ProfiledBatch` into long-format Arrow rows with a
few numpy calls (no per-prompt objects). `WriterStage` runs that and the run's writer on
two threads of their own, each behind a bounded queue: the device's thread queues the next
batch while the last ones are turned into rows, encoded, checksummed and committed. A slow
disk back-pressures (`put` waits while the queues are full, so memory stays bounded); a
writer that fails stops the run at the next `put` with its own error, never a hung
process. Everything queued was computed in full, so an interrupted run still commits it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import numpy as np

from entropy_fast.store.rows import long_rows, token_positions, top_token_rows

QUEUED_BATCHES = 4
"""Device batches waiting for the host stage at most (each holds one batch's statistics)."""

_OPTIONAL = {"top_token_id": "top_token", "target_surprisal": "target_surprisal",
             "target_rank": "target_rank", "kl_to_final": "kl_to_final"}
"""Store column -> the batch's statistic."""


def batch_rows(batch: Any, prompt_ids: Sequence[int], layers: Sequence[int],
               alphas: Sequence[float]) -> tuple[Any, Any]:
    """The rows of a ProfiledBatch whose sequence k is prompt prompt_ids[k]: its
    ENTROPY_SCHEMA rows (an Arrow RecordBatch ordered by alpha, prompt, pos, layer) and
    its TOP_TOKENS_SCHEMA rows (None unless the batch has top tokens)."""
    columns = batch.host_columns()
    counts = [s.n_rows for s in batch.sequences]
    n_rows = sum(counts)
    targets = np.fromiter(chain.from_iterable(s.ids[s.first_target:] for s in batch.sequences),
                          dtype=np.int64, count=n_rows)
    optional = {column: None if (values := columns.get(name)) is None else values.numpy()
                for column, name in _OPTIONAL.items()}
    prompts, pos = np.repeat(np.asarray(prompt_ids, dtype=np.int32), counts), \
        token_positions(counts)
    rows = long_rows(prompts, pos, targets, layers, alphas, columns["entropy"].numpy(),
                     optional)
    top = None
    if columns.get("top_tokens") is not None:
        top = top_token_rows(prompts, pos, layers, columns["top_tokens"].numpy(),
                             columns["top_probs"].numpy())
    return rows, top


def prompt_token_ids(sequence: Any) -> list[int]:
    """What the store keeps as a profiled sequence's prompt: the prompt of a generated
    one, the whole text of a text-mode one."""
    return sequence.ids[:sequence.first_target] if sequence.generated else sequence.ids


_COMMIT, _STOP = object(), object()


class _Worker:
    """A thread that calls `handle(item)` for each item put, in order, behind a bounded
    queue. Its first error is kept and raised by `put` and `close`; after it, items are
    drained unhandled, so that whoever puts never waits forever."""

    def __init__(self, name: str, handle: Callable[[Any], None], max_items: int) -> None:
        self.handle, self.error = handle, None
        self._queue: queue.Queue = queue.Queue(maxsize=max_items)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Any, check: bool = True) -> None:
        """Queue `item`, waiting while the queue is full; raise the worker's error first."""
        while True:
            if check and self.error is not None:
                raise self.error
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    return

    def stop(self) -> None:
        """Handle what is queued, then end the thread (the error, if any, stays kept)."""
        if self._thread.is_alive():
            self.put(_STOP, check=False)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self.error is not None:
                continue
            try:
                self.handle(item)
            except BaseException as err:  # handed over by put / close
                self.error = err


class WriterStage:
    """A RunWriter fed with device batches on background threads (see the module doc).

    Two threads, each behind a bounded queue: one turns batches into rows (numpy, Arrow),
    the other hands them to the writer, whose Parquet encoding releases the GIL, so
    encoding a part overlaps the rows of the next batches and the device's own thread.

    Args:
        writer: the run's `store.writer.RunWriter`; only this stage uses it while open.
        prompt: prompt id -> its `corpus.Prompt` (text, source line).
        layers, alphas: the run's hidden-state indices and Rényi orders.
        max_batches: batches queued at most, per thread, before `put` waits.
    """

    def __init__(self, writer: Any, prompt: Callable[[int], Any], layers: Sequence[int],
                 alphas: Sequence[float], max_batches: int = QUEUED_BATCHES) -> None:
        self.writer, self.prompt = writer, prompt
        self.layers, self.alphas = list(layers), tuple(alphas)
        self._writes = _Worker("entropy-fast-writer", self._write, max_batches)
        self._rows = _Worker("entropy-fast-rows", self._to_rows, max_batches)

    def put(self, batch: Any, prompt_ids: Sequence[int]) -> None:
        """Queue a ProfiledBatch whose sequence k is prompt prompt_ids[k]; waits while the
        queue is full; raises the writer's error if it failed."""
        self._rows.put((batch, list(prompt_ids)))

    def commit(self) -> None:
        """Commit what is buffered once the batches queued before are written."""
        self._rows.put(_COMMIT)

    def close(self) -> None:
        """Write what is queued, stop the threads; raises the writer's error if it failed."""
        self._stop()
        for worker in (self._rows, self._writes):
            if worker.error is not None:
                raise worker.error
        self.writer.flush()

    def __enter__(self) -> WriterStage:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:  # write what was queued (all of it is valid) and let the body's error go on
            self._stop()

    def _stop(self) -> None:
        self._rows.stop()
        self._writes.stop()

    def _to_rows(self, item: Any) -> None:
        if item is _COMMIT:
            self._writes.put(_COMMIT)
            return
        batch, prompt_ids = item
        sequences = batch.sequences
        self._writes.put(([self.prompt(i) for i in prompt_ids],
                          *batch_rows(batch, prompt_ids, self.layers, self.alphas),
                          [s.n_rows for s in sequences],
                          [prompt_token_ids(s) for s in sequences]))

    def _write(self, item: Any) -> None:
        if item is _COMMIT:
            self.writer.commit()
            return
        prompts, rows, top_rows, n_tokens, token_ids = item
        self.writer.add_batch(prompts, rows, n_tokens, self.layers, token_ids, top_rows)
