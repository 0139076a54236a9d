"""Idle cores now, from /proc/stat samples (training's thread default), not the lagging load average."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cfvit_deploy import cores


def _stat(per_cpu: dict[int, tuple[int, int]]) -> str:
    """A /proc/stat text with (busy, idle) jiffies per cpu (busy as user time)."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{c} {busy} 0 0 {idle} 0 0 0 0 0 0" for c, (busy, idle) in per_cpu.items()]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 10"]) + "\n"


class _Snapshots:
    """A /proc/stat that shows `first`, then `second` (the sampler reads it twice)."""

    def __init__(self, tmp_path: Path, first: str, second: str) -> None:
        self.path = tmp_path / "stat"
        self.texts = [first, second]
        self.path.write_text(first)

    def advance(self, seconds: float) -> None:
        self.path.write_text(self.texts[1])


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})


def test_idle_now_counts_even_when_the_load_average_is_high(tmp_path, monkeypatch, two_cpus):
    # both cores idle over the sample, but the 1-minute load average still holds a finished benchmark:
    # the load-average rule (cores - loadavg) would give 1 thread here
    snaps = _Snapshots(tmp_path, _stat({0: (500, 100), 1: (500, 100)}), _stat({0: (500, 120), 1: (500, 120)}))
    monkeypatch.setattr(cores.time, "sleep", snaps.advance)
    monkeypatch.setattr(cores, "PROC_STAT", snaps.path)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    assert cores.idle_cores(0.2, snaps.path) == pytest.approx(2.0)
    snaps.path.write_text(snaps.texts[0])
    assert cores.usable_threads() == 2


def test_busy_cores_are_not_counted(tmp_path, monkeypatch, two_cpus):
    # cpu0 fully busy, cpu1 a quarter idle; cpu2 (not ours) idle and ignored
    snaps = _Snapshots(
        tmp_path,
        _stat({0: (0, 0), 1: (0, 0), 2: (0, 0)}),
        _stat({0: (20, 0), 1: (15, 5), 2: (0, 20)}),
    )
    monkeypatch.setattr(cores.time, "sleep", snaps.advance)
    assert cores.idle_cores(0.2, snaps.path) == pytest.approx(0.25)
    monkeypatch.setattr(cores, "PROC_STAT", snaps.path)
    snaps.path.write_text(snaps.texts[0])
    assert cores.usable_threads() == 1  # at least one thread


def test_without_proc_stat_the_load_average_decides(tmp_path, monkeypatch, two_cpus):
    monkeypatch.setattr(cores, "PROC_STAT", tmp_path / "missing")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.9, 0.0, 0.0))
    assert cores.idle_cores(0.0, tmp_path / "missing") is None
    assert cores.usable_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert cores.usable_threads() == 2


def test_training_thread_default_counts_idle_cores_not_the_load_average(tmp_path, monkeypatch, two_cpus):
    pytest.importorskip("torch")
    from cfvit_deploy import training

    # right after a benchmark: both cores idle now, load average still 2
    snaps = _Snapshots(tmp_path, _stat({0: (500, 100), 1: (500, 100)}), _stat({0: (500, 120), 1: (500, 120)}))
    monkeypatch.setattr(cores.time, "sleep", snaps.advance)
    monkeypatch.setattr(cores, "PROC_STAT", snaps.path)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    assert training.default_threads() == 2
