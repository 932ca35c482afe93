"""Every plotted series of a run, computed from its events as plain data (lists of numbers).

`mer.logs.plots` only draws these. Time axes are seconds since the job's work started: a benchmark's
first token (`t_start_s` of the earliest `token_done`), a generation's prefill
(`generation_prefill_done.t_start`, else `generation_started`), a conversion's start
(`convert_started.t_start`), else the earliest event; on the CLOCK_MONOTONIC clock every event's
times use. A span ends at the last token's end, the generation's end (`generation_decode_done.t_end`)
or the last event. Units are in the field names: `_s` seconds,
`_ms` milliseconds, `_pct` percent 0-100. A series whose events are not in the log (a log of an
older mer) is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mer.logs.conversion import CONVERT_STARTED
from mer.logs.generation import GENERATION_DECODE_DONE, GENERATION_PREFILL_DONE, GENERATION_STARTED
from mer.logs.recompute import ACQUIRE_DONE
from mer.logs.runs import RunLog
from mer.metrics.events import EXPERT_READ, PREFETCH_STATS, RUN_STARTED, TOKEN_DONE

COMPUTE_JOB = "compute_job"
DEFAULT_HIT_RATE_WINDOW = 50


def _origin(run: RunLog) -> tuple[float, str]:
    """(t_mono of the run's time zero, what happened then); see the module docstring."""
    starts = [event["t_start_s"] for event in run.named(TOKEN_DONE)]
    if starts:
        return min(starts), "the first token started"
    for name, key, what in ((GENERATION_PREFILL_DONE, "t_start", "the prefill started"),
                            (GENERATION_STARTED, "t_mono", "the generation started"),
                            (CONVERT_STARTED, "t_start", "the conversion started")):
        event = run.last(name)
        if event is not None and isinstance(event.get(key), (int, float)):
            return event[key], what
    return min(event["t_mono"] for event in run.events), "the first event"


def time_origin(run: RunLog) -> float:
    """t_mono of the run's time zero (see the module docstring)."""
    return _origin(run)[0]


def time_axis_label(run: RunLog) -> str:
    """The time axis's label: `time since the first token started (s)`, `... the prefill started (s)`, ..."""
    return f"time since {_origin(run)[1]} (s)"


@dataclass(frozen=True)
class CycleSeries:
    """Per token: when it started, its whole cycle and the split into I/O wait, compute and the rest."""

    token: list[int]
    t_s: list[float]
    cycle_ms: list[float]
    io_wait_ms: list[float]
    compute_ms: list[float]
    other_ms: list[float]  # cycle - io_wait - compute: messaging, combine bookkeeping, scheduling


def cycle_series(run: RunLog) -> CycleSeries:
    """The cycle latency of every token and its split, in token order."""
    origin = time_origin(run)
    tokens = sorted(run.named(TOKEN_DONE), key=lambda event: event["token"])
    cycle, io_wait, compute = ([value / 1e3 for value in column]
                               for column in _columns(tokens, ("cycle_us", "io_wait_us", "compute_us")))
    return CycleSeries(
        token=[event["token"] for event in tokens],
        t_s=[event["t_start_s"] - origin for event in tokens],
        cycle_ms=cycle, io_wait_ms=io_wait, compute_ms=compute,
        other_ms=[c - i - m for c, i, m in zip(cycle, io_wait, compute)],
    )


@dataclass(frozen=True)
class HitRateSeries:
    """The hit rate over the last `window` tokens, at each token's end."""

    window: int
    token: list[int]
    t_s: list[float]
    hit_rate_pct: list[float]


def rolling_hit_rate(run: RunLog, window: int = DEFAULT_HIT_RATE_WINDOW) -> HitRateSeries:
    """Hits / lookups x 100 over the last `window` tokens (fewer at the start), in token order."""
    if window < 1:
        raise ValueError(f"the hit-rate window must be at least 1 token, got {window}")
    origin = time_origin(run)
    tokens = sorted(run.named(TOKEN_DONE), key=lambda event: event["token"])
    hits = np.cumsum([0] + [event["hits"] for event in tokens])
    lookups = np.cumsum([0] + [event["lookups"] for event in tokens])
    rates = []
    for end in range(1, len(tokens) + 1):
        start = max(0, end - window)
        asked = int(lookups[end] - lookups[start])
        rates.append(100.0 * int(hits[end] - hits[start]) / asked if asked else 0.0)
    return HitRateSeries(window, [event["token"] for event in tokens],
                         [event["t_end_s"] - origin for event in tokens], rates)


@dataclass(frozen=True)
class OccupancySeries:
    """The I/O worker's slots after each acquire it answered (`acquire_done`)."""

    pool_slots: int | None
    t_s: list[float]
    occupied: list[int]  # holding an expert (loading, ready or leased)
    loading: list[int]
    leased: list[int]
    pinned: list[int]


def slot_occupancy(run: RunLog) -> OccupancySeries:
    """Slot states over time, from the `acquire_done` snapshots."""
    origin = time_origin(run)
    snapshots = [event for event in run.named(ACQUIRE_DONE) if "occupied_slots" in event]
    started = run.last(RUN_STARTED)
    return OccupancySeries(started.get("pool_slots") if started else None,
                           [event["t_answered"] - origin for event in snapshots],
                           *_columns(snapshots, ("occupied_slots", "loading_slots", "leased_slots", "pinned_slots")))


def _columns(events: list[dict[str, Any]], keys: tuple[str, ...]) -> list[list[Any]]:
    """The values of each of `keys`, one list per key, in event order."""
    return [[event[key] for event in events] for key in keys]


def _timed_reads(run: RunLog) -> list[dict[str, Any]]:
    return [event for event in run.named(EXPERT_READ) if "t_submit" in event and "t_done" in event]


@dataclass(frozen=True)
class StepSeries:
    """A step function: `value[i]` holds from `t_s[i]` until `t_s[i + 1]`."""

    t_s: list[float]
    value: list[int]


def outstanding_reads(run: RunLog) -> StepSeries:
    """Reads submitted and not yet done (queued or in flight), from each read's t_submit / t_done."""
    origin = time_origin(run)
    changes: dict[float, int] = {}
    for read in _timed_reads(run):
        changes[read["t_submit"]] = changes.get(read["t_submit"], 0) + 1
        changes[read["t_done"]] = changes.get(read["t_done"], 0) - 1
    times, values, depth = [], [], 0
    for moment in sorted(changes):
        depth += changes[moment]
        times.append(moment - origin)
        values.append(depth)
    return StepSeries(times, values)


@dataclass(frozen=True)
class LatencyHistogram:
    """Read latencies in milliseconds: `counts[kind][i]` reads in [edges_ms[i], edges_ms[i + 1]) (the last
    bin includes its right edge, as numpy.histogram)."""

    edges_ms: list[float]
    counts: dict[str, list[int]]  # by read kind: "foreground", "prefetch"


def read_latency_histogram(run: RunLog, bins: int = 30) -> LatencyHistogram:
    """A histogram of every read's latency (submission to completion), per read kind, on shared bins."""
    reads = run.named(EXPERT_READ)
    latencies = np.array([read["latency_us"] / 1e3 for read in reads], dtype=np.float64)
    if not len(latencies):
        return LatencyHistogram([], {})
    edges = np.histogram_bin_edges(latencies, bins=bins)
    counts = {}
    for kind in ("foreground", "prefetch"):
        chosen = latencies[[read["kind"] == kind for read in reads]]
        counts[kind] = [int(count) for count in np.histogram(chosen, bins=edges)[0]]
    return LatencyHistogram([float(edge) for edge in edges], counts)


@dataclass(frozen=True)
class BusyLane:
    """When one worker was busy: merged [start, end) intervals in seconds and the busy share of the span."""

    name: str
    intervals: list[tuple[float, float]]
    busy_pct: float


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as sorted, disjoint intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _busy_lane(name: str, intervals: list[tuple[float, float]], span_s: float) -> BusyLane:
    merged = merge_intervals(intervals)
    busy = sum(end - start for start, end in merged)
    return BusyLane(name, merged, 100.0 * busy / span_s if span_s > 0 else 0.0)


def run_span_s(run: RunLog) -> float:
    """Seconds from time zero to the last token's end (or the last event)."""
    ends = [event["t_end_s"] for event in run.named(TOKEN_DONE)]
    decoded = run.last(GENERATION_DECODE_DONE)
    if ends:
        last = max(ends)
    elif decoded is not None and isinstance(decoded.get("t_end"), (int, float)):
        last = decoded["t_end"]
    else:
        last = max(event["t_mono"] for event in run.events)
    return last - time_origin(run)


def worker_busy(run: RunLog) -> list[BusyLane]:
    """One lane per compute worker (its jobs) and one for the I/O worker (reads outstanding)."""
    origin, span = time_origin(run), run_span_s(run)
    by_worker: dict[int, list[tuple[float, float]]] = {}
    for job in run.named(COMPUTE_JOB):
        by_worker.setdefault(job["worker"], []).append((job["t_start"] - origin, job["t_end"] - origin))
    lanes = [_busy_lane(f"compute-{worker}", by_worker[worker], span) for worker in sorted(by_worker)]
    reads = [(read["t_submit"] - origin, read["t_done"] - origin) for read in _timed_reads(run)]
    if reads:
        lanes.append(_busy_lane("I/O reads", reads, span))
    return lanes


@dataclass(frozen=True)
class PrefetchSeries:
    """Cumulative prefetch counters of the I/O worker over time."""

    t_s: list[float]
    issued: list[int]
    used: list[int]
    wasted: list[int]
    dropped: list[int]
    final: dict[str, int] = field(default_factory=dict)  # the run's `prefetch_stats`, when logged


def prefetch_series(run: RunLog) -> PrefetchSeries:
    """Prefetches issued, used, wasted and dropped so far, after each acquire (`acquire_done`)."""
    origin = time_origin(run)
    snapshots = [event for event in run.named(ACQUIRE_DONE) if "prefetches_used" in event]
    stats = run.last(PREFETCH_STATS)
    final = {key: stats[key] for key in ("issued", "completed", "used", "wasted", "dropped") if key in stats} \
        if stats else {}
    keys = ("prefetches_issued", "prefetches_used", "prefetches_wasted", "prefetches_dropped")
    return PrefetchSeries([event["t_answered"] - origin for event in snapshots], *_columns(snapshots, keys), final)
