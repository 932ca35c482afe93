"""The plotted series, computed from hand-built events with values worked out by hand."""

from __future__ import annotations

import pytest

from mer.logs.runs import load_runs
from mer.logs.series import (cycle_series, merge_intervals, outstanding_reads, prefetch_series,
                             read_latency_histogram, rolling_hit_rate, run_span_s, slot_occupancy, time_origin,
                             worker_busy)
from tests.support.log_builders import (acquire_done, compute_job, envelope, expert_read, prefetch_stats, run_started,
                                token_done, write_log)


@pytest.fixture
def run(tmp_path):
    events = [
        envelope("child_spawned", 0.2, "supervisor", run_id=None, child="x"),
        run_started(0.9),
        token_done(0, 1.000, 4000.0, 1000.0, 2500.0, hits=2, misses=2),  # 1.000 .. 1.004
        token_done(1, 1.004, 2000.0, 0.0, 1500.0, hits=0, misses=4),  # 1.004 .. 1.006
        token_done(2, 1.006, 4000.0, 500.0, 3000.0, hits=3, misses=1),  # 1.006 .. 1.010
        expert_read(1, 0, 1.0000, 1.0010, token=0),
        expert_read(2, 1, 1.0005, 1.0008, token=0, read_index=1),
        expert_read(3, 2, 1.0010, 1.0030, kind="prefetch", token=0, read_index=2),
        acquire_done(0, 1.0001, 1.0011, occupied=2, loading=0, leased=2, prefetch=(1, 0, 0, 0, 0)),
        acquire_done(1, 1.0041, 1.0050, occupied=3, loading=1, leased=2, pinned=1, prefetch=(2, 1, 1, 0, 1)),
        compute_job(0, 1, 1.0012, 1.0020),
        compute_job(0, 3, 1.0019, 1.0030),  # overlaps the previous one: merged
        compute_job(1, 2, 1.0012, 1.0016),
        prefetch_stats(1.011, issued=2, completed=2, used=1, wasted=1, dropped=1, reads_counted=3),
    ]
    (result,) = load_runs(str(write_log(tmp_path / "log.jsonl", events)))
    return result


def test_time_zero_is_the_first_token_start_and_the_span_ends_with_the_last_token(run):
    assert time_origin(run) == 1.000
    assert run_span_s(run) == pytest.approx(0.010)


def test_cycle_series_splits_each_token(run):
    series = cycle_series(run)
    assert series.token == [0, 1, 2]
    assert series.t_s == pytest.approx([0.0, 0.004, 0.006])
    assert series.cycle_ms == [4.0, 2.0, 4.0]
    assert series.io_wait_ms == [1.0, 0.0, 0.5]
    assert series.compute_ms == [2.5, 1.5, 3.0]
    assert series.other_ms == pytest.approx([0.5, 0.5, 0.5])


def test_rolling_hit_rate_over_the_last_window_tokens(run):
    by_two = rolling_hit_rate(run, window=2)
    assert by_two.hit_rate_pct == pytest.approx([50.0, 25.0, 37.5])  # 2/4, 2/8, 3/8
    assert by_two.t_s == pytest.approx([0.004, 0.006, 0.010])
    assert rolling_hit_rate(run, window=1).hit_rate_pct == pytest.approx([50.0, 0.0, 75.0])
    assert rolling_hit_rate(run, window=50).hit_rate_pct == pytest.approx([50.0, 25.0, 5 / 12 * 100])
    with pytest.raises(ValueError, match="at least 1 token"):
        rolling_hit_rate(run, window=0)


def test_outstanding_reads_is_a_step_function_of_submissions_and_completions(run):
    series = outstanding_reads(run)
    # submit 0, submit 0.5 ms, done 0.8 ms, done 1.0 ms + submit 1.0 ms (net 0), done 3.0 ms
    assert series.t_s == pytest.approx([0.0, 0.0005, 0.0008, 0.0010, 0.0030])
    assert series.value == [1, 2, 1, 1, 0]


def test_read_latency_histogram_shares_bins_between_kinds(run):
    histogram = read_latency_histogram(run, bins=3)
    assert histogram.edges_ms == pytest.approx([0.3, 0.8667, 1.4333, 2.0], abs=1e-4)
    assert histogram.counts == {"foreground": [1, 1, 0], "prefetch": [0, 0, 1]}


def test_worker_busy_merges_each_workers_jobs_and_adds_the_io_lane(run):
    lanes = worker_busy(run)
    assert [lane.name for lane in lanes] == ["compute-0", "compute-1", "I/O reads"]
    assert len(lanes[0].intervals) == 1 and lanes[0].intervals[0] == pytest.approx((0.0012, 0.0030))
    assert lanes[0].busy_pct == pytest.approx(18.0)
    assert len(lanes[1].intervals) == 1 and lanes[1].intervals[0] == pytest.approx((0.0012, 0.0016))
    assert lanes[1].busy_pct == pytest.approx(4.0)
    assert len(lanes[2].intervals) == 1 and lanes[2].intervals[0] == pytest.approx((0.0, 0.0030))
    assert lanes[2].busy_pct == pytest.approx(30.0)


def test_merge_intervals():
    assert merge_intervals([(5, 6), (1, 3), (2, 4), (4, 4.5), (7, 8)]) == [(1, 4.5), (5, 6), (7, 8)]
    assert merge_intervals([]) == []


def test_slot_occupancy_and_prefetch_counters_come_from_acquire_snapshots(run):
    slots = slot_occupancy(run)
    assert slots.pool_slots == 6
    assert slots.t_s == pytest.approx([0.0011, 0.0050])
    assert (slots.occupied, slots.loading, slots.leased, slots.pinned) == ([2, 3], [0, 1], [2, 2], [0, 1])
    prefetch = prefetch_series(run)
    assert prefetch.t_s == pytest.approx([0.0011, 0.0050])
    assert (prefetch.issued, prefetch.used, prefetch.wasted, prefetch.dropped) == ([1, 2], [0, 1], [0, 0], [0, 1])
    assert prefetch.final == {"issued": 2, "completed": 2, "used": 1, "wasted": 1, "dropped": 1}


def test_a_log_without_the_newer_events_gives_empty_series(tmp_path):
    events = [run_started(0.9), token_done(0, 1.0, 1000.0, 0.0, 900.0, hits=2, misses=0),
              envelope("expert_read", 1.0005, "io", expert_id=1, slot=0, nbytes=4096, latency_us=300.0,
                       kind="foreground")]
    (old,) = load_runs(str(write_log(tmp_path / "old.jsonl", events)))
    assert slot_occupancy(old).t_s == [] and prefetch_series(old).t_s == []
    assert outstanding_reads(old).t_s == [] and worker_busy(old) == []
    assert read_latency_histogram(old, bins=2).counts == {"foreground": [0, 1], "prefetch": [0, 0]}
    assert cycle_series(old).cycle_ms == [1.0]
