"""How many of this process's cores are idle now (torch-free).

Training picks its thread count from it: on a shared machine, more threads than idle cores make every
parallel region wait for a descheduled thread. The 1-minute load average is the wrong clock for "now":
it still counts the work this very process (or the command before it) finished seconds ago, so a
training started right after a benchmark or an export would run on one thread of an idle machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
#: how long the idle share is sampled (long enough to average out a scheduler tick, short next to any run)
SAMPLE_S = 0.2


def _cpu_times(cpus: set[int], stat: Path) -> dict[int, tuple[int, int]]:
    """(idle + iowait, total) jiffies of each of `cpus` from a /proc/stat snapshot."""
    times: dict[int, tuple[int, int]] = {}
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return times


def idle_cores(sample_s: float | None = None, stat: Path | None = None) -> float | None:
    """Idle cores among those this process may run on, measured over `sample_s` (default
    :data:`SAMPLE_S`) from `stat` (default :data:`PROC_STAT`); None where it cannot be read."""
    sample_s = SAMPLE_S if sample_s is None else sample_s
    stat = PROC_STAT if stat is None else stat
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        before = _cpu_times(cpus, stat)
        time.sleep(sample_s)
        after = _cpu_times(cpus, stat)
    except (OSError, ValueError, IndexError):
        return None
    idle = 0.0
    for cpu, (idle_after, total_after) in after.items():
        idle_before, total_before = before.get(cpu, (idle_after, total_after))
        elapsed = total_after - total_before
        idle += (idle_after - idle_before) / elapsed if elapsed > 0 else 1.0
    return idle if after else None


def usable_threads() -> int:
    """The idle cores this process may use now, at least 1 (load average where /proc/stat is missing)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    idle = idle_cores()
    if idle is None:
        idle = cores - os.getloadavg()[0]
    return max(1, min(cores, round(idle)))
