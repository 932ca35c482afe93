"""Per-worker deadlines on work in hand: is a worker that has jobs (or requests) still making progress?

The stall watch (`mer.runtime.stall_watch`) cannot tell a child spinning in a busy loop from one
doing long work: both use CPU. Only the worker knows how far it got, so a compute worker reports
progress while it works (`JobProgress` between a job's items, at most every `progress_interval_s`),
and the I/O worker's event loop reports while an `Acquire` is unanswered (`IoProgress`: it may be
reading, or waiting for a slot the router holds, which is not its fault; a loop that does not turn
sends nothing). Answers count too. The router keeps, for each worker (`mer.router.io_client`,
`mer.router.compute_client`), the work it has in hand and when it last showed progress. A worker with work in hand and no progress
for `deadline_s` is stuck; the router tells the supervisor (`ChildStuck`), which kills it like a
stall and restarts it.

The deadline is per worker, not per job: a job queued behind another waits without progress of its
own, and that is not the worker's fault. It starts when an idle worker is sent work, and again at
every progress. A compute worker's `Hello` (sent once its kernels are compiled, just before `Ready`)
or an I/O worker's restart resets it, so a first numba compile never counts. A stuck worker is
reported once; its replacement starts it anew.

Time the router itself was not listening (its event loop busy with a long dense layer, so that
progress messages waited unread in the socket) does not count: each `overdue` check pushes the
deadlines back by however late it ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mer.runtime.stall_watch import heartbeat_interval_s


def progress_interval_s(deadline_s: float) -> float:
    """How often a working child reports progress, and how often the router checks: a stuck worker is
    seen within `deadline_s` plus this."""
    return heartbeat_interval_s(deadline_s)


@dataclass
class _Worker:
    jobs: list[int] = field(default_factory=list)  # sent to its current process and not answered, oldest first
    progress_at: float = 0.0  # time.monotonic() of its last progress (or of work given to it idle)
    reported: bool = False  # named stuck: not again until its replacement's Hello


@dataclass(frozen=True)
class Overdue:
    """A worker with `in_hand` jobs and no progress on them for `silent_s` seconds; `job_id` is the oldest of
    them, the one it works on (a worker takes its jobs in order)."""

    worker: int
    silent_s: float
    in_hand: int
    job_id: int


class WorkDeadlines:
    """The progress of each worker's work in hand (see the module docstring)."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.interval_s = progress_interval_s(deadline_s)
        self._workers: dict[int, _Worker] = {}
        self._checked_at: float | None = None

    def _worker(self, worker: int) -> _Worker:
        return self._workers.setdefault(worker, _Worker())

    def hello(self, worker: int, now: float) -> None:
        """A (new) process of `worker` is up: nothing in hand, not reported, its deadline starts now."""
        self._workers[worker] = _Worker(progress_at=now)

    def sent(self, worker: int, job_id: int, now: float) -> None:
        state = self._worker(worker)
        if not state.jobs:
            state.progress_at = now
        state.jobs.append(job_id)

    def progressed(self, worker: int, now: float) -> None:
        self._worker(worker).progress_at = now

    def answered(self, worker: int, job_id: int, now: float) -> None:
        state = self._worker(worker)
        if job_id in state.jobs:
            state.jobs.remove(job_id)
        state.progress_at = now

    def in_hand(self, worker: int) -> list[int]:
        """The jobs `worker` has in hand, oldest first."""
        return list(self._worker(worker).jobs)

    def overdue(self, now: float) -> list[Overdue]:
        """The workers with work in hand and no progress for longer than the deadline, each reported once.
        Call every `interval_s`; a call later than that pushes every deadline back by the delay."""
        if self._checked_at is not None:
            deaf_s = now - self._checked_at - self.interval_s
            if deaf_s > 0:
                for state in self._workers.values():
                    state.progress_at = min(state.progress_at + deaf_s, now)
        self._checked_at = now
        found = []
        for worker, state in self._workers.items():
            silent_s = now - state.progress_at
            if state.jobs and not state.reported and silent_s > self.deadline_s:
                state.reported = True
                found.append(Overdue(worker, silent_s, len(state.jobs), state.jobs[0]))
        return found
