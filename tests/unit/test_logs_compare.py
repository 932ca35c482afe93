"""Comparing run summaries: ratios against the first run on constructed summaries, zeros, derived
metrics, which changes are highlighted, and the table and JSON forms."""

from __future__ import annotations

import math

import pytest

from mer.logs.compare import compare_summaries, format_comparison, metric_value, ratio
from mer.metrics.stats import Percentiles
from mer.metrics.summary import RunSummary


def summary(**overrides) -> dict:
    """A `run --json` summary with round numbers; `overrides` replace fields (latency groups as dicts)."""
    base = RunSummary(
        wall_s=10.0, tokens=1000, sustained_tps=100.0, avg_throughput_mibps=50.0, hit_rate_pct=80.0, experts=64,
        top_k=2, cache_slots=16, pool_slots=18, d_model=256, d_ff=512, bytes_per_expert=221184, dtype="q4_0",
        hits=1600, misses=400, prefetches_issued=200, prefetches_completed=200, prefetches_used=100,
        prefetches_wasted=50, prefetches_dropped=0, predictor_observations=1000, reads=500, bytes_read=500 * 225280,
        io_latency_us=Percentiles(400.0, 900.0, 1200.0, None), compute_us=Percentiles(5000.0, 6000.0, 7000.0, None),
        cycle_us=Percentiles(9000.0, 12000.0, 20000.0, 30000.0), io_wait_us_per_token=1000.0,
        compute_us_per_token=5000.0, io_share_pct=10.0, compute_workers=2, io_backend="uring", lookups=2000,
    ).to_json_dict()
    return {**base, **overrides}


def row(comparison, key):
    return next(r for r in comparison.rows if r.metric.key == key)


def test_ratios_are_against_the_first_run():
    faster = summary(sustained_tps=250.0, hit_rate_pct=96.0, io_share_pct=2.5,
                     compute_us={"p50": 2500.0, "p95": 3000.0, "p99": 3500.0}, reads=125)
    slower = summary(sustained_tps=50.0, compute_us={"p50": 10000.0, "p95": 1.0, "p99": 1.0})
    comparison = compare_summaries([summary(), faster, slower], ["a", "b", "c"])
    assert row(comparison, "sustained_tps").values == [100.0, 250.0, 50.0]
    assert row(comparison, "sustained_tps").ratios == [1.0, 2.5, 0.5]
    assert row(comparison, "hit_rate_pct").ratios == [1.0, 1.2, 1.0]
    assert row(comparison, "io_share_pct").ratios == [1.0, 0.25, 1.0]
    assert row(comparison, "compute_us.p50").ratios == [1.0, 0.5, 2.0]
    assert row(comparison, "reads_per_token").values == [0.5, 0.125, 0.5]
    assert row(comparison, "reads_per_token").ratios == [1.0, 0.25, 1.0]
    assert row(comparison, "prefetch_used_pct").values == [50.0, 50.0, 50.0]
    assert row(comparison, "sustained_tps").change == pytest.approx(math.log2(2.5))
    assert row(comparison, "io_share_pct").change == pytest.approx(2.0)


def test_the_biggest_changes_are_headline_metrics_ranked_by_change():
    other = summary(sustained_tps=110.0, io_share_pct=40.0, hit_rate_pct=40.0, reads=4000, tokens=1000,
                    prefetches_wasted=5000, cycle_us={"p50": 9000.0, "p95": 1.0, "p99": 20000.0, "max": 1.0})
    comparison = compare_summaries([summary(), other], ["a", "b"], top=3)
    assert [r.metric.key for r in comparison.biggest] == ["reads_per_token", "io_share_pct", "hit_rate_pct"]
    # counts (prefetches_wasted x100) are never headline; sustained_tps (+10%) ranks 4th, after the top 3
    assert all(r.metric.headline for r in comparison.biggest)
    small = compare_summaries([summary(), summary(sustained_tps=104.0)], ["a", "b"])
    assert small.biggest == []  # below the 5% threshold
    assert [r.metric.key for r in compare_summaries([summary(), summary(sustained_tps=106.0)], ["a", "b"]).biggest] \
        == ["sustained_tps"]


def test_zeros_and_missing_values():
    assert ratio(0, 0) == 1.0 and ratio(5, 0) is None and ratio(None, 3) is None and ratio(3, None) is None
    assert ratio(0, 4) == 0.0
    no_prefetch = summary(prefetches_issued=0, prefetches_used=0, io_latency_us={"p50": None, "p95": None, "p99": None})
    comparison = compare_summaries([no_prefetch, summary()], ["off", "on"])
    issued = row(comparison, "prefetches_issued")
    assert issued.ratios == [1.0, None] and issued.change == math.inf
    assert row(comparison, "prefetch_used_pct").values == [None, 50.0]  # 0 issued: no share
    assert row(comparison, "io_latency_us.p50").values == [None, 400.0]
    assert row(comparison, "io_latency_us.p50").ratios == [None, None]
    back = compare_summaries([summary(), no_prefetch], ["on", "off"])
    assert row(back, "prefetches_used").ratios == [1.0, 0.0] and row(back, "prefetches_used").change == math.inf


def test_metric_values_reach_into_latency_groups():
    data = summary()
    assert metric_value(data, "cycle_us.max") == 30000.0 and metric_value(data, "io_latency_us.max") is None
    assert metric_value(data, "io_backend") is None and metric_value(data, "nonexistent") is None


def test_table_and_json_forms():
    comparison = compare_summaries([summary(), summary(sustained_tps=200.0, io_backend="preadv")],
                                   ["base.jsonl", "new.jsonl"])
    text = format_comparison(comparison)
    assert text.splitlines()[:2] == ["A = base.jsonl", "B = new.jsonl"]
    tps_line = next(line for line in text.splitlines() if line.startswith("sustained_tps"))
    assert tps_line.split() == ["sustained_tps", "tok/s", "100.00", "200.00", "x2.00", "<<"]
    backend_line = next(line for line in text.splitlines() if line.startswith("io_backend"))
    assert backend_line.split() == ["io_backend", "uring", "preadv", "differs"]
    assert text.splitlines()[-2:] == ["biggest changes against A:", "  sustained_tps: B x2.00"]
    data = comparison.to_json_dict()
    assert data["runs"] == ["base.jsonl", "new.jsonl"] and data["biggest_changes"] == ["sustained_tps"]
    tps = next(m for m in data["metrics"] if m["metric"] == "sustained_tps")
    assert tps == {"metric": "sustained_tps", "unit": "tok/s", "values": [100.0, 200.0], "ratios": [1.0, 2.0],
                   "highlight": True}
    assert data["settings"]["io_backend"] == ["uring", "preadv"]


def test_compare_needs_two_runs_and_a_label_each():
    with pytest.raises(ValueError, match="at least 2"):
        compare_summaries([summary()], ["a"])
    with pytest.raises(ValueError, match="1 labels for 2"):
        compare_summaries([summary(), summary()], ["a"])
