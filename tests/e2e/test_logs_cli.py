"""`mer-pipeline logs` end to end: the console script on the log of a real `mer-pipeline run` (store
written by `mer-pipeline synth --preset tiny`), and on the log of a run interrupted with SIGINT.

Checked: `logs summarize --json` prints exactly what `run --json` printed; the text form is the
seed-format block; `compare` of a log with the run's own `--json` output gives ratios of 1;
`plot` writes the seven PNGs; `timeline` lists a token's steps in time order; malformed lines,
partial last lines and other schema versions give the documented error or warning.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from mer.metrics.summary import RunSummary, format_seed_block
from tests.support.log_runs import module_runs
from tests.support.pipeline_runs import MER_PIPELINE, PipelineRun, RunningPipeline
from tests.support.plot_checks import check_png

pytestmark = pytest.mark.slow  # starts the process graph

CLI_TIMEOUT_S = 120


def logs(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([MER_PIPELINE, "logs", *map(str, arguments)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "tiny"
    subprocess.run([MER_PIPELINE, "synth", "--preset", "tiny", "--out", str(out)], check=True, capture_output=True,
                   timeout=CLI_TIMEOUT_S)
    return out


@pytest.fixture(scope="module")
def run(store, tmp_path_factory) -> PipelineRun:
    flags = ("--tokens", 40, "--cache-slots", 4, "--compute-workers", 2)
    return module_runs(store, {"run": flags}, tmp_path_factory)["run"]


def test_summarize_prints_what_the_run_printed(run, tmp_path):
    as_json = logs("summarize", run.log_path, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stdout == run.stdout  # one JSON object, byte for byte the run's `--json` output
    assert as_json.stderr == ""
    as_text = logs("summarize", run.log_path)
    assert as_text.returncode == 0
    assert as_text.stdout == ("log kind: run (a benchmark run (mer-pipeline run / up))\n"
                              + format_seed_block(RunSummary.from_json_dict(run.summary)) + "\n")


def test_compare_a_log_with_the_runs_json_output(run, tmp_path):
    run_json = tmp_path / "run.json"
    run_json.write_text(run.stdout)
    result = logs("compare", run.log_path, run_json, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["runs"] == [str(run.log_path), str(run_json)]
    assert data["biggest_changes"] == []
    assert all(metric["ratios"][1] in (1.0, None) for metric in data["metrics"])
    assert next(m for m in data["metrics"] if m["metric"] == "sustained_tps")["values"] == \
        [run.summary["sustained_tps"]] * 2
    text = logs("compare", run.log_path, run_json)
    assert text.returncode == 0 and text.stdout.splitlines()[0] == f"A = {run.log_path}"
    assert "no headline metric changed by 5% or more against A" in text.stdout
    alone = logs("compare", run.log_path)
    assert alone.returncode == 1 and "compare needs at least two runs" in alone.stderr


def test_plot_writes_every_png(run, tmp_path):
    result = logs("plot", run.log_path, "--out", tmp_path / "plots")
    assert result.returncode == 0, result.stderr
    names = ["cycle_latency", "hit_rate", "slot_occupancy", "io_queue_depth", "read_latency_histogram",
             "worker_busy", "prefetch"]
    assert result.stdout.splitlines() == [str(tmp_path / "plots" / f"{name}.png") for name in names]
    for name in names:
        check_png(tmp_path / "plots" / f"{name}.png")


def test_timeline_of_one_token(run):
    result = logs("timeline", run.log_path, "--token", 3)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"token 3 of {run.log_path} (run ")
    starts = [float(line.split()[0]) for line in lines[1:]]
    assert starts == sorted(starts) and starts[0] == 0.0
    entries = json.loads(logs("timeline", run.log_path, "--token", 3, "--json").stdout)
    assert {entry["process"] for entry in entries} >= {"router", "io", "compute-0", "compute-1"}
    missing = logs("timeline", run.log_path, "--token", 400)
    assert missing.returncode == 1 and "token 400 is not in the log (tokens 0..39 are logged)" in missing.stderr


def test_bad_logs_give_line_numbers_warnings_and_clear_errors(run, tmp_path):
    lines = run.log_path.read_text().splitlines(keepends=True)
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text("".join(lines[:2]) + "not json at all\n" + "".join(lines[2:]))
    result = logs("summarize", malformed)
    assert result.returncode == 1 and result.stdout == ""
    assert f"{malformed}:3: malformed line: not JSON" in result.stderr
    skipped = logs("summarize", malformed, "--json", "--skip-malformed")
    assert skipped.returncode == 0 and skipped.stdout == run.stdout
    assert f"warning: {malformed}:3: malformed line" in skipped.stderr

    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines) + lines[-1][:25])
    result = logs("summarize", partial, "--json")
    assert result.returncode == 0 and result.stdout == run.stdout
    assert f"warning: {partial}:{len(lines) + 1}: partial last line dropped" in result.stderr

    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("".join(lines[:6]) + json.dumps({**json.loads(lines[6]), "schema": 7}) + "\n")
    result = logs("summarize", foreign)
    assert result.returncode == 1
    assert f"{foreign}:7: event" in result.stderr and "is log schema 7; this mer reads schema 1 only" in result.stderr


def test_the_log_of_an_interrupted_run(leak_guard, store, tmp_path):
    running = RunningPipeline(leak_guard, store, "--tokens", 100000, "--cache-slots", 4, "--compute-workers", 1,
                              workdir=tmp_path)
    try:
        running.wait_for_event("token_done", count=25)
        running.send_signal(signal.SIGINT)
        finished = running.finish()
    finally:
        running.kill_if_running()
    assert finished.returncode != 0
    tokens = len(finished.events_named("token_done"))
    result = logs("summarize", running.log_path, "--json")
    assert result.returncode == 0, result.stderr
    assert "no run_summary event: the run did not finish" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["tokens"] == tokens >= 25
    plotted = logs("plot", running.log_path, "--out", tmp_path / "plots")
    assert plotted.returncode == 0 and len(plotted.stdout.splitlines()) == 7


def test_logs_without_a_subcommand_shows_help():
    result = logs()
    assert result.returncode == 2 and "summarize" in result.stderr and "timeline" in result.stderr
