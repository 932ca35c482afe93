"""Statistics for run summaries: nearest-rank percentiles and exact means.

Percentile method (used everywhere in mer): nearest rank. The p-th percentile of n values is the
smallest value v such that at least p% of the values are <= v, i.e. the value of rank
ceil(p/100 x n) (1-based) in sorted order; p = 0 gives the minimum. This is the rule of an HDR
histogram's `value_at_quantile`, but on the exact values rather than histogram buckets (the seed's
figures, e.g. 116543us = 1821 x 64 - 1, are the upper ends of 3-significant-digit HDR buckets, so
they can sit up to 0.1% above the exact value). A percentile is always one of the values; the
percentiles of no values are None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Sequence


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


def percentile(values: Iterable[float], percent: float) -> float | None:
    """The nearest-rank `percent`-th percentile of `values`; None when there are none."""
    ordered = sorted(values)
    return nearest_rank(ordered, percent) if ordered else None


def mean(values: Sequence[float]) -> float | None:
    """The exactly rounded mean (math.fsum, so the order of the values does not matter); None if empty."""
    return math.fsum(values) / len(values) if values else None


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
