"""Environment variables: every one mer reads is read here, by `read_environment`.

mer's own variables share the `MER_` prefix:

- `MER_CACHE_DIR`: where generated data lives (the embedded demo store, ...); default
  `$XDG_CACHE_HOME/mer`, else `~/.cache/mer`.
- `MER_RUNTIME_DIR`: parent of the per-run runtime directories (ipc sockets, pid records); default
  `$XDG_RUNTIME_DIR`, else `/tmp`.
- `MER_LOG_LEVEL`: the structlog level of every process (debug, info, warning, error, critical);
  unset: info into a run's log file, warning on stderr (`mer.logging_setup`). `debug` also makes a
  failing command print its traceback after the one-line error (`mer.cli.exit_status`).
- `MER_READ_FAULTS`: injected read faults, for testing the I/O worker's retries
  (`mer.io.reader_base`): `ID:COUNT[,ID:COUNT...]` makes the first COUNT reads of expert ID (its
  global id in the store) fail with EIO as a failing disk would; an entry `hang:ID[:COUNT[:SECONDS]]` makes
  the first COUNT (default 1) reads of expert ID hang instead, as on a device that does not answer
  (for the read deadline, `read_deadline_s`): never completed, or with SECONDS handed to the kernel
  only that long after they were started (a device that answers late); unset: none.
- `MER_WORK_FAULTS`: injected faults of the workers, for testing the router's job deadlines
  (`mer.router.work_deadlines`): `spin:WORKER:JOB` makes the first process of compute worker WORKER
  (a number) spin forever in its JOB-th job, or with WORKER `io` the first I/O worker in its JOB-th
  `Acquire` (1-based: a busy loop that uses CPU and reports no progress, as a bug would);
  `slow:SECONDS` makes every item of every compute job take SECONDS longer, busy on the CPU
  (legitimate long work that reports its progress between items). Comma-separated; unset: none.

The XDG base-directory variables are read here too, as the defaults above (relative XDG paths are
ignored, as the XDG specification asks; a relative `MER_*` path is an error). Any other `MER_*`
variable is reported in `Environment.unknown_variables` (a likely typo) for the caller to log.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mer.errors import ConfigError

PREFIX = "MER_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
KNOWN_VARIABLES = ("MER_CACHE_DIR", "MER_RUNTIME_DIR", "MER_LOG_LEVEL", "MER_READ_FAULTS", "MER_WORK_FAULTS")


@dataclass(frozen=True)
class Environment:
    """What the environment tells mer; see the module docstring for each variable."""

    cache_dir: Path
    runtime_base_dir: Path
    log_level: str | None  # None: unset
    unknown_variables: tuple[str, ...] = ()
    read_faults: tuple[tuple[int, int], ...] = ()  # (expert id, reads that fail)
    work_faults: "WorkFaults | None" = None  # None: none injected
    read_hangs: tuple[tuple[int, int, float], ...] = ()  # (expert id, reads that hang, seconds: inf for ever)


@dataclass(frozen=True)
class WorkFaults:
    """`MER_WORK_FAULTS`: `spin` (worker: a compute worker's number, `io` or `predictor`; 1-based number of
    its job, `Acquire` or routing observation) spins forever in that one of that worker's first process;
    `slow_item_s` is added, busy, to every item of every compute job, and `slow_row_s` per row to every
    chunk of an item's rows (a slow kernel)."""

    spin: tuple[str, int] | None = None
    slow_item_s: float = 0.0
    slow_row_s: float = 0.0

    def spins_in(self, worker: str, job: int, incarnation: int) -> bool:
        """Whether the `job`-th job (1-based) of `worker`'s process `incarnation` is to spin forever."""
        return self.spin == (worker, job) and incarnation == 0


def _first_path(environ: Mapping[str, str], names: tuple[str, ...], default: Path) -> Path:
    """The path in the first of `names` that is set and non-empty, else `default`."""
    for name in names:
        value = environ.get(name)
        if value:
            path = Path(value).expanduser()
            if path.is_absolute():
                return path
            if name.startswith(PREFIX):  # relative XDG paths are ignored, as the XDG spec says
                raise ConfigError(f"environment variable {name}={value!r} must be an absolute path")
    return default


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """Read every variable mer uses from `environ` (the process environment by default)."""
    environ = os.environ if environ is None else environ
    cache_base = _first_path(environ, ("XDG_CACHE_HOME",), Path.home() / ".cache")
    cache_dir = _first_path(environ, ("MER_CACHE_DIR",), cache_base / "mer")
    runtime_base_dir = _first_path(environ, ("MER_RUNTIME_DIR", "XDG_RUNTIME_DIR"), Path("/tmp"))
    log_level = environ.get("MER_LOG_LEVEL", "").strip().lower() or None
    if log_level is not None and log_level not in LOG_LEVELS:
        raise ConfigError(f"environment variable MER_LOG_LEVEL={log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    unknown = tuple(sorted(name for name in environ if name.startswith(PREFIX) and name not in KNOWN_VARIABLES))
    read_faults, read_hangs = _read_faults(environ.get("MER_READ_FAULTS", ""))
    work_faults = _work_faults(environ.get("MER_WORK_FAULTS", ""))
    return Environment(cache_dir, runtime_base_dir, log_level, unknown, read_faults, work_faults, read_hangs)


def _work_faults(text: str) -> WorkFaults | None:
    """`spin:WORKER:JOB`, `slow:SECONDS` and `slow_row:SECONDS` entries; a malformed entry is a ConfigError
    naming it."""
    spin, slow_item_s, slow_row_s = None, 0.0, 0.0
    for entry in filter(None, (part.strip() for part in text.split(","))):
        kind, _, value = entry.partition(":")
        worker, _, job = value.partition(":")
        if (kind == "spin" and (worker.isdigit() or worker in ("io", "predictor")) and job.isdigit()
                and int(job) >= 1):
            spin = (worker, int(job))
        elif kind == "slow" and _is_seconds(value):
            slow_item_s = float(value)
        elif kind == "slow_row" and _is_seconds(value):
            slow_row_s = float(value)
        else:
            raise ConfigError(f"environment variable MER_WORK_FAULTS: entry {entry!r} is neither spin:WORKER:JOB "
                              "(a compute worker's number, io or predictor, and a job number >= 1) nor slow:SECONDS "
                              "or slow_row:SECONDS (>= 0)")
    if spin is None and slow_item_s == 0.0 and slow_row_s == 0.0:
        return None
    return WorkFaults(spin, slow_item_s, slow_row_s)


def _is_seconds(text: str) -> bool:
    try:
        return 0.0 <= float(text) < float("inf")
    except ValueError:
        return False


def _read_faults(text: str) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int, float], ...]]:
    """`ID:COUNT` (EIO) entries as (expert id, count) pairs and `hang:ID[:COUNT[:SECONDS]]` entries as
    (expert id, count, seconds or inf); a malformed entry is a ConfigError naming it."""
    faults, hangs = [], []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        is_hang = entry.startswith("hang:")
        expert, _, rest = entry.removeprefix("hang:").partition(":")
        count, _, seconds = rest.partition(":") if is_hang else (rest, "", "")
        count = count or ("1" if is_hang else "")
        if not (expert.isdigit() and count.isdigit() and (not seconds or _is_seconds(seconds))):
            raise ConfigError(f"environment variable MER_READ_FAULTS: entry {entry!r} is not EXPERT_ID:COUNT "
                              "nor hang:EXPERT_ID[:COUNT[:SECONDS]] (non-negative numbers)")
        if is_hang:
            hangs.append((int(expert), int(count), float(seconds) if seconds else math.inf))
        else:
            faults.append((int(expert), int(count)))
    return tuple(faults), tuple(hangs)
