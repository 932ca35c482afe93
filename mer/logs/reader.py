"""Reading a run's JSON-lines log: one structlog event per line, written by every process of a run.

`read_log(path)` parses every line and checks the envelope every event carries (docs/events.md):
a JSON object with `event` (a string), `schema` and `t_mono` (a number). It is tolerant of what
an interrupted run leaves behind and strict about everything else:

- a last line without its newline that does not parse (the writer died mid-line) is dropped with a
  warning;
- a malformed line anywhere else (not JSON, not an object, an envelope field missing) is an
  `EventLogError` naming every bad line as `FILE:LINE: reason`, unless `skip_malformed`, which
  turns each into a warning and skips the line;
- an event of another schema version is an `EventLogError` at once, naming file, line and both
  versions: fields may mean something else there, so nothing is guessed;
- blank lines are ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mer.errors import EventLogError
from mer.logging_setup import LOG_SCHEMA_VERSION

MAX_LINES_IN_ERROR = 10


@dataclass(frozen=True)
class LogIssue:
    """Something wrong with one line of a log file (line numbers are 1-based)."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class LogFile:
    """The events of one log file in file order, with the line each came from and the warnings."""

    path: str
    events: list[dict[str, Any]] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)
    warnings: list[LogIssue] = field(default_factory=list)


class MalformedLine(ValueError):
    """A line that is not a well-formed event (the message says why)."""


def parse_event_line(text: str) -> dict[str, Any]:
    """The event of one log line; raises `MalformedLine` saying what is wrong with it."""
    try:
        event = json.loads(text)
    except json.JSONDecodeError as error:
        raise MalformedLine(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(event, dict):
        raise MalformedLine(f"not a JSON object but a {type(event).__name__}")
    if not isinstance(event.get("event"), str):
        raise MalformedLine("no 'event' name (a string)")
    if "schema" not in event:
        raise MalformedLine(f"event {event['event']!r} has no 'schema' field")
    t_mono = event.get("t_mono")
    if isinstance(t_mono, bool) or not isinstance(t_mono, (int, float)) or not math.isfinite(t_mono):
        raise MalformedLine(f"event {event['event']!r} has no finite 't_mono' (monotonic seconds)")
    return event


def check_schema(event: dict[str, Any], path: str, line: int) -> None:
    """Raise `EventLogError` for an event of another log schema version."""
    schema = event["schema"]
    if schema != LOG_SCHEMA_VERSION:
        raise EventLogError(
            f"{path}:{line}: event {event['event']!r} is log schema {schema!r}; this mer reads schema "
            f"{LOG_SCHEMA_VERSION} only (the log was written by another mer version; read it with that version)"
        )


def read_log(path: str | Path, *, skip_malformed: bool = False) -> LogFile:
    """Parse a JSON-lines log (see the module docstring for what is tolerated and what is an error)."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise EventLogError(f"{name}: cannot read the log: {error.strerror or error}") from None
    log = LogFile(name)
    malformed: list[LogIssue] = []
    lines = raw.split(b"\n")
    ends_with_newline = lines[-1] == b""
    if ends_with_newline:
        lines.pop()
    for index, raw_line in enumerate(lines):
        number = index + 1
        if not raw_line.strip():
            continue
        try:
            event = parse_event_line(raw_line.decode("utf-8"))
        except (MalformedLine, UnicodeDecodeError) as error:
            reason = str(error) if isinstance(error, MalformedLine) else "not UTF-8 text"
            if number == len(lines) and not ends_with_newline:
                log.warnings.append(LogIssue(name, number, f"partial last line dropped ({reason}): "
                                                           "the run was interrupted while writing it"))
            else:
                malformed.append(LogIssue(name, number, f"malformed line: {reason}"))
            continue
        check_schema(event, name, number)
        log.events.append(event)
        log.line_numbers.append(number)
    _report_malformed(log, malformed, skip_malformed)
    if not log.events:
        raise EventLogError(f"{name}: no events in the log")
    return log


def _report_malformed(log: LogFile, malformed: list[LogIssue], skip_malformed: bool) -> None:
    if not malformed:
        return
    if skip_malformed:
        log.warnings.extend(LogIssue(issue.path, issue.line, issue.message + " (skipped)") for issue in malformed)
        return
    shown = "\n".join(f"  {issue}" for issue in malformed[:MAX_LINES_IN_ERROR])
    more = len(malformed) - MAX_LINES_IN_ERROR
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise EventLogError(
        f"{log.path}: {len(malformed)} malformed line(s) (use --skip-malformed to skip them):\n{shown}{tail}"
    )
