"""Bytes a group of processes read from storage, sampled over time from their own I/O counters.

The disk is shared with other work, so its counters (/proc/diskstats) cannot say what one engine
read. Each process's `/proc/PID/io` `read_bytes` counts the bytes it caused to be fetched from the
block layer: O_DIRECT reads, buffered reads and the page faults of memory-mapped files (readahead
included); page-cache hits count nothing. `IoSampler` polls the processes of a run (a cgroup's
`cgroup.procs`, or the process tree under the launched pid) every `interval_s` in a thread and keeps
each process's last value, so a process that exits keeps what it read, unless its parent is one of
the processes (a parent that reaps a child adds the child's counts to its own, so the child's last
value is dropped then, not counted twice); `bytes_between(t0, t1)`
interpolates the sum at two `time.monotonic()` instants (the same clock as mer's `t_mono` log
field). It also keeps the largest sum of the processes' resident sets seen (VmRSS; shared pages are
counted in each process, so it is an upper bound), for runs without a cgroup.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from pathlib import Path


def read_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def resident_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def parent_pid(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[1])


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant of it (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


class IoSampler:
    """Polls `pids()` in a thread; `samples` are (t_monotonic, bytes read so far, resident bytes)."""

    def __init__(self, pids: Callable[[], list[int]], interval_s: float = 0.1):
        self.pids = pids
        self.interval_s = interval_s
        self.last: dict[int, int] = {}
        self.parents: dict[int, int | None] = {}
        self.samples: list[tuple[float, int, int]] = []
        self.peak_resident = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="io-sampler", daemon=True)

    def __enter__(self) -> "IoSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        resident = 0
        pids = self.pids()
        for pid in pids:
            if pid not in self.parents:
                self.parents[pid] = parent_pid(pid)
            value = read_bytes(pid)
            if value is not None:
                self.last[pid] = max(value, self.last.get(pid, 0))
                resident += resident_bytes(pid)
        alive = set(pids)
        for pid in [pid for pid in self.last if pid not in alive and self.parents.get(pid) in alive]:
            del self.last[pid]  # reaped: its parent's counter holds its reads now
        self.peak_resident = max(self.peak_resident, resident)
        self.samples.append((time.monotonic(), sum(self.last.values()), resident))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()
        self.sample()

    def total(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def at(self, t: float) -> float:
        """Bytes read by `t`, interpolated between the samples around it."""
        times = [sample[0] for sample in self.samples]
        index = bisect.bisect_left(times, t)
        if index == 0:
            return float(self.samples[0][1])
        if index >= len(times):
            return float(self.samples[-1][1])
        (t0, b0, _), (t1, b1, _) = self.samples[index - 1], self.samples[index]
        return b0 + (b1 - b0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)

    def bytes_between(self, start: float, end: float) -> float:
        return self.at(end) - self.at(start)
