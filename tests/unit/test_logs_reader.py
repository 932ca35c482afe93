"""Reading JSON-lines logs: line numbers of malformed lines, partial last lines, other schema versions,
and the split of a file into runs (children's run_id, the supervisor's pid), ordered by t_mono."""

from __future__ import annotations

import json

import pytest

from mer.errors import EventLogError
from mer.logs.reader import read_log
from mer.logs.runs import load_runs, select_run, split_runs
from tests.support.log_builders import RUN, envelope, write_log

EVENTS = [envelope("child_spawned", 1.0, "supervisor", run_id=None, child="x"),
          envelope("token_done", 2.0, token=0),
          envelope("expert_read", 1.5, "io", expert_id=3)]


def test_events_come_with_their_line_numbers_and_blank_lines_are_ignored(tmp_path):
    path = write_log(tmp_path / "log.jsonl", EVENTS, extra_lines={1: "", 3: "   "})
    log = read_log(path)
    assert [event["event"] for event in log.events] == ["child_spawned", "token_done", "expert_read"]
    assert log.line_numbers == [1, 3, 5]
    assert log.warnings == []


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object but a list"),
    ('{"schema": 1, "t_mono": 1.0}', "no 'event' name"),
    ('{"event": "token_done", "t_mono": 1.0}', "has no 'schema' field"),
    ('{"event": "token_done", "schema": 1}', "no finite 't_mono'"),
    ('{"event": "token_done", "schema": 1, "t_mono": "soon"}', "no finite 't_mono'"),
])
def test_malformed_lines_are_errors_naming_file_line_and_reason(tmp_path, bad_line, reason):
    path = write_log(tmp_path / "log.jsonl", EVENTS, extra_lines={1: bad_line})
    with pytest.raises(EventLogError) as caught:
        read_log(path)
    assert f"{path}:2: malformed line: " in str(caught.value)
    assert reason in str(caught.value)
    assert "--skip-malformed" in str(caught.value)


def test_every_malformed_line_is_reported_and_skip_malformed_turns_them_into_warnings(tmp_path):
    path = write_log(tmp_path / "log.jsonl", EVENTS, extra_lines={0: "garbage", 2: "{}"})
    with pytest.raises(EventLogError) as caught:
        read_log(path)
    message = str(caught.value)
    assert "2 malformed line(s)" in message and f"{path}:1:" in message and f"{path}:3:" in message
    log = read_log(path, skip_malformed=True)
    assert [event["event"] for event in log.events] == ["child_spawned", "token_done", "expert_read"]
    assert log.line_numbers == [2, 4, 5]
    assert [(warning.line, "skipped" in warning.message) for warning in log.warnings] == [(1, True), (3, True)]


def test_an_error_lists_ten_malformed_lines_and_counts_the_rest(tmp_path):
    path = write_log(tmp_path / "log.jsonl", EVENTS, extra_lines={i: "x" for i in range(12)})
    with pytest.raises(EventLogError) as caught:
        read_log(path)
    assert "12 malformed line(s)" in str(caught.value) and "... and 2 more" in str(caught.value)
    assert f"{path}:10:" in str(caught.value) and f"{path}:11:" not in str(caught.value)


def test_a_line_that_is_not_utf8_is_malformed(tmp_path):
    path = write_log(tmp_path / "log.jsonl", EVENTS)
    path.write_bytes(path.read_bytes() + b'{"event": "\xff\xfe"}\n')
    with pytest.raises(EventLogError, match=r":4: malformed line: not UTF-8"):
        read_log(path)


def test_a_partial_last_line_is_dropped_with_a_warning(tmp_path):
    partial = json.dumps(envelope("token_done", 3.0, token=1))[:40]
    path = write_log(tmp_path / "log.jsonl", EVENTS, tail=partial)
    log = read_log(path)
    assert len(log.events) == 3
    assert len(log.warnings) == 1 and log.warnings[0].line == 4
    assert "partial last line" in str(log.warnings[0]) and str(log.warnings[0]).startswith(f"{path}:4:")


def test_a_complete_last_line_without_newline_is_read_and_a_bad_one_with_newline_is_an_error(tmp_path):
    path = write_log(tmp_path / "log.jsonl", EVENTS[:2], tail=json.dumps(EVENTS[2]))
    assert len(read_log(path).events) == 3 and not read_log(path).warnings
    path = write_log(tmp_path / "log2.jsonl", EVENTS, extra_lines={3: '{"event": "tok'})
    with pytest.raises(EventLogError, match=r":4: malformed line"):
        read_log(path)


def test_another_schema_version_is_a_clear_error(tmp_path):
    newer = {**envelope("token_done", 2.5, token=1), "schema": 2}
    path = write_log(tmp_path / "log.jsonl", [*EVENTS, newer])
    with pytest.raises(EventLogError) as caught:
        read_log(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:4: ")
    assert "schema 2" in message and "schema 1" in message and "another mer version" in message


def test_empty_and_missing_files_are_errors_naming_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(EventLogError, match=f"{empty}: no events"):
        read_log(empty)
    with pytest.raises(EventLogError, match="missing.jsonl: cannot read the log"):
        read_log(tmp_path / "missing.jsonl")


# --- runs in a file ----------------------------------------------------------------------------------

def test_runs_are_split_by_run_id_and_supervisor_events_follow_their_pid(tmp_path):
    other = "ffff0000"
    events = [
        envelope("stale_runs_removed", 0.1, "supervisor", run_id=None, runs=[]),
        {**envelope("run_started_supervisor", 0.2, "supervisor", run_id=None), "run_id": RUN},
        envelope("token_done", 0.9, token=0),
        envelope("expert_read", 0.4, "io"),
        envelope("child_spawned", 0.3, "supervisor", run_id=None, child="mer-io"),
        {**envelope("run_started_supervisor", 5.0, "supervisor", run_id=None), "run_id": other},
        envelope("child_spawned", 5.1, "supervisor", run_id=None, child="mer-io"),
        envelope("token_done", 5.5, run_id=other, token=0),
    ]
    runs = split_runs(read_log(write_log(tmp_path / "log.jsonl", events)))
    assert [run.run_id for run in runs] == [RUN, other]
    first, second = runs
    assert [e["event"] for e in first.events] == ["stale_runs_removed", "run_started_supervisor", "child_spawned",
                                                  "expert_read", "token_done"]  # by t_mono
    assert first.line_numbers == [1, 2, 5, 4, 3]
    assert [e["event"] for e in second.events] == ["run_started_supervisor", "child_spawned", "token_done"]
    assert select_run(runs, other) is second
    with pytest.raises(EventLogError, match=f"holds 2 runs \\({RUN}, {other}\\): choose one with --run"):
        select_run(runs, None)
    with pytest.raises(EventLogError, match="no run 'deadbeef'"):
        select_run(runs, "deadbeef")


def test_equal_times_keep_file_order_and_orphans_join_the_only_run(tmp_path):
    events = [envelope("a", 1.0), envelope("b", 1.0, "io"), envelope("c", 0.5, "predictor"),
              {**envelope("orphan", 0.7, "supervisor", run_id=None), "pid": 4242}]
    (run,) = load_runs(str(write_log(tmp_path / "log.jsonl", events)))
    assert [e["event"] for e in run.events] == ["c", "orphan", "a", "b"]
    assert run.run_id == RUN and run.label == f"{tmp_path / 'log.jsonl'} (run {RUN})"
