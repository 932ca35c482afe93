"""Side-by-side comparison of run summaries, with ratios against the first and the biggest changes.

Input: summaries as `run --json` dicts (`RunSummary.to_json_dict()`); latency groups are addressed
as `compute_us.p50`. For every metric and every run after the first, `ratio = value / first`
(None when either is unknown, or the first is 0 and the value is not; 1.0 when both are 0).
A metric's change is the largest |log2 ratio| over the runs (infinite when a zero became non-zero),
and the biggest changes are the headline metrics whose change is at least `min_change_pct` percent,
largest first. Headline metrics are rates and latencies, comparable between runs of different
lengths (throughput, hit rate, I/O share, compute and cycle percentiles, reads per token, the share
of prefetches used...); counts are shown but never headline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class Metric:
    key: str  # a summary key, or `group.percentile` for a latency group
    unit: str
    headline: bool  # a candidate for "what changed most"


METRICS = (
    Metric("sustained_tps", "tok/s", True),
    Metric("wall_s", "s", False),
    Metric("hit_rate_pct", "%", True),
    Metric("io_share_pct", "%", True),
    Metric("compute_us.p50", "us", True),
    Metric("compute_us.p99", "us", False),
    Metric("cycle_us.p50", "us", True),
    Metric("cycle_us.p95", "us", False),
    Metric("cycle_us.p99", "us", True),
    Metric("cycle_us.max", "us", False),
    Metric("io_latency_us.p50", "us", True),
    Metric("io_latency_us.p99", "us", False),
    Metric("io_wait_us_per_token", "us", True),
    Metric("compute_us_per_token", "us", True),
    Metric("avg_throughput_mibps", "MiB/s", True),
    Metric("tokens", "tokens", False),
    Metric("hits", "lookups", False),
    Metric("misses", "lookups", False),
    Metric("reads", "reads", False),
    Metric("reads_per_token", "reads", True),
    Metric("bytes_read", "bytes", False),
    Metric("prefetches_issued", "count", False),
    Metric("prefetches_used", "count", False),
    Metric("prefetches_wasted", "count", False),
    Metric("prefetch_used_pct", "%", True),
    Metric("prefetches_dropped", "count", False),
    Metric("predictor_observations", "count", False),
    Metric("cache_slots", "slots", False),
    Metric("pool_slots", "slots", False),
    Metric("top_k", "experts", False),
    Metric("experts", "experts", False),
    Metric("compute_workers", "processes", False),
)
DERIVED = {  # metrics computed from summary fields: comparable between runs of different lengths
    "reads_per_token": ("reads", "tokens"),
    "prefetch_used_pct": ("prefetches_used", "prefetches_issued"),  # x 100
}
SETTINGS = ("io_backend", "dtype", "d_model", "d_ff", "bytes_per_expert")  # shown as values, no ratios


@dataclass(frozen=True)
class MetricRow:
    metric: Metric
    values: list[float | None]
    ratios: list[float | None]  # against the first run; ratios[0] is 1.0 when the first value is known
    change: float  # max |log2 ratio| over the runs; 0.0 when nothing is comparable


@dataclass(frozen=True)
class Comparison:
    labels: list[str]
    rows: list[MetricRow]
    settings: list[tuple[str, list[Any]]]  # (key, values): the static settings of each run
    biggest: list[MetricRow]  # headline rows that changed most, largest change first

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "runs": self.labels,
            "metrics": [{"metric": row.metric.key, "unit": row.metric.unit, "values": row.values,
                         "ratios": row.ratios, "highlight": row in self.biggest} for row in self.rows],
            "settings": {key: values for key, values in self.settings},
            "biggest_changes": [row.metric.key for row in self.biggest],
        }


def metric_value(summary: Mapping[str, Any], key: str) -> float | None:
    """The value of `key` (`group.percentile` for latency groups) in a summary; None if absent.

    Derived keys: `reads_per_token` = reads / tokens, `prefetch_used_pct` = prefetches_used /
    prefetches_issued x 100 (None when the divisor is 0).
    """
    if key in DERIVED:
        numerator, denominator = (metric_value(summary, name) for name in DERIVED[key])
        if numerator is None or not denominator:
            return None
        return numerator / denominator * (100 if key.endswith("_pct") else 1)
    group, _, part = key.partition(".")
    value = summary.get(group)
    if part:
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base; 1.0 when both are 0; None when unknown or when base is 0 and value is not."""
    if value is None or base is None:
        return None
    if base == 0:
        return 1.0 if value == 0 else None
    return value / base


def _change(values: list[float | None], ratios: list[float | None]) -> float:
    change = 0.0
    for value, value_ratio in zip(values[1:], ratios[1:]):
        if value_ratio is not None and value_ratio > 0:
            change = max(change, abs(math.log2(value_ratio)))
        elif value_ratio is None and values[0] == 0 and value is not None:
            change = math.inf  # a zero became non-zero
        elif value_ratio == 0:
            change = math.inf  # a non-zero became zero
    return change


def compare_summaries(summaries: Sequence[Mapping[str, Any]], labels: Sequence[str], *, top: int = 4,
                      min_change_pct: float = 5.0) -> Comparison:
    """Compare run summaries (the first is the baseline); see the module docstring."""
    if len(summaries) < 2:
        raise ValueError(f"compare needs at least 2 summaries, got {len(summaries)}")
    if len(labels) != len(summaries):
        raise ValueError(f"{len(labels)} labels for {len(summaries)} summaries")
    rows = []
    for metric in METRICS:
        values = [metric_value(summary, metric.key) for summary in summaries]
        ratios = [ratio(value, values[0]) for value in values]
        rows.append(MetricRow(metric, values, ratios, _change(values, ratios)))
    threshold = math.log2(1 + min_change_pct / 100)
    candidates = [row for row in rows if row.metric.headline and row.change >= threshold]
    biggest = sorted(candidates, key=lambda row: row.change, reverse=True)[:top]
    settings = [(key, [summary.get(key) for summary in summaries]) for key in SETTINGS]
    return Comparison(list(labels), rows, settings, biggest)


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:,.2f}" if abs(value) >= 10 else f"{value:.3g}"


def _ratio_text(value_ratio: float | None, value: float | None, base: float | None) -> str:
    if value_ratio is not None:
        return f"x{value_ratio:.2f}"
    return "new" if base == 0 and value is not None else "n/a"


def format_comparison(comparison: Comparison) -> str:
    """A text table: one column per run, one ratio column per later run; '<<' marks the biggest changes."""
    names = [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(len(comparison.labels))]
    header = ["metric", "unit", *names, *[f"{name}/{names[0]}" for name in names[1:]], ""]
    table = [header]
    for row in comparison.rows:
        ratios = [_ratio_text(r, v, row.values[0]) for r, v in zip(row.ratios[1:], row.values[1:])]
        mark = "<<" if row in comparison.biggest else ""
        table.append([row.metric.key, row.metric.unit, *[_number(v) for v in row.values], *ratios, mark])
    for key, values in comparison.settings:
        same = "same" if len({str(value) for value in values}) == 1 else "differs"
        table.append([key, "", *[str(value) for value in values], *[same] * (len(values) - 1), ""])
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if column < 2 else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(line, widths))).rstrip() for line in table]
    legend = [f"{name} = {label}" for name, label in zip(names, comparison.labels)]
    if comparison.biggest:
        changes = []
        for row in comparison.biggest:
            texts = [f"{name} {_ratio_text(r, v, row.values[0])}" for name, r, v
                     in zip(names[1:], row.ratios[1:], row.values[1:])]
            changes.append(f"  {row.metric.key}: {', '.join(texts)}")
        tail = ["", "biggest changes against A:", *changes]
    else:
        tail = ["", "no headline metric changed by 5% or more against A"]
    return "\n".join([*legend, "", *lines, *tail])
