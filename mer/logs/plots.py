"""PNG plots of a run: a thin matplotlib layer (Agg backend) over the series of `mer.logs.series`.

Each `figure_*` function draws one series object and nothing else, so what a plot shows is what
the tested series functions computed. `write_plots` writes every plot whose events are in the log
and says which it skipped and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mer.logs.runs import RunLog  # noqa: E402
from mer.logs.series import (DEFAULT_HIT_RATE_WINDOW, BusyLane, CycleSeries, HitRateSeries,  # noqa: E402
                             LatencyHistogram, OccupancySeries, PrefetchSeries, StepSeries, cycle_series,
                             outstanding_reads, prefetch_series, read_latency_histogram, rolling_hit_rate,
                             slot_occupancy, time_axis_label, worker_busy)

TIME_LABEL = "time since the first token started (s)"  # a benchmark's; write_plots puts the run's own
DPI = 110
LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small"}


def _figure(title: str, rows: int = 1) -> tuple[Figure, list]:
    figure = Figure(figsize=(12, 3.2 + 2.4 * rows), layout="constrained")
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    figure.suptitle(title, fontsize=13)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return figure, list(axes)


def _label(ax, title: str, ylabel: str, *, xlabel: str = TIME_LABEL, integer: bool = False,
           legend: bool = False) -> None:
    """Title and axis labels of one plot; integer y ticks and an outside legend on request."""
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    if integer:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if legend:
        ax.legend(**LEGEND_OUTSIDE)


def figure_cycle_latency(series: CycleSeries, run_name: str) -> Figure:
    figure, (top, bottom) = _figure(f"Cycle latency per token and where it went ({run_name})", rows=2)
    top.plot(series.t_s, series.cycle_ms, color="black", linewidth=1, label="cycle (whole token)")
    top.set_ylabel("cycle latency (ms)")
    top.set_title("Cycle latency per token")
    top.legend(**LEGEND_OUTSIDE)
    bottom.plot(series.t_s, series.io_wait_ms, color="tab:red", linewidth=1, label="I/O wait")
    bottom.plot(series.t_s, series.compute_ms, color="tab:blue", linewidth=1, label="compute (SwiGLU + combine)")
    bottom.plot(series.t_s, series.other_ms, color="tab:gray", linewidth=1, label="other (messaging, scheduling)")
    _label(bottom, "Split of each token's cycle: I/O wait, compute, other", "per token (ms)", legend=True)
    return figure


def figure_hit_rate(series: HitRateSeries, run_name: str) -> Figure:
    figure, (ax,) = _figure(f"Cache hit rate ({run_name})")
    ax.plot(series.t_s, series.hit_rate_pct, color="tab:green", linewidth=1.2)
    ax.set_ylim(0, 100)
    _label(ax, f"Rolling hit rate over the last {series.window} tokens", "hit rate (%)")
    return figure


def figure_slot_occupancy(series: OccupancySeries, run_name: str) -> Figure:
    figure, (ax,) = _figure(f"Slot occupancy and leases ({run_name})")
    for values, label, color in ((series.occupied, "occupied (holding an expert)", "tab:blue"),
                                 (series.leased, "leased (pinned by the router)", "tab:orange"),
                                 (series.loading, "loading (read in flight)", "tab:red"),
                                 (series.pinned, "pinned experts", "tab:purple")):
        ax.plot(series.t_s, values, drawstyle="steps-post", label=label, color=color, linewidth=1)
    if series.pool_slots is not None:
        ax.axhline(series.pool_slots, color="black", linestyle="--", linewidth=1,
                   label=f"pool slots ({series.pool_slots})")
    _label(ax, "Slots by state after each acquire answered by the I/O worker", "slots", integer=True, legend=True)
    return figure


def figure_io_queue_depth(series: StepSeries, run_name: str) -> Figure:
    figure, (ax,) = _figure(f"I/O queue depth ({run_name})")
    ax.plot(series.t_s, series.value, drawstyle="steps-post", color="tab:red", linewidth=1)
    _label(ax, "Expert reads outstanding (submitted, not yet completed)", "reads queued or in flight", integer=True)
    return figure


def figure_read_latency(histogram: LatencyHistogram, run_name: str) -> Figure:
    figure, (ax,) = _figure(f"Expert read latency ({run_name})")
    for kind, color in (("foreground", "tab:red"), ("prefetch", "tab:green")):
        counts = histogram.counts.get(kind, [])
        ax.stairs(counts, histogram.edges_ms, label=f"{kind} ({sum(counts)} reads)", color=color, linewidth=1.5)
    _label(ax, "Histogram of expert read latencies", "reads", xlabel="read latency, submission to completion (ms)",
           integer=True, legend=True)
    return figure


def figure_worker_busy(lanes: list[BusyLane], run_name: str) -> Figure:
    figure, (ax,) = _figure(f"Busy timeline per worker ({run_name})")
    for row, lane in enumerate(lanes):
        ax.broken_barh([(start, end - start) for start, end in lane.intervals], (row - 0.4, 0.8),
                       color="tab:red" if lane.name.startswith("I/O") else "tab:blue")
    ax.set_yticks(range(len(lanes)), [f"{lane.name} ({lane.busy_pct:.0f}% busy)" for lane in lanes])
    ax.set_xlabel(TIME_LABEL)
    ax.set_title("When each compute worker ran a job, and when the I/O worker had reads outstanding")
    return figure


def figure_prefetch(series: PrefetchSeries, run_name: str) -> Figure:
    figure, (ax,) = _figure(f"Prefetches ({run_name})")
    for values, label, color in ((series.issued, "issued", "tab:blue"), (series.used, "used", "tab:green"),
                                 (series.wasted, "wasted (evicted unused)", "tab:red"),
                                 (series.dropped, "dropped (not admitted)", "tab:gray")):
        ax.plot(series.t_s, values, drawstyle="steps-post", label=label, color=color, linewidth=1.2)
    _label(ax, "Cumulative prefetches issued, used, wasted and dropped", "prefetches so far (count)", integer=True,
           legend=True)
    return figure


NO_TOKENS = "no token_done events (a benchmark's tokens; a generation or conversion logs none)"


@dataclass
class PlotReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (plot name, why)


@dataclass(frozen=True)
class _PlotJob:
    name: str  # the PNG's file stem
    series: object
    draw: Callable[[object, str], Figure]
    has_data: bool
    missing: str  # why the plot is skipped when there is no data


def _plot_jobs(run: RunLog, window: int) -> list[_PlotJob]:
    cycles, hits = cycle_series(run), rolling_hit_rate(run, window)
    slots, depth, histogram = slot_occupancy(run), outstanding_reads(run), read_latency_histogram(run)
    lanes, prefetch = worker_busy(run), prefetch_series(run)
    return [
        _PlotJob("cycle_latency", cycles, figure_cycle_latency, bool(cycles.t_s), NO_TOKENS),
        _PlotJob("hit_rate", hits, figure_hit_rate, bool(hits.t_s), NO_TOKENS),
        _PlotJob("slot_occupancy", slots, figure_slot_occupancy, bool(slots.t_s),
                 "no acquire_done events with slot counts (a log of an older mer?)"),
        _PlotJob("io_queue_depth", depth, figure_io_queue_depth, bool(depth.t_s),
                 "no expert_read events with t_submit/t_done"),
        _PlotJob("read_latency_histogram", histogram, figure_read_latency, bool(histogram.edges_ms),
                 "no expert_read events"),
        _PlotJob("worker_busy", lanes, figure_worker_busy, bool(lanes), "no compute_job or timed expert_read events"),
        _PlotJob("prefetch", prefetch, figure_prefetch, bool(prefetch.t_s),
                 "no acquire_done events with prefetch counters"),
    ]


def write_plots(run: RunLog, out_dir: str | Path, window: int = DEFAULT_HIT_RATE_WINDOW) -> PlotReport:
    """Write `<name>.png` into `out_dir` for every plot of the run that has data."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_name = f"run {run.run_id}" if run.run_id else Path(run.path).name
    report, time_label = PlotReport(), time_axis_label(run)
    for job in _plot_jobs(run, window):
        if not job.has_data:
            report.skipped.append((job.name, job.missing))
            continue
        path = out / f"{job.name}.png"
        figure = job.draw(job.series, run_name)
        for ax in figure.axes:
            if ax.get_xlabel() == TIME_LABEL:
                ax.set_xlabel(time_label)
        figure.savefig(path, dpi=DPI)
        report.written.append(path)
    return report
