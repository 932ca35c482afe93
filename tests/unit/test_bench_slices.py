"""tools/bench_slices.py: the slice plans it times, and no shared memory left behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_slices  # noqa: E402


def test_the_slice_benchmark_times_each_plan_against_the_whole_expert_and_cleans_up():
    before = set(os.listdir("/dev/shm"))
    report = bench_slices.run(bench_slices.parse_arguments(["--slices", "1,2,16", "--batches", "1", "--repeats", "1"]))
    assert report["expert_bytes"] == 99_090_432
    assert [(row["batch"], row["slices"]) for row in report["rows"]] == [(1, 1), (1, 2), (1, 16)]
    assert report["rows"][0]["vs_whole"] == 1.0
    assert all(row["ms"] > 0 for row in report["rows"])
    assert set(os.listdir("/dev/shm")) <= before
