"""What happened to one token across every process of a run, in time order (for debugging stalls).

Sources (docs/events.md): the router's `decision_done` (acquire and compute of each routing
decision) and `token_done`; the I/O worker's `acquire_done` and the `expert_read`s started for the
token (foreground misses, and prefetches issued while the token ran, which are for later tokens);
the compute workers' `compute_job`s of the token's jobs; and any warning or error any process
logged while the token ran. Times are milliseconds since the token started.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from mer.errors import EventLogError
from mer.logs.recompute import ACQUIRE_DONE, DECISION_DONE
from mer.logs.runs import RunLog
from mer.logs.series import COMPUTE_JOB
from mer.metrics.events import EXPERT_READ, TOKEN_DONE

_RUN_SUFFIX = re.compile(r"^mer-(.*)-[0-9a-f]{8}$")
KIB = 1024


@dataclass(frozen=True)
class TimelineEntry:
    """One step: when it started (and ended), in ms since the token started; which process; what."""

    start_ms: float
    end_ms: float | None
    process: str
    what: str

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


def short_process_name(process: str) -> str:
    """`mer-compute-1-4b2a26c5` -> `compute-1`; `mer-supervisor` -> `supervisor`."""
    match = _RUN_SUFFIX.match(process)
    return match.group(1) if match else process.removeprefix("mer-")


def _token_bounds(run: RunLog, token: int) -> tuple[float, float | None, dict | None]:
    done = next((event for event in run.named(TOKEN_DONE) if event["token"] == token), None)
    if done is not None:
        return done["t_start_s"], done["t_end_s"], done
    starts = [event["t_acquire_start"] for event in run.named(DECISION_DONE) if event["token"] == token]
    starts += [event["t_received"] for event in run.named(ACQUIRE_DONE) if event["token"] == token]
    if not starts:
        logged = sorted(event["token"] for event in run.named(TOKEN_DONE))
        known = f"tokens {logged[0]}..{logged[-1]} are logged" if logged else "no token is logged"
        raise EventLogError(f"{run.label}: token {token} is not in the log ({known})")
    return min(starts), None, None


def _decision_entries(run: RunLog, token: int, origin: float) -> tuple[list[TimelineEntry], set[int]]:
    entries, job_ids = [], set()
    for event in run.named(DECISION_DONE):
        if event["token"] != token:
            continue
        process = short_process_name(event["process"])
        acquire_start, acquire_end = _ms(event["t_acquire_start"], origin), _ms(event["t_acquire_end"], origin)
        entries.append(TimelineEntry(acquire_start, acquire_end, process,
                                     f"acquire experts {event['expert_ids']} (layer {event['layer']}): "
                                     f"{event['hits']} hit(s), {event['misses']} miss(es)"))
        jobs = ", ".join(f"job {job_id} -> compute-{worker}" for job_id, worker in event["jobs"])
        entries.append(TimelineEntry(acquire_end, _ms(event["t_compute_end"], origin), process,
                                     f"compute and combine (layer {event['layer']}): {jobs}"))
        job_ids.update(job_id for job_id, _ in event["jobs"])
    return entries, job_ids


def _io_entries(run: RunLog, token: int, origin: float) -> list[TimelineEntry]:
    entries = []
    for event in run.named(ACQUIRE_DONE):
        if event["token"] == token:
            entries.append(TimelineEntry(
                _ms(event["t_received"], origin), _ms(event["t_answered"], origin),
                short_process_name(event["process"]),
                f"acquire {event['expert_ids']} answered: {event['hits']} hit(s), {event['misses']} miss(es); "
                f"slots occupied {event['occupied_slots']}, leased {event['leased_slots']}, "
                f"loading {event['loading_slots']}"))
    for event in run.named(EXPERT_READ):
        if event.get("token") != token or "t_submit" not in event:
            continue
        purpose = "miss" if event["kind"] == "foreground" else "prefetch for a later token"
        entries.append(TimelineEntry(
            _ms(event["t_submit"], origin), _ms(event["t_done"], origin), short_process_name(event["process"]),
            f"read expert {event['expert_id']} into slot {event['slot']} ({purpose}, {event['nbytes'] / KIB:,.0f} "
            f"KiB, {event['latency_us'] / 1e3:.3f} ms, {event['queue_depth']} read(s) outstanding at submission)"))
    return entries


def _compute_entries(run: RunLog, job_ids: set[int], origin: float) -> list[TimelineEntry]:
    return [
        TimelineEntry(_ms(event["t_start"], origin), _ms(event["t_end"], origin), short_process_name(event["process"]),
                      f"compute job {event['job_id']}: experts {event['expert_ids']} x {event['slices']} "
                      f"d_ff slice(s), {event['compute_us'] / 1e3:.3f} ms")
        for event in run.named(COMPUTE_JOB) if event["job_id"] in job_ids
    ]


def _problem_entries(run: RunLog, start: float, end: float | None, origin: float) -> list[TimelineEntry]:
    entries = []
    for event in run.events:
        in_window = start <= event["t_mono"] and (end is None or event["t_mono"] <= end)
        if in_window and event.get("level") in ("warning", "error", "critical"):
            details = {k: v for k, v in event.items()
                       if k not in ("event", "level", "process", "pid", "schema", "ts", "t_mono", "run_id", "worker")}
            entries.append(TimelineEntry(_ms(event["t_mono"], origin), None, short_process_name(event["process"]),
                                         f"{event['level'].upper()} {event['event']} {details}"))
    return entries


def token_timeline(run: RunLog, token: int) -> list[TimelineEntry]:
    """Every logged step of `token`, sorted by start time (see the module docstring)."""
    start, end, done = _token_bounds(run, token)
    entries, job_ids = _decision_entries(run, token, start)
    entries += _io_entries(run, token, start)
    entries += _compute_entries(run, job_ids, start)
    entries += _problem_entries(run, start, end, start)
    if done is not None:
        process = short_process_name(done["process"])
        entries.append(TimelineEntry(0.0, None, process, "token started"))
        entries.append(TimelineEntry(_ms(end, start), None, process,
                                     f"token done: cycle {done['cycle_us'] / 1e3:.3f} ms, I/O wait "
                                     f"{done['io_wait_us'] / 1e3:.3f} ms, compute {done['compute_us'] / 1e3:.3f} ms"))
    return sorted(entries, key=lambda entry: entry.start_ms)


def _ms(t_mono: float, origin: float) -> float:
    """Milliseconds from `origin` to `t_mono` (both CLOCK_MONOTONIC seconds)."""
    return (t_mono - origin) * 1e3


def format_timeline(run: RunLog, token: int, entries: list[TimelineEntry]) -> str:
    """The entries as a table: start, duration, process, what."""
    lines = [f"token {token} of {run.label}: times in ms since the token started"]
    width = max((len(entry.process) for entry in entries), default=7)
    for entry in entries:
        duration = "" if entry.end_ms is None else f"{entry.end_ms - entry.start_ms:9.3f}"
        lines.append(f"  {entry.start_ms:+10.3f}  {duration:>9}  {entry.process:<{width}}  {entry.what}")
    return "\n".join(lines)
