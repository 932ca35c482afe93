"""Whether a starting child is working: its CPU time, read from /proc/PID/stat.

A child that has not answered `Ready` within the handshake timeout is not necessarily stuck: on a
busy 2-core machine a first numba compile or the imports can take longer than any fixed timeout.
The supervisor gives such a child more time while its CPU time grows or it reads and writes (imports
from a busy disk; `mer.runtime.stall_watch.ProgressMark`), and only a child that did neither over a
whole timeout (stopped, deadlocked, waiting on something that never comes) fails the start-up
(`mer.runtime.supervisor`). Once ready, the mid-run watchdog (`mer.runtime.stall_watch`) takes over.
"""

from __future__ import annotations

import os

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_PROGRESS_CPU_S = 0.005  # CPU a waiting child must have used over a timeout to get another (a clock tick is 0.01 s)
START_LIMIT_FACTOR, START_LIMIT_MIN_S = 10, 600.0  # however busy the machine, a start-up ends by then


def start_limit_s(allowance_s: float) -> float:
    """The longest a start-up may take, slow children's extensions included."""
    return max(START_LIMIT_FACTOR * allowance_s, START_LIMIT_MIN_S)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (its threads included); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) ": state is field 3
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14, 15
