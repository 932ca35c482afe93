"""The run summary recomputed from a run's raw events, exactly as the run computed it.

The run computes its summary (`mer.metrics.summary.summarize_log_events`) from its `run_started`, its
`token_done` events, the I/O worker's read counters and latency histogram as reported when the
router asked for the final statistics (`IoStats`), and the final `prefetch_stats`; here the same
figures are rebuilt from the `expert_read` events with the same histogram code (`mer.metrics.stats`), so
they agree exactly. A read can still finish after that request (a prefetch for a token that never
comes); its `expert_read` is in the log but was not in the summary. So the reads counted are those
whose `read_index` is below the `reads_counted` of `prefetch_stats` (the cut is
`mer.metrics.summary.collect_events`'s, so every reader of raw events agrees).

A run that did not finish (interrupted, or a child died) has no `run_summary` and no
`prefetch_stats`: the summary is then recomputed from the tokens logged, the prefetch counters
come from the I/O worker's last `acquire_done` snapshot, and each of these is reported as a
warning. A run that never started its job (no `run_started`) cannot be summarized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mer.errors import EventLogError
from mer.logs.runs import RunLog
from mer.metrics.events import (EXPERT_READ, PREFETCH_STATS, RUN_STARTED, RUN_SUMMARY, TOKEN_DONE, PrefetchCounters,
                            ReadRecord, RunInfo, TokenRecord)
from mer.metrics.summary import RunSummary, summarize_log_events

ACQUIRE_DONE = "acquire_done"
DECISION_DONE = "decision_done"
_SNAPSHOT_COUNTERS = {"issued": "prefetches_issued", "completed": "prefetches_completed",
                      "used": "prefetches_used", "wasted": "prefetches_wasted", "dropped": "prefetches_dropped"}


@dataclass
class RecomputedSummary:
    """A run's summary from its events, the run's own `run_summary` (None if absent) and warnings."""

    summary: RunSummary
    logged: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)


def _checked_records(run: RunLog) -> None:
    """Validate every event the summary uses, naming file and line of a bad one."""
    seen_tokens: dict[int, int] = {}
    for name, record_type in ((RUN_STARTED, RunInfo), (TOKEN_DONE, TokenRecord), (EXPERT_READ, ReadRecord),
                              (PREFETCH_STATS, PrefetchCounters)):
        for line, event in run.with_lines(name):
            record = record_type.from_event(event, f"{run.path}:{line} ({name})")
            if name == TOKEN_DONE:
                if record.token in seen_tokens:
                    raise EventLogError(f"{run.path}:{line}: token {record.token} is logged twice "
                                        f"(first on line {seen_tokens[record.token]})")
                seen_tokens[record.token] = line
    starts = list(run.with_lines(RUN_STARTED))
    if not starts:
        raise EventLogError(f"{run.label}: no {RUN_STARTED} event: the run never started its job")
    if len(starts) > 1:
        lines = ", ".join(str(line) for line, _ in starts)
        raise EventLogError(f"{run.label}: {len(starts)} {RUN_STARTED} events (lines {lines}) in one run")


def _counters_of_unfinished_run(run: RunLog, warnings: list[str]) -> dict[str, Any]:
    """A `prefetch_stats` stand-in for a run that did not log one."""
    snapshot = run.last(ACQUIRE_DONE)
    observations = len(run.named(DECISION_DONE))
    if snapshot is None or not all(key in snapshot for key in _SNAPSHOT_COUNTERS.values()):
        warnings.append(f"{run.label}: no {PREFETCH_STATS} event: prefetch counters and predictor "
                        "observations are unknown and reported as 0")
        return {"event": PREFETCH_STATS, **PrefetchCounters().to_event_fields()}
    warnings.append(f"{run.label}: no {PREFETCH_STATS} event: prefetch counters are taken from the I/O "
                    f"worker's last {ACQUIRE_DONE} and predictor observations counted from {DECISION_DONE}")
    counters = {field_name: snapshot[key] for field_name, key in _SNAPSHOT_COUNTERS.items()}
    return {"event": PREFETCH_STATS, **counters, "predictor_observations": observations}


def recompute_summary(run: RunLog) -> RecomputedSummary:
    """The run summary of `run` from its raw events (see the module docstring)."""
    _checked_records(run)
    warnings: list[str] = []
    prefetch_stats = run.last(PREFETCH_STATS)
    if prefetch_stats is None:
        prefetch_stats = _counters_of_unfinished_run(run, warnings)
    tokens = run.named(TOKEN_DONE)
    events = [*run.named(RUN_STARTED), *tokens, *run.named(EXPERT_READ), prefetch_stats]
    summary = summarize_log_events(events)
    logged_event = run.last(RUN_SUMMARY)
    logged = None
    if logged_event is None:
        warnings.append(f"{run.label}: no {RUN_SUMMARY} event: the run did not finish (interrupted or failed); "
                        f"the summary is recomputed from the {len(tokens)} tokens logged")
    else:
        recomputed = summary.to_json_dict()
        logged = {key: logged_event[key] for key in recomputed if key in logged_event}
        differing = [key for key in logged if logged[key] != recomputed[key]]
        if differing:
            warnings.append(f"{run.label}: the recomputed summary differs from the logged {RUN_SUMMARY} in "
                            f"{', '.join(differing)}")
    return RecomputedSummary(summary, logged, warnings)
