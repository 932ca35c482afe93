"""Checks that each plot draws exactly its series: the data is read back from the figure's artists
(lines, step patches, bar collections) and compared with the series functions' results."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mer.logs import plots
from mer.logs.runs import RunLog
from mer.logs.series import (cycle_series, outstanding_reads, prefetch_series, read_latency_histogram,
                             rolling_hit_rate, slot_occupancy, worker_busy)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def lines_by_label(figure) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (x, y) of every line of every axes of a figure."""
    drawn = {}
    for ax in figure.axes:
        for line in ax.get_lines():
            drawn[line.get_label()] = (list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
    return drawn


def _same(drawn: tuple[list[float], list[float]], x, y) -> None:
    assert np.array_equal(drawn[0], np.asarray(x, dtype=float)), "x data differs from the series"
    assert np.array_equal(drawn[1], np.asarray(y, dtype=float)), "y data differs from the series"


def check_figures_draw_their_series(run: RunLog, window: int = 50) -> None:
    """Build every figure of `run` and assert that its artists hold exactly the series' numbers."""
    cycles = cycle_series(run)
    lines = lines_by_label(plots.figure_cycle_latency(cycles, "run"))
    _same(lines["cycle (whole token)"], cycles.t_s, cycles.cycle_ms)
    _same(lines["I/O wait"], cycles.t_s, cycles.io_wait_ms)
    _same(lines["compute (SwiGLU + combine)"], cycles.t_s, cycles.compute_ms)
    _same(lines["other (messaging, scheduling)"], cycles.t_s, cycles.other_ms)

    hits = rolling_hit_rate(run, window)
    (only,) = lines_by_label(plots.figure_hit_rate(hits, "run")).values()
    _same(only, hits.t_s, hits.hit_rate_pct)

    slots = slot_occupancy(run)
    lines = lines_by_label(plots.figure_slot_occupancy(slots, "run"))
    _same(lines["occupied (holding an expert)"], slots.t_s, slots.occupied)
    _same(lines["leased (pinned by the router)"], slots.t_s, slots.leased)
    _same(lines["loading (read in flight)"], slots.t_s, slots.loading)
    _same(lines["pinned experts"], slots.t_s, slots.pinned)
    assert lines[f"pool slots ({slots.pool_slots})"][1] == [slots.pool_slots] * 2

    depth = outstanding_reads(run)
    (only,) = lines_by_label(plots.figure_io_queue_depth(depth, "run")).values()
    _same(only, depth.t_s, depth.value)

    histogram = read_latency_histogram(run)
    figure = plots.figure_read_latency(histogram, "run")
    stairs = {patch.get_label().split(" ")[0]: patch.get_data() for patch in figure.axes[0].patches}
    for kind in ("foreground", "prefetch"):
        assert np.array_equal(stairs[kind].values, histogram.counts[kind])
        assert np.array_equal(stairs[kind].edges, histogram.edges_ms)

    lanes = worker_busy(run)
    figure = plots.figure_worker_busy(lanes, "run")
    collections = figure.axes[0].collections
    assert len(collections) == len(lanes)
    for lane, collection in zip(lanes, collections):
        drawn = [(path.vertices[:, 0].min(), path.vertices[:, 0].max()) for path in collection.get_paths()]
        assert np.allclose(drawn, lane.intervals, rtol=0, atol=1e-12)
    labels = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert labels == [f"{lane.name} ({lane.busy_pct:.0f}% busy)" for lane in lanes]

    prefetch = prefetch_series(run)
    lines = lines_by_label(plots.figure_prefetch(prefetch, "run"))
    _same(lines["issued"], prefetch.t_s, prefetch.issued)
    _same(lines["used"], prefetch.t_s, prefetch.used)
    _same(lines["wasted (evicted unused)"], prefetch.t_s, prefetch.wasted)
    _same(lines["dropped (not admitted)"], prefetch.t_s, prefetch.dropped)


def check_png(path: Path) -> None:
    """A non-empty PNG file (signature, then an IHDR chunk with a non-zero size)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 200 and len(data) > 5000, f"{path}: {width}x{height}, {len(data)} bytes"
