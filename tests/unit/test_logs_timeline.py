"""The timeline of one token: every process's steps in time order, in ms since the token started."""

from __future__ import annotations

import pytest

from mer.errors import EventLogError
from mer.logs.runs import load_runs
from mer.logs.timeline import format_timeline, short_process_name, token_timeline
from tests.support.log_builders import (RUN, acquire_done, compute_job, decision_done, envelope, expert_read, run_started,
                                token_done, write_log)


@pytest.fixture
def run(tmp_path):
    events = [
        run_started(0.9),
        token_done(0, 1.000, 2000.0, 0.0, 1500.0, hits=2, misses=0),
        token_done(1, 1.002, 5000.0, 2000.0, 2500.0, hits=1, misses=1),  # 1.002 .. 1.007
        decision_done(1, 1.0021, 1.0041, 1.0069, jobs=((7, 0), (8, 1)), hits=1),
        acquire_done(1, 1.0022, 1.0040, hits=1, occupied=4, loading=1, leased=2),
        expert_read(2, 3, 1.0023, 1.0039, token=1, queue_depth=1, read_index=4),
        expert_read(5, 1, 1.0045, 1.0050, kind="prefetch", token=1, queue_depth=2, read_index=5),
        expert_read(9, 0, 1.0001, 1.0010, token=0, read_index=3),  # another token's read
        compute_job(1, 8, 1.0042, 1.0060),
        compute_job(0, 7, 1.0043, 1.0066),
        compute_job(0, 5, 1.0001, 1.0015),  # a job of token 0
        envelope("bad_release", 1.0050, "io", level="warning", slot=3, generation=2, error="stale"),
        envelope("bad_release", 1.0100, "io", level="warning", slot=3, generation=2, error="outside"),
    ]
    (result,) = load_runs(str(write_log(tmp_path / "log.jsonl", events)))
    return result


def test_the_steps_of_a_token_in_time_order(run):
    entries = token_timeline(run, 1)
    steps = [(round(entry.start_ms, 6), entry.process, entry.what.split(":")[0].split(" (")[0]) for entry in entries]
    assert steps == [
        (0.0, "router", "token started"),
        (0.1, "router", "acquire experts [1, 2]"),
        (0.2, "io", "acquire [1, 2] answered"),
        (0.3, "io", "read expert 2 into slot 3"),
        (2.1, "router", "compute and combine"),
        (2.2, "compute-1", "compute job 8"),
        (2.3, "compute-0", "compute job 7"),
        (2.5, "io", "read expert 5 into slot 1"),
        (3.0, "io", "WARNING bad_release {'slot'"),
        (5.0, "router", "token done"),
    ]
    by_what = {entry.what.split(":")[0]: entry for entry in entries}
    assert by_what["compute job 7"].end_ms == pytest.approx(2.3 + 2.3)
    assert by_what["read expert 2 into slot 3 (miss, 216 KiB, 1.600 ms, 1 read(s) outstanding at submission)"] \
        .end_ms == pytest.approx(1.9)
    assert "job 7 -> compute-0, job 8 -> compute-1" in by_what["compute and combine (layer 0)"].what
    assert "prefetch for a later token" in entries[7].what


def test_formatted_timeline_and_unknown_tokens(run):
    text = format_timeline(run, 1, token_timeline(run, 1))
    lines = text.splitlines()
    assert lines[0] == f"token 1 of {run.label}: times in ms since the token started"
    assert lines[2].split()[:3] == ["+0.100", "2.000", "router"]
    assert lines[-1].split()[:3] == ["+5.000", "router", "token"]
    with pytest.raises(EventLogError, match=r"token 9 is not in the log \(tokens 0..1 are logged\)"):
        token_timeline(run, 9)


def test_process_names_lose_the_run_id():
    assert short_process_name(f"mer-compute-12-{RUN}") == "compute-12"
    assert short_process_name(f"mer-io-{RUN}") == "io"
    assert short_process_name("mer-supervisor") == "supervisor"
