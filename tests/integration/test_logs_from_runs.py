"""Log analysis on logs of REAL runs: two short `mer-pipeline run`s (real process graph, io_uring
reads from a tiny store on disk) write their logs; `mer.logs` must recompute each run's own
`run_summary` exactly, agree with the events of every process, draw exactly the computed series,
and cope with the same logs cut short, corrupted, concatenated or of another schema version.

Run A: 60 tokens, flat pool, prefetch on, 2 compute workers, 4 cache slots (evictions happen).
Run B: 40 tokens, `--layered`, no prefetch, 1 compute worker, 6 cache slots.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mer.errors import EventLogError
from mer.logs.compare import compare_summaries
from mer.logs.plots import write_plots
from mer.logs.recompute import recompute_summary
from mer.logs.runs import RunLog, load_runs
from mer.logs.series import (cycle_series, outstanding_reads, prefetch_series, rolling_hit_rate, slot_occupancy,
                             worker_busy)
from mer.logs.timeline import token_timeline
from tests.support.log_runs import module_runs
from tests.support.pipeline_runs import PipelineRun
from tests.support.plot_checks import check_figures_draw_their_series, check_png

pytestmark = pytest.mark.slow  # starts the process graph

RUN_FLAGS = {
    "A": ("--tokens", 60, "--cache-slots", 4, "--compute-workers", 2, "--seed", 5),
    "B": ("--tokens", 40, "--cache-slots", 6, "--compute-workers", 1, "--seed", 6, "--layered", "--no-prefetch"),
}


@pytest.fixture(scope="module")
def runs(pipeline_stores, tmp_path_factory) -> dict[str, PipelineRun]:
    return module_runs(pipeline_stores["tiny"], RUN_FLAGS, tmp_path_factory)


def only_run(run: PipelineRun) -> RunLog:
    (result,) = load_runs(str(run.log_path))
    return result


@pytest.mark.parametrize("name", ["A", "B"])
def test_the_recomputed_summary_is_the_runs_own_exactly(runs, name):
    run = runs[name]
    result = recompute_summary(only_run(run))
    (logged,) = run.events_named("run_summary")
    assert result.warnings == []
    assert result.summary.to_json_dict() == run.summary  # `run --json`, parsed
    assert json.dumps(result.summary.to_json_dict()) == run.stdout.strip()  # and byte for byte
    assert result.logged == {key: logged[key] for key in run.summary}
    assert result.summary.tokens == int(RUN_FLAGS[name][1])


def test_the_events_of_every_process_agree(runs):
    for name, run in runs.items():
        log = only_run(run)
        summary = run.summary
        decisions = log.named("decision_done")
        acquires = log.named("acquire_done")
        layers = 2 if "--layered" in RUN_FLAGS[name] else 1
        assert len(decisions) == len(acquires) == summary["tokens"] * layers
        assert sum(event["hits"] for event in acquires) == sum(event["hits"] for event in decisions) == summary["hits"]
        jobs = {job_id: worker for event in decisions for job_id, worker in event["jobs"]}
        computed = {event["job_id"]: event["worker"] for event in log.named("compute_job")}
        assert computed == jobs  # every job dispatched was computed, by the worker it was sent to
        assert set(jobs.values()) == set(range(summary["compute_workers"]))
        reads = log.named("expert_read")
        assert sorted(read["read_index"] for read in reads) == list(range(len(reads)))
        counted = [read for read in reads if read["read_index"] < log.last("prefetch_stats")["reads_counted"]]
        assert len(counted) == summary["reads"] and sum(read["nbytes"] for read in counted) == summary["bytes_read"]
        assert all(read["t_submit"] <= read["t_done"] for read in reads)
        kinds = Counter(read["kind"] for read in counted)
        assert kinds["prefetch"] == summary["prefetches_completed"]  # both counted when a prefetch read ends
        if "--no-prefetch" in RUN_FLAGS[name]:
            assert kinds["prefetch"] == 0 and summary["prefetches_issued"] == 0
        else:
            assert kinds["prefetch"] > 0


def test_series_of_a_real_run_match_its_events(runs):
    log = only_run(runs["A"])
    summary = runs["A"].summary
    tokens = sorted(log.named("token_done"), key=lambda event: event["token"])
    cycles = cycle_series(log)
    assert cycles.cycle_ms == [event["cycle_us"] / 1e3 for event in tokens]
    assert sum(cycles.io_wait_ms) == pytest.approx(summary["io_wait_us_per_token"] * len(tokens) / 1e3)
    window = 7
    rates = rolling_hit_rate(log, window).hit_rate_pct
    for index in range(len(tokens)):
        last = tokens[max(0, index + 1 - window):index + 1]
        assert rates[index] == pytest.approx(100 * sum(t["hits"] for t in last) / sum(t["lookups"] for t in last))

    reads = log.named("expert_read")
    depth = outstanding_reads(log)
    origin = tokens[0]["t_start_s"]
    for moment, value in zip(depth.t_s, depth.value):
        t = moment + origin
        assert value == sum(read["t_submit"] <= t < read["t_done"] for read in reads)

    slots = slot_occupancy(log)
    assert slots.pool_slots == summary["pool_slots"] == 6
    assert all(0 < occupied <= 6 for occupied in slots.occupied) and set(slots.pinned) == {0}
    assert all(leased >= 2 for leased in slots.leased)  # the router holds the token's k leases
    assert slots.occupied == sorted(slots.occupied)  # slots are never freed in a run without read errors
    assert slots.occupied[-1] == 6  # 16 experts through 6 slots: every slot used

    prefetch = prefetch_series(log)
    for values, key in ((prefetch.issued, "issued"), (prefetch.used, "used"), (prefetch.wasted, "wasted")):
        assert values == sorted(values) and values[-1] <= prefetch.final[key] == summary[f"prefetches_{key}"]

    lanes = worker_busy(log)
    assert [lane.name for lane in lanes] == ["compute-0", "compute-1", "I/O reads"]
    assert all(0 < lane.busy_pct <= 100 for lane in lanes)


def test_plots_of_a_real_run_draw_its_series(runs, tmp_path):
    log = only_run(runs["A"])
    report = write_plots(log, tmp_path / "plots", window=10)
    assert report.skipped == [] and len(report.written) == 7
    for path in report.written:
        check_png(path)
    check_figures_draw_their_series(log, window=10)


def test_the_timeline_of_a_real_token(runs):
    log = only_run(runs["A"])
    token = next(event for event in log.named("token_done") if event["misses"] and event["token"] > 5)
    entries = token_timeline(log, token["token"])
    assert [entry.start_ms for entry in entries] == sorted(entry.start_ms for entry in entries)
    assert entries[0].what == "token started" and entries[-1].what.startswith("token done")
    assert entries[-1].start_ms == pytest.approx((token["t_end_s"] - token["t_start_s"]) * 1e3)
    processes = Counter(entry.process for entry in entries)
    assert processes["compute-0"] >= 1 and processes["compute-1"] >= 1 and processes["io"] >= 2
    assert any("(miss," in entry.what for entry in entries)


def test_a_file_holding_both_runs_is_split_and_each_run_summarized(runs, tmp_path):
    both = tmp_path / "both.jsonl"
    both.write_text(runs["A"].log_path.read_text() + runs["B"].log_path.read_text())
    split = load_runs(str(both))
    assert len(split) == 2
    for name, log in zip("AB", split):
        assert recompute_summary(log).summary.to_json_dict() == runs[name].summary
        own = only_run(runs[name])
        assert len(log.events) == len(own.events) and log.run_id == own.run_id


def test_a_log_cut_short_warns_and_summarizes_the_tokens_it_holds(runs, tmp_path):
    lines = runs["A"].log_path.read_text().splitlines(keepends=True)
    token_lines = [i for i, line in enumerate(lines) if '"event": "token_done"' in line]
    cut = token_lines[29]
    partial = tmp_path / "cut.jsonl"
    partial.write_text("".join(lines[:cut + 1]) + lines[cut + 1][: len(lines[cut + 1]) // 2])
    (log,) = load_runs(str(partial))
    assert len(log.warnings) == 1 and f"{partial}:{cut + 2}: partial last line" in log.warnings[0]
    result = recompute_summary(log)
    assert result.logged is None
    assert any("no run_summary event" in warning for warning in result.warnings)
    assert any("no prefetch_stats event" in warning for warning in result.warnings)
    kept = [json.loads(lines[i]) for i in token_lines[:30]]
    assert result.summary.tokens == 30 and result.summary.hits == sum(event["hits"] for event in kept)


def test_corrupted_and_foreign_logs_are_reported_by_line(runs, tmp_path):
    lines = runs["A"].log_path.read_text().splitlines(keepends=True)
    corrupted = tmp_path / "corrupted.jsonl"
    corrupted.write_text("".join(lines[:4]) + '{"event": "token_done", "token\n' + "".join(lines[4:]))
    with pytest.raises(EventLogError, match=f"{corrupted}:5: malformed line: not JSON"):
        load_runs(str(corrupted))
    (log,) = load_runs(str(corrupted), skip_malformed=True)
    assert recompute_summary(log).summary.to_json_dict() == runs["A"].summary

    foreign = tmp_path / "foreign.jsonl"
    event = json.loads(lines[9])
    foreign.write_text("".join(lines[:9]) + json.dumps({**event, "schema": 2}) + "\n" + "".join(lines[10:]))
    with pytest.raises(EventLogError, match=f"{foreign}:10: event '{event['event']}' is log schema 2"):
        load_runs(str(foreign))


def test_comparing_the_two_real_runs(runs):
    a, b = runs["A"].summary, runs["B"].summary
    comparison = compare_summaries([a, b], ["A", "B"])
    rows = {row.metric.key: row for row in comparison.rows}
    assert rows["sustained_tps"].ratios == [1.0, b["sustained_tps"] / a["sustained_tps"]]
    assert rows["hit_rate_pct"].ratios == [1.0, b["hit_rate_pct"] / a["hit_rate_pct"]]
    assert rows["compute_us.p50"].ratios == [1.0, b["compute_us"]["p50"] / a["compute_us"]["p50"]]
    assert rows["prefetches_issued"].ratios == [1.0, 0.0]
    assert rows["compute_workers"].ratios == [1.0, 0.5]
    assert [row.change for row in comparison.biggest] == sorted((row.change for row in comparison.biggest),
                                                                reverse=True)
