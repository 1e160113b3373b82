"""The CPU thread policy: other jobs' use of the cores, measured now, and explicit choices."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from entropy_fast import cpu_threads
from entropy_fast.cpu_threads import CpuSample, default_threads, others_busy_cores


def test_others_busy_cores_leaves_out_this_process():
    # 2 cores for 1 s: 2 s of CPU time, 1.5 s busy, of which 0.5 s were this process's
    before = CpuSample(wall=0.0, own=10.0, busy=100.0, total=400.0)
    after = CpuSample(wall=1.0, own=10.5, busy=101.5, total=402.0)
    assert others_busy_cores(before, after, cores=2) == pytest.approx(1.0)


def test_others_busy_cores_falls_back_to_the_load_average(monkeypatch):
    monkeypatch.setattr(cpu_threads.os, "getloadavg", lambda: (1.25, 0.0, 0.0))
    blind = CpuSample(wall=0.0, own=0.0, busy=None, total=None)
    assert others_busy_cores(blind, blind, cores=2) == 1.25


def test_proc_stat_sums_only_this_process_cpus(tmp_path):
    stat = tmp_path / "stat"
    # fields: user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  40 0 0 40 0 0 0 0 0 0\n"
                    "cpu0 10 0 0 10 0 0 0 0 0 0\n"
                    "cpu1 5 1 2 20 3 0 0 4 9 0\n"
                    "cpu2 10 0 0 10 0 0 0 0 0 0\n"
                    "intr 1 2 3\n")
    tick = cpu_threads.os.sysconf("SC_CLK_TCK")
    busy, total = cpu_threads._proc_stat({1}, str(stat))
    assert (busy * tick, total * tick) == (pytest.approx(12), pytest.approx(35))


def test_a_busy_core_is_seen_and_this_process_is_not():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        before = CpuSample.now()
        started = time.monotonic()
        while time.monotonic() - started < 0.5:  # this process's own work does not count
            pass
        busy = others_busy_cores(before, CpuSample.now(), len(cpu_threads.cpu_set()))
    finally:
        spinner.kill()
    assert busy >= 0.5


def test_an_explicit_thread_count_stands(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setattr(cpu_threads, "TORCH_THREADS", 7)
    assert default_threads() == 7


def test_never_more_threads_than_torch_had(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "TORCH_THREADS", 1)
    assert default_threads() == 1
