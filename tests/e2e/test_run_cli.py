"""`mer-pipeline run` as a user runs it: its help, its `--json` summary and its seed-format block.

Every run is the real console script starting the real process graph on the tiny q4_0 store (2
layers x 8 experts, d_model 256, d_ff 512) written to disk by `tests/conftest.py`.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess

from mer.cli.cluster_flags import CLUSTER_FLAGS
from tests.support.host import AUTO_BACKEND
from tests.support.pipeline_runs import MER_PIPELINE, SUMMARY_KEYS, run_pipeline
import pytest

pytestmark = pytest.mark.slow  # starts the process graph

TINY_PAYLOAD_NBYTES = 221_184
LATENCY_GROUPS = {"io_latency_us": {"p50", "p95", "p99"}, "compute_us": {"p50", "p95", "p99"},
                  "cycle_us": {"p50", "p95", "p99", "max"}}

# flag -> (metavar, unit in parentheses, or None for flags without a unit)
FLAGS_WITH_UNITS = {
    "--tokens": ("N", "iterations"),
    "--cache-slots": ("C", "slots"),
    "--top-k": ("K", "experts"),
    "--predict-fanout": ("F", "experts"),
    "--pipeline-depth": ("D", "decisions"),
    "--compute-workers": ("N|auto", "processes"),
    "--kernel-threads": ("T", "threads per worker"),
    "--io-queue-depth": ("Q", "reads in flight"),
    "--handshake-timeout-s": ("SECONDS", "s"),
    "--shutdown-grace-s": ("SECONDS", "s"),
    "--workload-correlation": ("P", "probability 0..1"),
    "--store": ("DIR", None),
    "--log-file": ("FILE", None),
    "--record-trace": ("FILE", None),
    "--dump-outputs": ("FILE", None),
    "--trace": ("FILE", None),
}


def option_entries(help_text: str) -> dict[str, str]:
    """`--flag METAVAR description` of every option in an argparse help, whitespace collapsed."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        match = re.match(r"\s{2}(--[a-z0-9-]+)(.*)", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2)
        elif current is not None and line.startswith(" " * 6):
            entries[current] += " " + line
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


def test_help_lists_every_flag_with_its_unit():
    completed = subprocess.run([MER_PIPELINE, "run", "--help"], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "COLUMNS": "100"})
    assert completed.returncode == 0
    entries = option_entries(completed.stdout)
    for flag, (metavar, unit) in FLAGS_WITH_UNITS.items():
        assert flag in entries, flag
        assert entries[flag].startswith(metavar), (flag, entries[flag])
        if unit is not None:
            assert re.search(rf"Range \S+\.\.\S+ \({re.escape(unit)}\)\.", entries[flag]), (flag, entries[flag])
    assert "One of: markov, uniform, skewed, replay" in entries["--workload"]
    assert "One of: auto, uring, preadv" in entries["--io-backend"]
    for flag in ("--layered", "--no-prefetch", "--json", "--config", "--seed", "--zipf-s"):
        assert flag in entries, flag


def test_every_command_explains_a_shared_flag_in_the_same_words():
    """The flags come from one builder over the configuration schema: no command re-declares one."""
    helps = {}
    for command in ("run", "up", "generate"):
        completed = subprocess.run([MER_PIPELINE, command, "--help"], capture_output=True, text=True, timeout=60,
                                   env={**os.environ, "COLUMNS": "100"})
        assert completed.returncode == 0, completed.stderr
        helps[command] = option_entries(completed.stdout)
    shared = set(helps["run"]) & set(helps["generate"]) - {"--json", "--seed", "--top-k"}  # generate's: the sampler's
    assert set(CLUSTER_FLAGS) <= shared and not set(CLUSTER_FLAGS) & set(helps["up"])  # up's demo is one machine
    shared -= set(CLUSTER_FLAGS)
    assert {"--cache-slots", "--pipeline-depth", "--predict-fanout", "--predictors", "--compute-workers",
            "--io-backend", "--cache-policy", "--log-file", "--record-trace", "--no-prefetch", "--config",
            "--max-pinned", "--io-queue-depth", "--shutdown-grace-s"} <= shared
    for flag in shared:
        assert helps["run"][flag] == helps["generate"][flag] == helps["up"][flag], flag
    assert "Range 1..64 (decisions)." in helps["generate"]["--pipeline-depth"]
    assert "--record-hidden" in helps["generate"] and "--record-hidden" in helps["up"]
    assert "Sampler" in helps["generate"]["--seed"] and "workload" in helps["run"]["--seed"]  # two settings


def test_json_prints_exactly_one_object_with_every_summary_key(leak_guard, pipeline_stores, tmp_path):
    json_run = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 24, "--cache-slots", 4,
                            "--compute-workers", 2, "--seed", 5, workdir=tmp_path).check_ok()
    lines = json_run.stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert isinstance(summary, dict)
    assert set(SUMMARY_KEYS) <= set(summary), set(SUMMARY_KEYS) - set(summary)
    for group, keys in LATENCY_GROUPS.items():
        assert set(summary[group]) == keys, group
        assert all(summary[group][key] >= 0 for key in keys)
    assert summary["cycle_us"]["p50"] <= summary["cycle_us"]["p95"] <= summary["cycle_us"]["p99"] <= summary["cycle_us"]["max"]

    assert (summary["tokens"], summary["top_k"], summary["experts"]) == (24, 2, 16)
    assert (summary["cache_slots"], summary["pool_slots"]) == (4, 4 + 2)  # plus the prefetch fanout
    assert (summary["d_model"], summary["d_ff"], summary["dtype"]) == (256, 512, "q4_0")
    assert summary["bytes_per_expert"] == TINY_PAYLOAD_NBYTES
    assert (summary["compute_workers"], summary["io_backend"]) == (2, AUTO_BACKEND)
    assert summary["hits"] + summary["misses"] == 24 * 2
    assert summary["predictor_observations"] == 24
    assert math.isclose(summary["sustained_tps"], summary["tokens"] / summary["wall_s"], rel_tol=1e-12)
    assert math.isclose(summary["avg_throughput_mibps"], summary["bytes_read"] / 2**20 / summary["wall_s"],
                        rel_tol=1e-12)
    assert math.isclose(summary["hit_rate_pct"], 100 * summary["hits"] / 48, rel_tol=1e-12)
    for percentage in ("hit_rate_pct", "io_share_pct"):
        assert 0 <= summary[percentage] <= 100
    # the same summary is logged as the structlog event run_summary
    (logged,) = json_run.events_named("run_summary")
    assert {key: logged[key] for key in summary} == summary
    assert "stream complete" not in json_run.stderr + json_run.stdout  # no seed block in --json mode


def test_plain_output_is_the_seed_format_block(leak_guard, pipeline_stores, tmp_path):
    run = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 10, "--cache-slots", 4,
                       "--compute-workers", 1, "--no-prefetch", workdir=tmp_path, as_json=False).check_ok()
    (summary,) = run.events_named("run_summary")
    lines = run.stdout.splitlines()
    number = r"[0-9.e+-]+"
    patterns = [
        rf"stream complete wall_s={number} sustained_tps={number} avg_throughput_mibps={number} hit_rate_pct={number}",
        r"experts: 16 \(top-2\), cache=4 slots, pool=4 slots",
        rf"ffn shape: d_model=256 d_ff=512 bytes/expert={TINY_PAYLOAD_NBYTES} \(dtype=q4_0\)",
        rf"lookups: hits={summary['hits']} misses={summary['misses']} hit_rate={summary['hit_rate_pct']:.2f}%",
        rf"prefetches: issued=0 completed=0 used=0 wasted=0 dropped=0 predictor_observations=10 "
        rf"joins=0 demand_misses={summary['misses']}",
        rf"i/o: reads={summary['reads']} bytes={summary['bytes_read'] / 2**20:.2f} MiB",
        r"i/o latency: p50=\d+us p95=\d+us p99=\d+us",
        r"compute: p50=\d+us p95=\d+us p99=\d+us \(SwiGLU FFN per token\)",
        r"cycle latency: p50=\d+us p95=\d+us p99=\d+us max=\d+us",
        rf"per-token avg: io_wait={number}us compute={number}us \(over 10 tokens\)",
        rf"I/O share: {summary['io_share_pct']:.2f}% of token cycle time spent waiting on SSD reads",
        rf"workers: compute=1 io_backend={AUTO_BACKEND}",
    ]
    assert len(lines) == len(patterns), run.stdout
    for line, pattern in zip(lines, patterns):
        assert re.fullmatch(pattern, line), (line, pattern)
    assert summary["hits"] + summary["misses"] == 20
    first = dict(field.split("=") for field in lines[0].split()[2:])
    assert float(first["wall_s"]) == summary["wall_s"]  # repr: the exact float of the summary


def test_errors_print_nothing_on_stdout(leak_guard, tmp_path):
    missing = tmp_path / "no-store"
    run = run_pipeline(leak_guard, missing, "--tokens", 2, workdir=tmp_path)
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.startswith("mer-pipeline run: error:") and str(missing) in run.stderr
