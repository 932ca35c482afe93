"""The runs in a log file: events grouped by run id and ordered by monotonic time.

`--log-file` appends, so one file may hold several runs. Children bind `run_id` to every event;
the supervisor's events carry only its `pid`, so they go to the run that the supervisor's nearest
earlier event with a `run_id` (its `run_started_supervisor`) names, or its first later one.
Events of no known run (a supervisor that failed before creating a run) belong to the only run
when there is one, and are dropped otherwise.

Within a run, events are ordered by `t_mono` (CLOCK_MONOTONIC seconds, one clock for every
process of the host); events of one process keep their file order when their times are equal.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

from mer.errors import EventLogError
from mer.logs.reader import LogFile, read_log


@dataclass
class RunLog:
    """The events of one run of one log file, in time order, with their line numbers."""

    path: str
    run_id: str | None
    events: list[dict[str, Any]]
    line_numbers: list[int]
    warnings: list[str] = field(default_factory=list)

    def named(self, name: str) -> list[dict[str, Any]]:
        """Every event called `name`, in time order."""
        return [event for _, event in self.with_lines(name)]

    def with_lines(self, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, event) for every event called `name`, in time order."""
        for line, event in zip(self.line_numbers, self.events):
            if event["event"] == name:
                yield line, event

    def last(self, name: str) -> dict[str, Any] | None:
        """The last event called `name` (in time order), or None."""
        found = self.named(name)
        return found[-1] if found else None

    @property
    def label(self) -> str:
        return f"{self.path} (run {self.run_id})" if self.run_id else self.path


def _run_of_pid_events(log: LogFile) -> dict[int, tuple[list[int], list[str]]]:
    """For every pid: the file indexes of its events that name a run, and those run ids."""
    by_pid: dict[int, tuple[list[int], list[str]]] = defaultdict(lambda: ([], []))
    for index, event in enumerate(log.events):
        run_id, pid = event.get("run_id"), event.get("pid")
        if isinstance(run_id, str) and isinstance(pid, int):
            indexes, run_ids = by_pid[pid]
            indexes.append(index)
            run_ids.append(run_id)
    return by_pid


def _assigned_run(index: int, event: dict[str, Any], by_pid) -> str | None:
    run_id = event.get("run_id")
    if isinstance(run_id, str):
        return run_id
    known = by_pid.get(event.get("pid")) if isinstance(event.get("pid"), int) else None
    if not known:
        return None
    indexes, run_ids = known
    position = bisect.bisect_right(indexes, index) - 1
    return run_ids[max(position, 0)]


def split_runs(log: LogFile) -> list[RunLog]:
    """The runs of a parsed log, in the order they first appear."""
    by_pid = _run_of_pid_events(log)
    grouped: dict[str | None, list[int]] = {}
    for index, event in enumerate(log.events):
        grouped.setdefault(_assigned_run(index, event, by_pid), []).append(index)
    orphans = grouped.pop(None, [])
    if not grouped:
        grouped[None] = orphans
    elif len(grouped) == 1:
        only = next(iter(grouped))
        grouped[only] = sorted(grouped[only] + orphans)
    runs = []
    for run_id, indexes in grouped.items():
        indexes.sort(key=lambda i: log.events[i]["t_mono"])  # stable: file order breaks ties
        runs.append(RunLog(log.path, run_id, [log.events[i] for i in indexes],
                           [log.line_numbers[i] for i in indexes], [str(w) for w in log.warnings]))
    return runs


def load_runs(path: str, *, skip_malformed: bool = False) -> list[RunLog]:
    """Read a log file and split it into runs."""
    return split_runs(read_log(path, skip_malformed=skip_malformed))


def select_run(runs: list[RunLog], run_id: str | None) -> RunLog:
    """The run called `run_id`, or the only run when `run_id` is None."""
    if run_id is not None:
        for run in runs:
            if run.run_id == run_id:
                return run
        known = ", ".join(str(run.run_id) for run in runs)
        raise EventLogError(f"{runs[0].path}: no run {run_id!r} in the log (runs: {known})")
    if len(runs) > 1:
        known = ", ".join(str(run.run_id) for run in runs)
        raise EventLogError(f"{runs[0].path} holds {len(runs)} runs ({known}): choose one with --run RUN_ID")
    return runs[0]
