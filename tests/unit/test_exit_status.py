"""`mer.cli.exit_status`: each kind of failure gives its one line and its exit status, in-process.

The end-to-end cases (real commands, disks, users, pipes, signals) are in tests/e2e/test_cli_errors.py;
these check the mapping itself, including what no command can be made to raise on purpose (a bug).
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import pytest

from mer.cli.exit_status import exit_status, sigterm_unwinds, stdout_is_closed
from mer.errors import ConfigError, StoreError, Terminated, UsageError

CASES = [
    (StoreError("s/manifest.json: malformed"), 1, "mer-pipeline x: error: s/manifest.json: malformed"),
    (ConfigError("a.toml: cache_slots = 0 is out of range"), 1, "mer-pipeline x: error: a.toml: cache_slots = 0 is out of range"),
    (UsageError("--policy: unknown cache policy 'fifo'"), 2, "mer-pipeline x: error: --policy: unknown cache policy 'fifo'"),
    (PermissionError(errno.EACCES, "Permission denied", "/s/m.json"), 1, "mer-pipeline x: error: /s/m.json: permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/d/out"), 1,
     "mer-pipeline x: error: /d/out: no space left on device (the disk is full)"),
    (FileNotFoundError(errno.ENOENT, "No such file", "/a", None, "/b"), 1, "mer-pipeline x: error: /a -> /b: no such file or directory"),
    (KeyboardInterrupt(), 130, "mer-pipeline x: interrupted"),
    (KeyboardInterrupt("SIGINT: graph shut down"), 130, "mer-pipeline x: SIGINT: graph shut down"),
    (Terminated(), 143, "mer-pipeline x: terminated (SIGTERM)"),
    (Terminated("SIGTERM: graph shut down"), 143, "mer-pipeline x: SIGTERM: graph shut down"),
    (ZeroDivisionError("division by zero"), 1,
     "mer-pipeline x: internal error: ZeroDivisionError: division by zero (MER_LOG_LEVEL=debug shows the traceback)"),
]


@pytest.mark.parametrize("error, status, line", CASES, ids=[type(case[0]).__name__ + str(i) for i, case in enumerate(CASES)])
def test_each_failure_is_one_line_and_its_status(error, status, line, capsys, monkeypatch):
    monkeypatch.delenv("MER_LOG_LEVEL", raising=False)
    assert exit_status("mer-pipeline x", error) == status
    captured = capsys.readouterr()
    assert captured.err == line + "\n"
    assert captured.out == ""


def test_debug_level_adds_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("MER_LOG_LEVEL", "debug")
    try:
        {}["missing"]
    except KeyError as error:
        assert exit_status("mer-pipeline x", error) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "mer-pipeline x: internal error: KeyError: 'missing'"
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "KeyError: 'missing'"


def test_a_broken_pipe_that_is_not_stdout_is_an_error(capsys, monkeypatch):
    """Only stdout's reader going away is the quiet 141; a broken pipe elsewhere is an ordinary error."""
    monkeypatch.delenv("MER_LOG_LEVEL", raising=False)
    assert not stdout_is_closed()
    assert exit_status("mer-pipeline x", BrokenPipeError(errno.EPIPE, "Broken pipe")) == 1
    assert capsys.readouterr().err == "mer-pipeline x: error: Broken pipe\n"


def test_a_closed_stdout_is_a_quiet_141(monkeypatch, capsys):
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert stdout_is_closed()
        assert exit_status("mer-pipeline x", BrokenPipeError(errno.EPIPE, "Broken pipe")) == 141
        stdout.write("after the pipe closed\n")
        stdout.flush()  # stdout now goes to /dev/null: the interpreter's last flush cannot fail again
    finally:
        stdout.close()
    assert capsys.readouterr().err == ""


def test_sigterm_unwinds_the_stack_while_inside():
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(Terminated):
        with sigterm_unwinds():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                signal.sigtimedwait([], 0.1)  # the handler runs at the next bytecode boundary
                for _ in range(1000):
                    pass
            finally:
                cleaned.append(True)
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == before  # restored on the way out
