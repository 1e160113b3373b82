"""How many torch threads a CPU profiler takes when nobody said.

An explicit choice stands: `threads=` / `--threads N`, or $OMP_NUM_THREADS /
$MKL_NUM_THREADS; torch's count when the profiler module was first imported is never
exceeded (a `torch.set_num_threads(1)` before that stays 1). Otherwise the profiler takes one
thread per core of its CPU set that other jobs leave idle *now*, at least one: torch's
default (one thread per core) makes every parallel region wait for the threads whose cores
another job holds (measured 4x slower generation on a busy 2-core machine,
bench/bench_threads.py).

"Now" is what the cores did while the model loaded (`CpuSample`, from /proc/stat, minus
this process's own CPU time), not the 1-minute load average: that one still counts a job
that ended a minute ago, and handed one thread to a process started right after another
on an idle 2-core machine. Without /proc/stat (not Linux) the load average is used.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch

TORCH_THREADS = torch.get_num_threads()
"""torch's thread count when this module was imported: its default, or the user's."""

MIN_SAMPLE_SECONDS = 0.1
"""Shortest window over which the cores' use is measured (/proc/stat counts in 10 ms)."""


def cpu_set() -> set[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class CpuSample:
    """Busy and total CPU time of this process's CPU set, and this process's own CPU time,
    at one moment. busy/total are None where /proc/stat cannot be read."""

    wall: float
    own: float
    busy: float | None
    total: float | None

    @classmethod
    def now(cls) -> CpuSample:
        times = os.times()
        busy = total = None
        with contextlib.suppress(OSError, ValueError):  # not Linux: the load average
            busy, total = _proc_stat(cpu_set())
        return cls(time.monotonic(), times.user + times.system, busy, total)


def idle_cores(since: CpuSample | None = None) -> int:
    """Cores of this process's CPU set that other jobs leave idle, rounded, at least 1, at
    most torch's count at import. `since`: a sample taken earlier (e.g. before a model
    load); without one, the next MIN_SAMPLE_SECONDS are measured."""
    cores = len(cpu_set())
    start = since or CpuSample.now()
    time.sleep(max(0.0, MIN_SAMPLE_SECONDS - (time.monotonic() - start.wall)))
    busy = others_busy_cores(start, CpuSample.now(), cores)
    return max(1, min(TORCH_THREADS, math.floor(cores - busy + 0.5)))


def others_busy_cores(before: CpuSample, after: CpuSample, cores: int) -> float:
    """Cores' worth of CPU that other processes used between two samples; the 1-minute
    load average where /proc/stat was not readable."""
    if None in (before.busy, after.busy, before.total, after.total):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    elapsed = after.total - before.total  # summed over the cores: cores x wall time
    if elapsed <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return min(float(cores), max(0.0, others / elapsed * cores))


def default_threads(since: CpuSample | None = None) -> int:
    """The thread count for a CPU profiler not told one (see the module docstring)."""
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return TORCH_THREADS
    return idle_cores(since)


def _proc_stat(cpus: set[int], path: str = "/proc/stat") -> tuple[float, float]:
    """(busy, total) seconds of the given CPUs since boot, from /proc/stat's cpuN lines.

    Busy is everything but idle and iowait; steal counts as busy (another guest had the
    core)."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = total = 0
    with open(path) as stat:
        for line in stat:
            name, *fields = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                continue
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(values)
            busy += sum(values) - values[3] - values[4]
    if total == 0:
        raise ValueError("no CPU of this process's set in /proc/stat")
    return busy / tick, total / tick
