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
  global id in the store) fail with EIO as a failing disk would; unset: none.

The XDG base-directory variables are read here too, as the defaults above (relative XDG paths are
ignored, as the XDG specification asks; a relative `MER_*` path is an error). Any other `MER_*`
variable is reported in `Environment.unknown_variables` (a likely typo) for the caller to log.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mer.errors import ConfigError

PREFIX = "MER_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
KNOWN_VARIABLES = ("MER_CACHE_DIR", "MER_RUNTIME_DIR", "MER_LOG_LEVEL", "MER_READ_FAULTS")


@dataclass(frozen=True)
class Environment:
    """What the environment tells mer; see the module docstring for each variable."""

    cache_dir: Path
    runtime_base_dir: Path
    log_level: str | None  # None: unset
    unknown_variables: tuple[str, ...] = ()
    read_faults: tuple[tuple[int, int], ...] = ()  # (expert id, reads that fail)


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
    read_faults = _read_faults(environ.get("MER_READ_FAULTS", ""))
    return Environment(cache_dir, runtime_base_dir, log_level, unknown, read_faults)


def _read_faults(text: str) -> tuple[tuple[int, int], ...]:
    """`ID:COUNT,...` as (expert id, count) pairs; a malformed entry is a ConfigError naming it."""
    faults = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        expert, _, count = entry.partition(":")
        if not (expert.isdigit() and count.isdigit()):
            raise ConfigError(f"environment variable MER_READ_FAULTS: entry {entry!r} is not EXPERT_ID:COUNT "
                              "(two non-negative integers)")
        faults.append((int(expert), int(count)))
    return tuple(faults)
