"""How the CLI shows the progress of corpus runs: a bar per run on a terminal, a line now
and then elsewhere (a log file or CI gets a few readable lines, not thousands of redraws).

Both are `pipeline.Progress` callbacks: (label, prompts done in the run, tokens profiled by
this call, prompts in the run), once as a run starts and then per batch.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


class RunBars:
    """One tqdm bar per run: the run's prompts (a resumed run starts at what was
    committed), tokens and tokens/s. A bar closes when its run ends or the next starts, so
    a finished model's bar stops its clock there."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.label: str | None = None

    def __call__(self, label: str, prompts: int, tokens: int, total: int) -> None:
        if label != self.label:
            self.close()
            from tqdm import tqdm

            self.label = label
            self.bar = tqdm(total=total, initial=prompts, unit="prompt", desc=label,
                            leave=True, dynamic_ncols=True)
        if self.bar is None:  # this run's bar is closed: a late event of it
            return
        self.bar.update(prompts - self.bar.n)
        rate = tokens / max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix_str(f"{tokens:,} tokens, {rate:,.0f} tok/s")
        if prompts >= total:
            self.close()

    def close(self) -> None:
        """Close the open bar, if any (idempotent)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunLines:
    """A line per run as it starts, then at most one every `every` seconds, and one as it
    ends: "label: 1,009/3,000 prompts (33.6%), 12,345 tokens, 1,234 tok/s, 37 s"."""

    def __init__(self, every: float = 30.0, stream: TextIO | None = None) -> None:
        self.every, self.stream = every, stream
        self.label: str | None = None
        self.started = self.last = -math.inf

    def __call__(self, label: str, prompts: int, tokens: int, total: int) -> None:
        now = time.monotonic()
        if label != self.label:
            self.label, self.started, self.last = label, now, -math.inf
        if prompts < total and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.started
        rate = tokens / elapsed if elapsed > 0 else 0.0
        share = 100 * prompts / total if total else 100.0
        print(f"{label}: {prompts:,}/{total:,} prompts ({share:.1f}%), {tokens:,} tokens, "
              f"{rate:,.0f} tok/s, {elapsed:.0f} s", file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        """Nothing to close (the same interface as `RunBars`)."""


def run_progress(stream: TextIO | None = None) -> RunBars | RunLines:
    """Bars where `stream` (default stderr) is a terminal, lines elsewhere."""
    stream = stream or sys.stderr
    return RunBars() if stream.isatty() else RunLines(stream=stream)
