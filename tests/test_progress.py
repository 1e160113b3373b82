"""Progress of corpus runs: what the pipeline reports (the whole run, per batch) and how
the CLI shows it (bars on a terminal, a few lines elsewhere)."""

from __future__ import annotations

import io

import pytest

from entropy_fast import progress
from entropy_fast.pipeline import profile_corpus
from entropy_fast.progress import RunBars, RunLines, run_progress

TEXTS = ["The capital of France is", "def add(a, b):", "Once upon a time there",
         "1, 2, 3, 4,", "Why is the sky blue?", "Water boils at"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_at_start_every_so_often_and_at_the_end(monkeypatch):
    clock, out = Clock(), io.StringIO()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    lines = RunLines(every=30, stream=out)
    lines("a", 1009, 0, 3000)                  # a resumed run starts where it was
    for step in range(1, 100):                 # 99 batches over 49.5 s: one line at 30 s
        clock.now += 0.5
        lines("a", 1009 + 10 * step, 100 * step, 3000)
    lines("a", 3000, 20_000, 3000)             # the end always shows
    lines("b", 0, 0, 5)                        # the next run starts its own clock
    got = out.getvalue().splitlines()
    assert got[0] == "a: 1,009/3,000 prompts (33.6%), 0 tokens, 0 tok/s, 0 s"
    assert len(got) == 4 and got[1].startswith("a: 1,609/3,000 prompts") and "30 s" in got[1]
    assert got[2].startswith("a: 3,000/3,000 prompts (100.0%), 20,000 tokens")
    assert got[3] == "b: 0/5 prompts (0.0%), 0 tokens, 0 tok/s, 0 s"


def test_bars_count_the_run_and_close_when_it_ends(capsys):
    bars = RunBars()
    bars("a", 1009, 0, 3000)
    assert bars.bar.n == 1009 and bars.bar.total == 3000
    bars("a", 3000, 50, 3000)
    assert bars.bar is None                    # closed at its end: its clock stopped there
    bars("a", 3000, 50, 3000)                  # a late event of the closed run draws nothing
    bars("b", 0, 0, 2)
    assert bars.bar.desc == "b"
    bars.close()
    assert "3000/3000" in capsys.readouterr().err


def test_no_terminal_gets_lines_and_a_terminal_bars():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(run_progress(io.StringIO()), RunLines)
    assert isinstance(run_progress(Terminal()), RunBars)


def test_a_resumed_run_reports_the_whole_run_batch_by_batch(saved_models, tmp_path):
    store, seen = tmp_path / "store", []
    options = dict(max_new_tokens=0, flush_seconds=0, batch_tokens=16)

    def stop_after_three(label, prompts, tokens, total):
        if prompts >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_corpus(saved_models["llama"], TEXTS, store, on_progress=stop_after_three,
                       **options)
    (result,) = profile_corpus(saved_models["llama"], TEXTS, store,
                               on_progress=lambda *event: seen.append(event[1:]), **options)
    assert 0 < result.done_before < len(TEXTS)
    assert seen[0] == (result.done_before, 0, len(TEXTS))
    assert seen[-1] == (len(TEXTS), result.tokens, len(TEXTS))
    assert len(seen) - 1 > 1                   # per batch, not once per wave
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen)
