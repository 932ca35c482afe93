"""Plots are a thin layer: every figure draws exactly its series; PNGs are written; plots whose
events are missing from the log are skipped with the reason."""

from __future__ import annotations

from mer.logs.plots import write_plots
from mer.logs.runs import load_runs
from tests.support.log_builders import (acquire_done, compute_job, envelope, expert_read, prefetch_stats, run_started,
                                token_done, write_log)
from tests.support.plot_checks import check_figures_draw_their_series, check_png

ALL_PLOTS = ["cycle_latency", "hit_rate", "slot_occupancy", "io_queue_depth", "read_latency_histogram",
             "worker_busy", "prefetch"]


def events():
    found = [run_started(0.9)]
    for token in range(12):
        start = 1.0 + token * 0.005
        found.append(token_done(token, start, 4000.0 + 100 * token, 300.0 * (token % 3), 3000.0,
                                hits=token % 3, misses=2 - token % 3))
        found.append(acquire_done(token, start + 1e-4, start + 4e-4, occupied=min(6, token + 2),
                                  loading=token % 2, prefetch=(token, max(0, token - 1), token // 2, token // 4, 0)))
        found.append(expert_read(token, token % 6, start + 1e-4, start + 3e-4 + 1e-5 * token, read_index=2 * token,
                                 token=token))
        found.append(expert_read(token + 1, (token + 1) % 6, start + 4.2e-3, start + 4.6e-3, kind="prefetch",
                                 read_index=2 * token + 1, token=token))
        found.append(compute_job(token % 2, token, start + 5e-4, start + 3.5e-3))
    found.append(prefetch_stats(1.07, issued=12, completed=12, used=6, wasted=3, reads_counted=24))
    return found


def test_every_figure_draws_exactly_its_series(tmp_path):
    (run,) = load_runs(str(write_log(tmp_path / "log.jsonl", events())))
    check_figures_draw_their_series(run, window=4)


def test_write_plots_writes_every_png(tmp_path):
    (run,) = load_runs(str(write_log(tmp_path / "log.jsonl", events())))
    report = write_plots(run, tmp_path / "plots", window=4)
    assert report.skipped == []
    assert [path.name for path in report.written] == [f"{name}.png" for name in ALL_PLOTS]
    for path in report.written:
        check_png(path)


def test_plots_without_their_events_are_skipped_with_the_reason(tmp_path):
    old = [run_started(0.9), token_done(0, 1.0, 1000.0, 0.0, 900.0, hits=1, misses=1),
           envelope("expert_read", 1.0005, "io", expert_id=1, slot=0, nbytes=4096, latency_us=300.0, kind="foreground")]
    (run,) = load_runs(str(write_log(tmp_path / "old.jsonl", old)))
    report = write_plots(run, tmp_path / "plots")
    assert [path.name for path in report.written] == ["cycle_latency.png", "hit_rate.png",
                                                      "read_latency_histogram.png"]
    skipped = dict(report.skipped)
    assert set(skipped) == {"slot_occupancy", "io_queue_depth", "worker_busy", "prefetch"}
    assert "acquire_done" in skipped["slot_occupancy"] and "t_submit" in skipped["io_queue_depth"]
