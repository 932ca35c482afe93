"""Statistics for run summaries: nearest-rank percentiles, exact means and the latency histogram.

Percentile method (used everywhere in mer): nearest rank. The p-th percentile of n values is the
smallest value v such that at least p% of the values are <= v, i.e. the value of rank
ceil(p/100 x n) (1-based) in sorted order; p = 0 gives the minimum. This is the rule of an HDR
histogram's `value_at_quantile`, but on the exact values rather than histogram buckets (the seed's
figures, e.g. 116543us = 1821 x 64 - 1, are the upper ends of 3-significant-digit HDR buckets, so
they can sit up to 0.1% above the exact value). A percentile is always one of the values; the
percentiles of no values are None.

Read latencies are counted in a `LatencyHistogram` (fixed, log-spaced buckets), so the I/O
worker's statistics stay the same size however long a run is. Its percentiles are nearest rank over
the buckets: the bucket holding the exact nearest-rank value is found exactly, and reported by its
geometric midpoint clamped to the exact [min, max] of the values. So a histogram percentile is
within `LATENCY_RESOLUTION` (1%) of the exact one (or 0.5 us below 1 us), and exact when its rank is
that of the minimum or the maximum. The run summary and `logs summarize` both use this code, so they agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, NamedTuple, Sequence

LATENCY_RATIO = 1.02  # the upper edge of a bucket over its lower edge
LATENCY_RESOLUTION = math.sqrt(LATENCY_RATIO) - 1  # the largest relative error of a histogram percentile
_LATENCY_RANGE_US = 1e8  # finite buckets from 1 us up to 100 s; one bucket below, one above
NUM_LATENCY_BUCKETS = math.ceil(math.log(_LATENCY_RANGE_US) / math.log(LATENCY_RATIO)) + 2


def percent(part: float, whole: float) -> float:
    """`part` as a percentage of `whole` (0-100 for a share), 0.0 when `whole` is 0."""
    return part / whole * 100 if whole else 0.0


def nearest_rank(sorted_values: Sequence[float], percent: float) -> float:
    """The `percent`-th percentile (0-100) of values already sorted ascending (nearest rank)."""
    if not sorted_values:
        raise ValueError("no values")
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    rank = math.ceil(Fraction(str(percent)) * len(sorted_values) / 100)  # exact: no float rounding
    return sorted_values[max(rank, 1) - 1]


@dataclass(frozen=True)
class Percentiles:
    """p50 / p95 / p99 and the maximum of a set of values (each None when there were no values)."""

    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: Iterable[float], with_max: bool = True) -> "Percentiles":
        """The percentiles of `values`; `max` is left None unless `with_max`."""
        ordered = sorted(values)
        if not ordered:
            return cls(None, None, None, None)
        maximum = ordered[-1] if with_max else None
        return cls(nearest_rank(ordered, 50), nearest_rank(ordered, 95), nearest_rank(ordered, 99), maximum)

    def to_json_dict(self) -> dict:
        """{p50, p95, p99}, plus max when it was computed."""
        data = {"p50": self.p50, "p95": self.p95, "p99": self.p99}
        if self.max is not None:
            data["max"] = self.max
        return data

    @classmethod
    def from_json_dict(cls, data: dict) -> "Percentiles":
        return cls(data["p50"], data["p95"], data["p99"], data.get("max"))


def latency_bucket(value_us: float) -> int:
    """The bucket of a latency: 0 below 1 us, i for [r^(i-1), r^i) us, the last one above 100 s."""
    if value_us < 1.0:
        return 0
    return min(int(math.log(value_us) / math.log(LATENCY_RATIO)) + 1, NUM_LATENCY_BUCKETS - 1)


class LatencyHistogram(NamedTuple):
    """Counts of latencies (microseconds) in `NUM_LATENCY_BUCKETS` log-spaced buckets, with their exact
    extremes (`min_us` is inf and `max_us` 0 while empty). A record: it travels in `IoStats`."""

    counts: list[int]
    min_us: float
    max_us: float

    @classmethod
    def of(cls, values: Iterable[float]) -> "LatencyHistogram":
        recorder = LatencyRecorder()
        for value in values:
            recorder.add(value)
        return recorder.snapshot()

    @property
    def count(self) -> int:
        return sum(self.counts)

    def percentile(self, percent: float) -> float | None:
        """The nearest-rank `percent`-th percentile (see the module docstring); None when empty."""
        total = self.count
        if not total:
            return None
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be in [0, 100], got {percent}")
        rank = max(math.ceil(Fraction(str(percent)) * total / 100), 1)
        if rank in (1, total):  # the extremes are known exactly
            return self.min_us if rank == 1 else self.max_us
        seen = 0
        for bucket, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return min(max(_bucket_midpoint(bucket), self.min_us), self.max_us)
        raise AssertionError("unreachable: the ranks add up to the count")

    def percentiles(self) -> "Percentiles":
        """p50, p95 and p99 (no max), as the run summary reports the read latencies."""
        return Percentiles(self.percentile(50), self.percentile(95), self.percentile(99), None)


def _bucket_midpoint(bucket: int) -> float:
    if bucket == 0:
        return 0.5
    if bucket == NUM_LATENCY_BUCKETS - 1:
        return math.inf  # clamped to the maximum
    return LATENCY_RATIO ** (bucket - 0.5)


class LatencyRecorder:
    """Builds a `LatencyHistogram` one latency at a time."""

    def __init__(self) -> None:
        self.counts = [0] * NUM_LATENCY_BUCKETS
        self.min_us = math.inf
        self.max_us = 0.0

    def add(self, value_us: float) -> None:
        if not value_us >= 0:  # also refuses NaN
            raise ValueError(f"latency must be a non-negative number of microseconds, got {value_us}")
        self.counts[latency_bucket(value_us)] += 1
        self.min_us = min(self.min_us, value_us)
        self.max_us = max(self.max_us, value_us)

    def snapshot(self) -> LatencyHistogram:
        return LatencyHistogram(list(self.counts), self.min_us, self.max_us)
