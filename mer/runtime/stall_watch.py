"""The mid-run watchdog: is a child that is already ready still making progress?

Every ready child's event loop sends a `Heartbeat` on the control socket every
`heartbeat_interval_s(stall_timeout_s)` (`mer.runtime.child`). A child whose loop is busy (a long
compute job, a numba compile, the router's dense layers) sends none meanwhile, but then uses CPU;
one that waits on a large read of a busy disk (a page fault of a memory-mapped GGUF, in state D)
does I/O. So the supervisor counts as progress any of: a heartbeat, CPU time grown by a clock tick
(`/proc/PID/stat`), bytes read or written grown (`/proc/PID/io`), or being seen running, runnable
(on a machine so busy that it got no CPU yet) or in a disk wait. A child with none of these for
`timeout_s` is stalled: stopped (SIGSTOP, state T), deadlocked, or waiting on something that never
comes. The supervisor then kills it (SIGKILL) and handles it as a death (`mer.runtime.child_restarts`).

Deadlines start when a child is watched: at its `Ready` (before that the start-up watchdog of
`mer.runtime.cpu_progress` applies), or at its restart with the handshake timeout as its limit.
A child spinning in a busy loop uses CPU and is not called stalled: it cannot be told from long work.
"""

from __future__ import annotations

from dataclasses import dataclass

from mer.runtime.cpu_progress import START_PROGRESS_CPU_S, cpu_seconds

HEARTBEATS_PER_TIMEOUT = 5  # heartbeats (and supervisor checks) per stall timeout
MAX_HEARTBEAT_INTERVAL_S = 1.0
WORKING_STATES = ("R", "D")  # running or runnable, waiting on the disk: not stalled, whatever the counters say
PROCESS_STATES = {"R": "running", "S": "sleeping", "D": "waiting on disk", "T": "stopped", "t": "stopped by a tracer",
                  "Z": "zombie", "X": "dead", "I": "idle"}


def heartbeat_interval_s(stall_timeout_s: float) -> float:
    """How often a ready child sends `Heartbeat`, and how often the supervisor checks: a stall is seen
    within `stall_timeout_s` plus this."""
    return min(MAX_HEARTBEAT_INTERVAL_S, stall_timeout_s / HEARTBEATS_PER_TIMEOUT)


def io_bytes(pid: int) -> int | None:
    """Bytes process `pid` has read and written (syscalls and storage, `/proc/PID/io`); None when unreadable."""
    try:
        with open(f"/proc/{pid}/io") as file:
            fields = dict(line.split(":", 1) for line in file.read().splitlines() if ":" in line)
    except OSError:
        return None
    return sum(int(fields.get(key, 0)) for key in ("rchar", "wchar", "read_bytes", "write_bytes"))


def _state_code(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return ""
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def process_state(pid: int) -> str:
    """The state of process `pid` in words (`stopped`, `sleeping`, ...), or `gone`."""
    code = _state_code(pid)
    return PROCESS_STATES.get(code, code) if code else "gone"


@dataclass(frozen=True)
class ProgressMark:
    """What a process had done by a moment: CPU seconds and bytes moved (None: it is gone), and its
    state then (`R` running or runnable, `D` waiting on the disk, `S` sleeping, `T` stopped...)."""

    cpu_s: float | None
    io_bytes: int | None
    state_code: str = ""

    @classmethod
    def of(cls, pid: int) -> "ProgressMark":
        return cls(cpu_seconds(pid), io_bytes(pid), _state_code(pid))

    def progressed_since(self, before: "ProgressMark") -> bool:
        """CPU time grown by a clock tick, or bytes read or written, since `before`; or it is now
        running, runnable (a busy machine may not have given it the CPU yet) or waiting on the disk."""
        if self.cpu_s is None:
            return False
        if self.state_code in WORKING_STATES or self.cpu_s - (before.cpu_s or 0.0) >= START_PROGRESS_CPU_S:
            return True
        return self.io_bytes is not None and self.io_bytes != before.io_bytes


@dataclass
class _Watched:
    pid: int
    timeout_s: float
    progress_at: float  # time.monotonic() of the last progress seen
    mark: ProgressMark


@dataclass(frozen=True)
class Stall:
    """A child that showed no progress for `silent_s` seconds, and its state when that was seen."""

    name: str
    pid: int
    silent_s: float
    state: str

    def describe(self) -> str:
        return f"stalled: no heartbeat, CPU time or I/O for {self.silent_s:.1f} s (process {self.state})"


class StallWatch:
    """The progress of the watched children, by name (see the module docstring)."""

    def __init__(self):
        self._watched: dict[str, _Watched] = {}

    def watch(self, name: str, pid: int, timeout_s: float, now: float) -> None:
        """Start (or restart) the deadline of child `name` (process `pid`) at `now`."""
        self._watched[name] = _Watched(pid, timeout_s, now, ProgressMark.of(pid))

    def forget(self, name: str) -> None:
        self._watched.pop(name, None)

    def heartbeat(self, name: str, now: float) -> None:
        watched = self._watched.get(name)
        if watched is not None:
            watched.progress_at = now

    def stalls(self, now: float) -> list[Stall]:
        """Read every watched child's CPU time and I/O; the children silent for longer than their timeout."""
        found = []
        for name, watched in self._watched.items():
            mark = ProgressMark.of(watched.pid)
            if mark.cpu_s is None:
                continue  # gone: its sentinel reports it
            if mark.progressed_since(watched.mark):
                watched.progress_at, watched.mark = now, mark
            silent = now - watched.progress_at
            if silent > watched.timeout_s:
                found.append(Stall(name, watched.pid, silent, process_state(watched.pid)))
        return found
