"""Other processes' share of the machine's CPU while a figure was timed (../shared/METRICS.md, "Load").

On a shared machine a speed taken while another job held a core is not the artifact's own speed: every timed
figure records this share, and the report flags those taken above BUSY.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

BUSY = 0.2  # a figure timed while other processes used more than this share of all cores is flagged


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; /proc/stat, not idle or iowait)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def others_share(others_seconds: float, wall_seconds: float, cores: int | None = None) -> float:
    """Other processes' CPU seconds as a share of all cores over `wall_seconds`: 0 = ran alone, 0.5 on 2 cores =
    another job held one core."""
    cores = cores or os.cpu_count() or 1
    return round(max(others_seconds, 0.0) / (wall_seconds * cores), 3) if wall_seconds > 0 else 0.0


class CpuShare:
    """Others' share over the windows timed with `window()`; this process's own threads are not counted."""

    def __init__(self) -> None:
        self.others_seconds = 0.0
        self.wall_seconds = 0.0

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        busy, own, started = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        yield
        self.wall_seconds += time.perf_counter() - started
        self.others_seconds += max(busy_cpu_seconds() - busy - (time.process_time() - own), 0.0)

    @property
    def share(self) -> float:
        return others_share(self.others_seconds, self.wall_seconds)
