"""tools/run_overlap.py: a run's window split into disk and compute time, overlapped or not."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import run_overlap  # noqa: E402

from tests.support.log_runs import module_runs  # noqa: E402


def _log(tmp_path: Path, events: list[dict]) -> Path:
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(event) + "\n" for event in events))
    return path


def test_the_window_is_split_into_both_disk_only_compute_only_and_neither(tmp_path):
    # window 0..10 s; reads 1..4 and 3..6 (disk busy 1..6), jobs 5..7 and 8..9
    log = _log(tmp_path, [
        {"event": "token_done", "t_start_s": 0.0, "t_end_s": 4.0},
        {"event": "expert_read", "t_submit": 1.0, "t_done": 4.0},
        {"event": "expert_read", "t_submit": 3.0, "t_done": 6.0},
        {"event": "expert_read", "t_submit": None, "t_done": None},  # without timing (no log detail): skipped
        {"event": "compute_job", "t_start": 5.0, "t_end": 7.0},
        {"event": "compute_job", "t_start": 8.0, "t_end": 9.0},
        {"event": "compute_job", "t_start": 9.5, "t_end": 12.0},  # cut at the window's end
        {"event": "token_done", "t_start_s": 4.0, "t_end_s": 10.0},
    ])
    reads, jobs, window, tokens = run_overlap.read_intervals(log)
    assert (len(reads), len(jobs), window, tokens) == (2, 3, (0.0, 10.0), 2)
    seconds = run_overlap.split_time(reads, jobs, window)
    assert seconds == pytest.approx({"both": 1.0, "disk only": 4.0, "compute only": 2.5, "neither": 2.5})
    assert sum(seconds.values()) == pytest.approx(10.0)


def test_a_log_without_tokens_is_refused_naming_it(tmp_path):
    log = _log(tmp_path, [{"event": "generation_token", "t_mono": 1.0}])
    with pytest.raises(SystemExit, match="no token_done events"):
        run_overlap.read_intervals(log)


@pytest.mark.slow  # starts the process graph (for a real log)
def test_a_real_run_is_split_over_its_whole_window(pipeline_stores, tmp_path_factory, capsys):
    flags = ("--tokens", 40, "--cache-slots", 4, "--compute-workers", 1)
    log = module_runs(pipeline_stores["tiny"], {"run": flags}, tmp_path_factory)["run"].log_path
    assert run_overlap.main([str(log), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 40 and result["reads"] > 0 and result["compute_jobs"] >= 40
    assert sum(result["seconds"].values()) == pytest.approx(result["window_s"])
    assert result["seconds"]["disk only"] + result["seconds"]["both"] > 0  # 4 slots for 16 experts: misses read
    assert 0 < result["compute_busy_pct"] <= 100 and result["cycle_over_busiest"] >= 1.0
