"""How a command ends: the one place that maps what went wrong to one line on stderr and an exit status.

| what ended the command                        | exit | stderr                                      |
|-----------------------------------------------|------|---------------------------------------------|
| success                                       | 0    | (the command's own output)                  |
| a MerError, an OSError (disk full, permission)| 1    | `mer-pipeline CMD: error: <what, naming it>` |
| a bad flag value or combination (UsageError)  | 2    | `mer-pipeline CMD: error: ...` (argparse's too) |
| SIGINT (Ctrl-C)                               | 130  | `mer-pipeline CMD: SIGINT: ...` or `interrupted` |
| SIGTERM                                       | 143  | `mer-pipeline CMD: SIGTERM: ...` or `terminated` |
| stdout closed by its reader (`| head`)        | 141  | nothing                                     |
| a bug (any other exception)                   | 1    | `mer-pipeline CMD: internal error: ...`     |

128 + the signal number is the shell's convention for a process ended by a signal: 141 is what a
command killed by SIGPIPE reports (Python ignores SIGPIPE, so it sees BrokenPipeError instead), so a
script with `set -o pipefail` can still tell that the output was cut short, as with any C tool.
No traceback is printed unless `MER_LOG_LEVEL=debug` (then after the line).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from mer.errors import MerError, Terminated, UsageError, describe_os_error

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGPIPE = 128 + signal.SIGPIPE  # 141
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


def exit_status(prefix: str, error: BaseException) -> int:
    """Print the one line for `error` (prefix: `mer-pipeline CMD`) and return the exit status."""
    if isinstance(error, BrokenPipeError) and stdout_is_closed():
        silence_stdout()
        return EXIT_SIGPIPE
    if isinstance(error, KeyboardInterrupt):
        return _say(f"{prefix}: {str(error) or 'interrupted'}", EXIT_SIGINT)
    if isinstance(error, Terminated):
        return _say(f"{prefix}: {str(error) or 'terminated (SIGTERM)'}", EXIT_SIGTERM)
    if isinstance(error, UsageError):
        return _say(f"{prefix}: error: {error}", EXIT_USAGE)
    if isinstance(error, MerError):
        return _say(f"{prefix}: error: {error}", EXIT_ERROR, error)
    if isinstance(error, OSError):
        return _say(f"{prefix}: error: {describe_os_error(error)}", EXIT_ERROR, error)
    if isinstance(error, UnicodeError):
        return _say(f"{prefix}: error: text that is not valid UTF-8: {error}", EXIT_ERROR, error)
    hint = "" if debugging() else " (MER_LOG_LEVEL=debug shows the traceback)"
    return _say(f"{prefix}: internal error: {type(error).__name__}: {error}{hint}", EXIT_ERROR, error)


def debugging() -> bool:
    """Whether tracebacks are wanted: `MER_LOG_LEVEL=debug` (read directly: this runs when reading the
    environment itself may have failed)."""
    return os.environ.get("MER_LOG_LEVEL", "").strip().lower() == "debug"


def _say(line: str, status: int, error: BaseException | None = None) -> int:
    try:
        print(line.replace("\n", " "), file=sys.stderr, flush=True)
        if error is not None and debugging():
            traceback.print_exception(error, file=sys.stderr)
    except (BrokenPipeError, ValueError):  # stderr is closed too: the status is all that is left
        pass
    return status


def stdout_is_closed() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _raise_terminated(signal_number: int, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While inside: SIGTERM raises Terminated (so the stack unwinds and cleans up, then exit 143)
    instead of killing the process on the spot. The process graph installs its own handler while it
    runs (`mer.cli.pipeline_job`), which shuts the graph down first."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
