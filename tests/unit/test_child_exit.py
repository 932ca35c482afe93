"""A graph child ends with `exit_without_teardown(code)`: `os._exit` with its code, after writing the log
lines still queued for the background writer and flushing its buffered standard streams."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_the_exit_code_the_queued_log_lines_and_buffered_output_all_survive(tmp_path):
    log = tmp_path / "run.jsonl"
    code = textwrap.dedent(f"""
        import asyncio, sys
        from mer import logging_setup
        from mer.logging_setup import configure_logging, get_logger
        from mer.runtime.child import exit_without_teardown

        configure_logging("mer-test-child", log_file={str(log)!r})
        logging_setup._log_file.wake = asyncio.Event()  # as while the background writer runs: lines queue up
        for index in range(3):
            get_logger().info("queued_event", index=index)
        assert len(logging_setup._log_file.pending) == 3
        sys.stdout.write("buffered, no newline")
        exit_without_teardown(7)
        print("never reached")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 7, done.stderr
    assert done.stdout == "buffered, no newline"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(event["event"], event["index"]) for event in events] == [("queued_event", index) for index in range(3)]
