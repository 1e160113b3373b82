"""The host side of a store run: device batches into rows, rows into the store, off the
thread that drives the device.

`batch_rows` turns a whole `profiler.ProfiledBatch` into long-format Arrow rows with a
few numpy calls (no per-prompt objects). `WriterStage` runs that and the run's writer on a
thread of its own behind a bounded queue: the device's thread queues the next batch while
the last one is turned into rows, encoded, checksummed and committed. A slow disk
back-pressures (`put` waits while the queue is full, so memory stays bounded); a writer
that fails stops the run at the next `put` with its own error, never a hung process.
Everything queued was computed in full, so an interrupted run still commits it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import numpy as np

from entropy_fast.store.rows import long_rows, token_positions

QUEUED_BATCHES = 4
"""Device batches waiting for the host stage at most (each holds one batch's statistics)."""

_OPTIONAL = {"top_token_id": "top_token", "target_surprisal": "target_surprisal",
             "target_rank": "target_rank"}
"""Store column -> the batch's statistic."""


def batch_rows(batch: Any, prompt_ids: Sequence[int], layers: Sequence[int],
               alphas: Sequence[float]) -> Any:
    """The ENTROPY_SCHEMA rows of a ProfiledBatch whose sequence k is prompt prompt_ids[k]
    (an Arrow RecordBatch ordered by alpha, prompt, pos, layer)."""
    columns = batch.host_columns()
    counts = [s.n_rows for s in batch.sequences]
    n_rows = sum(counts)
    targets = np.fromiter(chain.from_iterable(s.ids[s.first_target:] for s in batch.sequences),
                          dtype=np.int64, count=n_rows)
    optional = {column: None if (values := columns[name]) is None else values.numpy()
                for column, name in _OPTIONAL.items()}
    return long_rows(np.repeat(np.asarray(prompt_ids, dtype=np.int32), counts),
                     token_positions(counts), targets, layers, alphas,
                     columns["entropy"].numpy(), optional)


def prompt_token_ids(sequence: Any) -> list[int]:
    """What the store keeps as a profiled sequence's prompt: the prompt of a generated
    one, the whole text of a text-mode one."""
    return sequence.ids[:sequence.first_target] if sequence.generated else sequence.ids


_COMMIT, _STOP = object(), object()


class WriterStage:
    """A RunWriter fed with device batches on a background thread (see the module doc).

    Args:
        writer: the run's `store.writer.RunWriter`; only this stage's thread uses it while
            the stage is open.
        prompt: prompt id -> its `corpus.Prompt` (text, source line).
        layers, alphas: the run's hidden-state indices and Rényi orders.
        max_batches: batches queued at most before `put` waits.
    """

    def __init__(self, writer: Any, prompt: Callable[[int], Any], layers: Sequence[int],
                 alphas: Sequence[float], max_batches: int = QUEUED_BATCHES) -> None:
        self.writer, self.prompt = writer, prompt
        self.layers, self.alphas = list(layers), tuple(alphas)
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self._thread = threading.Thread(target=self._run, name="entropy-fast-writer",
                                        daemon=True)
        self._thread.start()

    def put(self, batch: Any, prompt_ids: Sequence[int]) -> None:
        """Queue a ProfiledBatch whose sequence k is prompt prompt_ids[k]; waits while the
        queue is full; raises the stage's error if its writer failed."""
        self._put((batch, list(prompt_ids)))

    def commit(self) -> None:
        """Commit what is buffered once the batches queued before are written."""
        self._put(_COMMIT)

    def close(self) -> None:
        """Write what is queued, stop the thread; raises the writer's error if it failed."""
        if self._thread.is_alive():
            self._put(_STOP, check=False)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> WriterStage:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
            return
        # The body failed: write what was queued (all of it is valid), then let its
        # exception go on; the writer's own error, if any, is the run writer's to record.
        if self._thread.is_alive():
            self._put(_STOP, check=False)
            self._thread.join()

    def _put(self, item: Any, check: bool = True) -> None:
        while True:
            if check:
                self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    return

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self.error is not None:
                continue  # after a failure, drain so that the device's thread never waits
            try:
                if item is _COMMIT:
                    self.writer.commit()
                else:
                    self._write(*item)
            except BaseException as err:  # handed to the device's thread by put/close
                self.error = err

    def _write(self, batch: Any, prompt_ids: list[int]) -> None:
        rows = batch_rows(batch, prompt_ids, self.layers, self.alphas)
        sequences = batch.sequences
        self.writer.add_batch([self.prompt(i) for i in prompt_ids], rows,
                              [s.n_rows for s in sequences], self.layers,
                              [prompt_token_ids(s) for s in sequences])
