"""Progress of long commands on stderr: a rich bar in a terminal, plain lines otherwise.

    with ProgressDisplay("synth") as display:
        advance = display.start_phase("writing", total_bytes)
        advance(nbytes)  # as work gets done

In a terminal each phase is a rich progress bar (bytes, speed, time left). When stderr is not a
terminal (a log file, a test), a phase prints one plain line every `interval_s` seconds (and
one at its end if it printed any, so short phases stay silent); `enabled=False` prints nothing. stdout is never touched.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)


def human_bytes(count: float) -> str:
    """`1234567` -> `1.2 MB` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


class _PlainPhase:
    """One phase printed as `command: description 1.2/3.4 GB (35%), 1.1 GB/s` lines."""

    def __init__(self, stream: IO[str], label: str, total: int, interval_s: float):
        self.stream, self.label, self.total, self.interval_s = stream, label, total, interval_s
        self.done = 0
        self.started = self.last_print = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        # a phase that printed progress also prints its end
        if now - self.last_print >= self.interval_s or (self.done >= self.total and self.last_print > self.started):
            self.print_line(now)

    def print_line(self, now: float) -> None:
        self.last_print = now
        speed = self.done / max(now - self.started, 1e-9)
        percent = 100.0 * self.done / self.total if self.total else 100.0
        print(f"{self.label} {human_bytes(self.done)} of {human_bytes(self.total)} ({percent:.0f}%), "
              f"{human_bytes(speed)}/s", file=self.stream, flush=True)


class ProgressDisplay:
    """Byte-count progress phases of one command (a context manager)."""

    def __init__(self, command: str, *, stream: IO[str] | None = None, enabled: bool = True,
                 interval_s: float = 5.0):
        self.command = command
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interval_s = interval_s
        self.is_terminal = enabled and self.stream.isatty()
        self._rich: Progress | None = None

    def __enter__(self) -> "ProgressDisplay":
        if self.is_terminal:
            self._rich = Progress(
                TextColumn(f"{self.command}: {{task.description}}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._rich.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def start_phase(self, description: str, total: int) -> Callable[[int], None]:
        """Begin a phase of `total` bytes; returns `advance(nbytes)`."""
        if self._rich is not None:
            task = self._rich.add_task(description, total=total)
            rich = self._rich
            return lambda nbytes: rich.advance(task, nbytes)
        if not self.enabled:
            return lambda nbytes: None
        return _PlainPhase(self.stream, f"{self.command}: {description}", total, self.interval_s).advance
