"""The run summary recomputed from a log: reads counted as the run counted them, interrupted runs
(no summary, no prefetch_stats) with warnings, and bad events named by file and line."""

from __future__ import annotations

import pytest

from mer.errors import EventLogError
from mer.logs.recompute import recompute_summary
from mer.logs.runs import load_runs
from tests.support.log_builders import (acquire_done, decision_done, envelope, expert_read, prefetch_stats, run_started,
                                token_done, write_log)

NBYTES = 221184 + 4096


def base_events():
    """Three tokens: 1 ms, 2 ms, 3 ms cycles; 4 lookups each... and three reads, one after the stats."""
    return [
        run_started(),
        token_done(0, 1.000, 1000.0, 400.0, 500.0, hits=0, misses=2),
        expert_read(1, 0, 1.0001, 1.0003, read_index=0, nbytes=NBYTES),
        expert_read(2, 1, 1.0001, 1.0004, read_index=1, nbytes=NBYTES),
        acquire_done(0, 1.0001, 1.0004, hits=0, prefetch=(1, 0, 0, 0, 3)),
        decision_done(0, 1.0001, 1.0005, 1.0009),
        token_done(1, 1.002, 2000.0, 0.0, 1800.0, hits=2, misses=0),
        acquire_done(1, 1.0021, 1.0022, prefetch=(2, 2, 1, 0, 3)),
        decision_done(1, 1.0021, 1.0023, 1.0039),
        token_done(2, 1.005, 3000.0, 0.0, 2500.0, hits=1, misses=1, prefetch_used=1),
        prefetch_stats(1.009, issued=2, completed=2, used=1, wasted=1, dropped=3, observations=3, reads_counted=2),
        expert_read(7, 2, 1.0085, 1.0095, kind="prefetch", token=2, read_index=2, nbytes=NBYTES),
    ]


def test_reads_after_the_final_statistics_are_not_counted_as_in_the_run(tmp_path):
    (run,) = load_runs(str(write_log(tmp_path / "log.jsonl", base_events())))
    result = recompute_summary(run)
    summary = result.summary
    assert summary.reads == 2 and summary.bytes_read == 2 * NBYTES
    assert summary.tokens == 3 and summary.hits == 3 and summary.misses == 3
    assert summary.wall_s == pytest.approx(1.008 - 1.000)
    assert summary.io_share_pct == pytest.approx(400 / 6000 * 100)
    assert (summary.prefetches_issued, summary.prefetches_used, summary.prefetches_wasted,
            summary.prefetches_dropped, summary.predictor_observations) == (2, 1, 1, 3, 3)
    assert result.logged is None
    assert any("no run_summary event" in warning and "3 tokens logged" in warning for warning in result.warnings)


def test_without_reads_counted_every_read_counts(tmp_path):
    events = base_events()
    del events[-2]["reads_counted"]
    (run,) = load_runs(str(write_log(tmp_path / "log.jsonl", events)))
    assert recompute_summary(run).summary.reads == 3


def test_an_interrupted_run_takes_prefetch_counters_from_the_last_snapshot(tmp_path):
    events = [event for event in base_events() if event["event"] != "prefetch_stats"]
    (run,) = load_runs(str(write_log(tmp_path / "log.jsonl", events)))
    result = recompute_summary(run)
    summary = result.summary
    assert summary.reads == 3  # nothing says which reads the run would have counted
    assert (summary.prefetches_issued, summary.prefetches_completed, summary.prefetches_used,
            summary.prefetches_wasted, summary.prefetches_dropped) == (2, 2, 1, 0, 3)
    assert summary.predictor_observations == 2  # decision_done events
    assert any("from the I/O worker's last acquire_done" in warning for warning in result.warnings)


def test_without_any_counters_they_are_zero_with_a_warning(tmp_path):
    events = [e for e in base_events() if e["event"] not in ("prefetch_stats", "acquire_done")]
    (run,) = load_runs(str(write_log(tmp_path / "log.jsonl", events)))
    result = recompute_summary(run)
    assert result.summary.prefetches_issued == 0 and result.summary.predictor_observations == 0
    assert any("are unknown and reported as 0" in warning for warning in result.warnings)


def test_a_logged_summary_is_kept_and_a_difference_is_reported(tmp_path):
    path = write_log(tmp_path / "first.jsonl", base_events())
    (run,) = load_runs(str(path))
    summary = recompute_summary(run).summary.to_json_dict()
    write_log(path, [*base_events(), envelope("run_summary", 1.01, **summary)])
    (run,) = load_runs(str(path))
    result = recompute_summary(run)
    assert result.logged == summary and result.summary.to_json_dict() == summary and result.warnings == []
    write_log(path, [*base_events(), envelope("run_summary", 1.01, **{**summary, "hits": 4, "reads": 3})])
    (run,) = load_runs(str(path))
    assert recompute_summary(run).warnings == [
        f"{run.label}: the recomputed summary differs from the logged run_summary in hits, reads"]


def test_bad_events_are_named_by_file_and_line(tmp_path):
    events = base_events()
    events[6]["hits"] = -1
    path = write_log(tmp_path / "log.jsonl", events)
    (run,) = load_runs(str(path))
    with pytest.raises(EventLogError, match=f"{path}:7 \\(token_done\\): field 'hits' must not be negative"):
        recompute_summary(run)


def test_a_token_logged_twice_names_both_lines(tmp_path):
    events = base_events()
    events.append(token_done(1, 1.02, 1000.0, 0.0, 900.0, hits=2, misses=0))
    path = write_log(tmp_path / "log.jsonl", events)
    (run,) = load_runs(str(path))
    with pytest.raises(EventLogError, match=f"{path}:13: token 1 is logged twice \\(first on line 7\\)"):
        recompute_summary(run)


def test_a_run_that_never_started_its_job_cannot_be_summarized(tmp_path):
    events = [e for e in base_events() if e["event"] != "run_started"]
    (run,) = load_runs(str(write_log(tmp_path / "log.jsonl", events)))
    with pytest.raises(EventLogError, match="no run_started event: the run never started its job"):
        recompute_summary(run)
