"""Names on the machine for one run: run id, private runtime directory, ipc endpoints, arena, process names.

Every name carries `mer-` and the run id (8 lowercase hex characters), so that leaks can be found
by name and stale runs removed (`mer.runtime.cleanup`):

    runtime directory   <base>/mer-<run> (mode 0700); base: $MER_RUNTIME_DIR, else $XDG_RUNTIME_DIR,
                        else /tmp (read by `mer.environment`)
    supervisor record   <runtime directory>/supervisor.pid: "<pid> <start time in clock ticks>"
    ipc endpoint        ipc://<runtime directory>/<name>.sock
    slot arena          /dev/shm/mer-<run>-arena
    process name        mer-io-<run>, mer-compute-3-<run>, ...
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from mer.environment import read_environment
from mer.errors import ConfigError, RuntimeDirError
from mer.runtime.liveness import process_start_time

NAME_PREFIX = "mer"
SHM_DIR = Path("/dev/shm")
SUPERVISOR_RECORD_NAME = "supervisor.pid"
RUNTIME_DIR_ENV = "MER_RUNTIME_DIR"
RUN_ID_PATTERN = re.compile(r"[0-9a-f]{8}")
_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")
MAX_IPC_PATH_BYTES = 107  # sockaddr_un.sun_path holds 108 bytes including the terminating NUL


@dataclass(frozen=True)
class SupervisorRecord:
    """The supervisor of a run: its pid and start time (None when it could not be read)."""

    pid: int
    start_time: int | None


def new_run_id() -> str:
    """A fresh random run id: 8 lowercase hex characters."""
    return secrets.token_hex(4)


def check_run_id(run_id: str) -> str:
    """Return `run_id` if it is 8 lowercase hex characters, else raise ConfigError."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise ConfigError(f"run id must be 8 lowercase hex characters, got {run_id!r}")
    return run_id


def runtime_base_dir() -> Path:
    """Where runtime directories live: $MER_RUNTIME_DIR, else $XDG_RUNTIME_DIR, else /tmp (`mer.environment`)."""
    return read_environment().runtime_base_dir


def runtime_dir(run_id: str) -> Path:
    """The runtime directory of `run_id` (not created here: see `create_runtime_dir`)."""
    return runtime_base_dir() / f"{NAME_PREFIX}-{check_run_id(run_id)}"


def create_runtime_dir(run_id: str, supervisor_pid: int | None = None) -> Path:
    """Create the run's directory with mode 0700 and record its supervisor (this process by default)."""
    path = runtime_dir(run_id)
    if not path.parent.is_dir():
        raise RuntimeDirError(f"runtime base directory {path.parent} does not exist (set {RUNTIME_DIR_ENV})")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise RuntimeDirError(f"runtime directory {path} already exists (a run id used twice?)") from None
    try:
        os.chmod(path, 0o700)  # the umask can only have removed bits; make the mode exact
        write_supervisor_record(path, supervisor_pid if supervisor_pid is not None else os.getpid())
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def remove_runtime_dir(run_id: str) -> None:
    """Remove the run's directory and everything in it (sockets, supervisor record); missing is fine."""
    shutil.rmtree(runtime_dir(run_id), ignore_errors=True)


def write_supervisor_record(directory: Path, pid: int) -> None:
    """Record `pid` and its start time in `directory`/supervisor.pid (written atomically)."""
    start_time = process_start_time(pid)
    temporary = directory / f".{SUPERVISOR_RECORD_NAME}.tmp"
    temporary.write_text(f"{pid} {start_time if start_time is not None else '-'}\n")
    os.replace(temporary, directory / SUPERVISOR_RECORD_NAME)


def read_supervisor_record(directory: Path) -> SupervisorRecord | None:
    """The supervisor recorded in `directory`, or None if there is no readable record."""
    try:
        fields = (directory / SUPERVISOR_RECORD_NAME).read_text().split()
        pid = int(fields[0])
        start_time = None if fields[1] == "-" else int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    return SupervisorRecord(pid, start_time)


def endpoint(run_id: str, name: str) -> str:
    """The ipc endpoint `ipc://<runtime dir>/<name>.sock`; raises ConfigError if the path is too long."""
    if not _NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"endpoint name must be lowercase letters, digits, '-' or '_', got {name!r}")
    path = str(runtime_dir(run_id) / f"{name}.sock")
    if len(path.encode()) > MAX_IPC_PATH_BYTES:
        raise ConfigError(
            f"ipc path {path} is {len(path.encode())} bytes, over the {MAX_IPC_PATH_BYTES} a unix socket allows; "
            f"set {RUNTIME_DIR_ENV} to a shorter directory"
        )
    return f"ipc://{path}"


def shm_prefix(run_id: str) -> str:
    """The file name prefix of every /dev/shm file of the run: `mer-<run>-`."""
    return f"{NAME_PREFIX}-{check_run_id(run_id)}-"


def arena_path(run_id: str) -> Path:
    """The slot arena of the run: /dev/shm/mer-<run>-arena."""
    return SHM_DIR / f"{shm_prefix(run_id)}arena"


def process_name(role: str, run_id: str, index: int | None = None) -> str:
    """`mer-<role>-<run>` or, with an index, `mer-<role>-<index>-<run>` (e.g. mer-compute-3-0a1b2c3d)."""
    if not _NAME_PATTERN.fullmatch(role):
        raise ConfigError(f"process role must be lowercase letters, digits, '-' or '_', got {role!r}")
    middle = role if index is None else f"{role}-{index}"
    return f"{NAME_PREFIX}-{middle}-{check_run_id(run_id)}"
