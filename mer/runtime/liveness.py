"""Is a recorded process still alive? A pid plus its start time, so that a reused pid is not mistaken for it."""

from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc")
# Fields of /proc/<pid>/stat after the ")" that closes the command name (field 2): state is field 3,
# starttime (clock ticks since boot) is field 22.
_STATE_INDEX = 0
_START_TIME_INDEX = 22 - 3


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rfind(")") + 1 :].split()


def process_start_time(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot, or None if there is no such process."""
    if pid <= 0:
        return None
    fields = _stat_fields(pid)
    return int(fields[_START_TIME_INDEX]) if fields else None


def is_process_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, when `start_time` is given, is the process that started then."""
    if pid <= 0:
        return False
    if not _PROC.is_dir():
        return _signal_zero_succeeds(pid)
    fields = _stat_fields(pid)
    if fields is None or fields[_STATE_INDEX] in ("Z", "X"):
        return False
    return start_time is None or int(fields[_START_TIME_INDEX]) == start_time


def _signal_zero_succeeds(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # refused: the process exists
    return True
