"""Measure a projection's inputs from a run log (the JSONL event log of `mer-pipeline run --log-file`).

- compute per token: the `run_summary` event's `compute_us_per_token`; a log without one (a killed
  run) is summarized from its `token_done` events as `logs summarize` would (`mer.metrics.summary`);
- disk bandwidth: the sum of the `expert_read` events' bytes over the sum of their latencies, i.e.
  the rate one read sees (reads in flight together overlap, so this is a lower bound on what the
  disk delivers in parallel, and the right one for a read that a step waits for); None when the
  run read nothing.

The log is read with `mer.logs.reader.read_log` (envelope checks, a torn last line tolerated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mer.errors import EventLogError
from mer.logs.reader import read_log
from mer.metrics.events import EXPERT_READ, RUN_SUMMARY, ReadRecord
from mer.metrics.summary import summarize_log_events


@dataclass(frozen=True)
class LogMeasurements:
    compute_s_per_token: float
    disk_bytes_per_s: float | None
    reads: int


def measure_run_log(path: str | Path) -> LogMeasurements:
    """Compute per token and single-read disk bandwidth measured in the run log at `path`."""
    events = read_log(path).events
    summaries = [event for event in events if event.get("event") == RUN_SUMMARY]
    try:
        if summaries:
            compute_us = float(summaries[-1]["compute_us_per_token"])
        else:
            compute_us = summarize_log_events(events).compute_us_per_token
    except (KeyError, TypeError, ValueError, EventLogError) as error:
        raise EventLogError(f"{path}: no compute time per token in the log ({error})") from error
    if not (math.isfinite(compute_us) and compute_us > 0):
        raise EventLogError(f"{path}: compute_us_per_token {compute_us!r} is not a positive number")
    reads = [ReadRecord.from_event(event, f"{path}: {EXPERT_READ} event")
             for event in events if event.get("event") == EXPERT_READ]
    latency_s = math.fsum(read.latency_us for read in reads) / 1e6
    bandwidth = sum(read.nbytes for read in reads) / latency_s if reads and latency_s > 0 else None
    return LogMeasurements(compute_us / 1e6, bandwidth, len(reads))
