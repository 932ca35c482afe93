"""Exact statistics the tests compare `mer.metrics.stats` with."""

import math
from typing import Iterable, Sequence

from mer.metrics.stats import nearest_rank


def percentile(values: Iterable[float], percent: float) -> float | None:
    """The nearest-rank `percent`-th percentile of `values`; None when there are none."""
    ordered = sorted(values)
    return nearest_rank(ordered, percent) if ordered else None


def mean(values: Sequence[float]) -> float | None:
    """The exactly rounded mean (math.fsum, so the order of the values does not matter); None if empty."""
    return math.fsum(values) / len(values) if values else None
