"""structlog configured once per process: JSON lines to the run's log file or stderr, with process identity bound.

Event names are stable snake_case (`expert_read`, `token_done`, `run_summary`, ...). Every process
of a run appends to the same log file (the merged log): `LogFile` opens it with O_APPEND and writes
each batch of lines with one unbuffered write, so lines of different processes never mix. While an
event loop runs `with_log_writes_in_background(...)` (every child and the supervisor do), a log call
only queues its line and an aiofiles task writes the queue, so a busy loop never waits on the disk;
elsewhere lines are written at once. The level is MER_LOG_LEVEL when set (mer.environment), else
the caller's, else info into a log file and warning on stderr.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import time
from pathlib import Path

import aiofiles.threadpool
import structlog

from mer.environment import read_environment
from mer.errors import ConfigError, describe_os_error

LOG_SCHEMA_VERSION = 1


def add_monotonic_time(logger, method_name, event_dict):
    """`t_mono`: CLOCK_MONOTONIC seconds, one clock for every process of the host, to order events."""
    event_dict["t_mono"] = time.monotonic()
    return event_dict


class LogFile:
    """structlog's output into the merged log file (see the module docstring)."""

    def __init__(self, path: str | Path):
        try:
            self.file = open(path, "ab", buffering=0)
        except OSError as error:
            raise ConfigError(f"cannot open the log file (--log-file): {describe_os_error(error, path)}") from None
        self.pending: list[bytes] = []
        self.wake: asyncio.Event | None = None  # set while a background writer runs
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        self.pending.append(message.encode() + b"\n")
        if self.wake is None:
            self.flush()
        else:
            self.wake.set()

    log = debug = info = warning = warn = error = err = critical = exception = fatal = failure = msg

    def flush(self) -> None:
        """Write the queued lines now (outside an event loop, and at exit)."""
        if self.pending and not self.file.closed:
            lines, self.pending = b"".join(self.pending), []
            self.file.write(lines)

    async def write_in_background(self, stopping: asyncio.Event) -> None:
        """Write queued lines through aiofiles' thread pool until `stopping` is set and the queue is empty."""
        async_file = aiofiles.threadpool.wrap(self.file)
        while not (stopping.is_set() and not self.pending):
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                lines, self.pending = b"".join(self.pending), []
                await async_file.write(lines)


_log_file: LogFile | None = None


def flush_log_file() -> None:
    """Write this process's queued log-file lines now (before an `os._exit`, which runs no atexit)."""
    if _log_file is not None:
        _log_file.flush()


def configure_logging(process: str, *, log_file: str | Path | None = None, level: str | None = None,
                      **bound) -> None:
    """Route this process's structlog events as JSON lines to `log_file` (appended) or stderr."""
    global _log_file
    if _log_file is not None:
        _log_file.flush()
        _log_file.file.close()
    _log_file = LogFile(log_file) if log_file else None
    level = read_environment().log_level or level or ("info" if log_file else "warning")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt=None, utc=True, key="ts"),
            add_monotonic_time,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=(lambda *args: _log_file) if _log_file else structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(process=process, pid=os.getpid(), schema=LOG_SCHEMA_VERSION, **bound)


async def with_log_writes_in_background(coroutine):
    """Await `coroutine` while this process's log-file lines are written by a background aiofiles task;
    the lines queued when it ends are written before this returns."""
    log_file = _log_file
    if log_file is None:
        return await coroutine
    stopping, log_file.wake = asyncio.Event(), asyncio.Event()
    writer = asyncio.create_task(log_file.write_in_background(stopping))
    try:
        return await coroutine
    finally:
        stopping.set()
        log_file.wake.set()
        try:
            await writer
        finally:
            log_file.wake = None
            log_file.flush()


def flush_log() -> None:
    """Write this process's queued log-file lines now, from any thread (before an `os._exit`)."""
    if _log_file is not None:
        _log_file.flush()


def get_logger(**initial):
    return structlog.get_logger(**initial)
