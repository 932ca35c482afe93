"""Logging: MER_LOG_LEVEL filters events; in an event loop the merged log is written off the loop, in order."""

from __future__ import annotations

import asyncio
import json

import pytest

from mer.logging_setup import configure_logging, get_logger, with_log_writes_in_background


@pytest.fixture
def log_path(tmp_path, monkeypatch):
    monkeypatch.delenv("MER_LOG_LEVEL", raising=False)
    yield tmp_path / "run.jsonl"
    configure_logging("pytest")  # back to stderr: the file is closed


def logged(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def log_each_level() -> None:
    log = get_logger()
    for level in ("debug", "info", "warning", "error"):
        getattr(log, level)(f"{level}_event")


def test_mer_log_level_sets_the_level_of_every_process(log_path, monkeypatch):
    configure_logging("test", log_file=log_path)  # unset: info into a log file
    log_each_level()
    assert [event["event"] for event in logged(log_path)] == ["info_event", "warning_event", "error_event"]
    log_path.unlink()
    monkeypatch.setenv("MER_LOG_LEVEL", "error")
    configure_logging("test", log_file=log_path, level="info")  # the variable wins over the caller's level
    log_each_level()
    assert [(event["event"], event["level"], event["process"]) for event in logged(log_path)] == [
        ("error_event", "error", "test")]
    log_path.unlink()
    monkeypatch.setenv("MER_LOG_LEVEL", "DEBUG")
    configure_logging("test", log_file=log_path)
    log_each_level()
    assert [event["event"] for event in logged(log_path)] == ["debug_event", "info_event", "warning_event",
                                                             "error_event"]


def test_in_an_event_loop_log_lines_are_queued_and_written_by_a_background_task_in_order(log_path):
    configure_logging("test", log_file=log_path)
    log = get_logger()

    async def busy_loop() -> int:
        for index in range(200):
            log.info("step", index=index)
        written_while_logging = len(log_path.read_bytes())  # the loop never waited on the file
        await asyncio.sleep(0.01)
        log.info("last")
        return written_while_logging

    log.info("before")  # no loop: written at once
    assert [event["event"] for event in logged(log_path)] == ["before"]
    written = asyncio.run(with_log_writes_in_background(busy_loop()))
    assert written == len(log_path.read_text().splitlines()[0]) + 1  # only the line from before the loop
    events = logged(log_path)  # every queued line is written when the loop's coroutine ends
    assert [event.get("index") for event in events[1:-1]] == list(range(200))
    assert (events[0]["event"], events[-1]["event"]) == ("before", "last")
    log.info("after")
    assert logged(log_path)[-1]["event"] == "after"
