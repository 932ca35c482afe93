"""Remove what dead runs left behind: `/dev/shm/mer-<run>-*` files and `mer-<run>` runtime directories.

A run is judged by its supervisor: the record in its runtime directory (pid and start time), else
the pid in its arena header. A run whose supervisor is alive is never touched; one whose
supervisor is dead (or whose pid now belongs to a process started at another time) is removed.
A run with no readable pid (a start-up in progress, or a crash in the middle of one) is removed
only when all its files are older than `min_age_s`.

The supervisor calls `remove_stale_runs()` at start-up and `remove_run(run_id)` for its own run at
shutdown.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mer.errors import ArenaError
from mer.logging_setup import get_logger
from mer.runtime.liveness import is_process_alive
from mer.runtime.paths import (
    NAME_PREFIX,
    SHM_DIR,
    SupervisorRecord,
    check_run_id,
    read_supervisor_record,
    runtime_base_dir,
    shm_prefix,
)
from mer.shm.layout import read_arena_header

_SHM_NAME = re.compile(rf"{NAME_PREFIX}-([0-9a-f]{{8}})-.+")
_RUNTIME_DIR_NAME = re.compile(rf"{NAME_PREFIX}-([0-9a-f]{{8}})")
DEFAULT_MIN_AGE_S = 60.0


@dataclass(frozen=True)
class CleanupReport:
    """What `remove_stale_runs` removed, and which runs it left alone because their supervisor lives."""

    removed_runs: tuple[str, ...]
    removed_paths: tuple[Path, ...]
    live_runs: tuple[str, ...]


@dataclass
class _RunArtifacts:
    shm_files: list[Path] = field(default_factory=list)
    runtime_dirs: list[Path] = field(default_factory=list)

    def all_paths(self) -> list[Path]:
        return self.shm_files + self.runtime_dirs


def remove_stale_runs(*, shm_dir: Path = SHM_DIR, runtime_bases: list[Path] | None = None,
                      min_age_s: float = DEFAULT_MIN_AGE_S) -> CleanupReport:
    """Remove shm files and runtime directories of runs whose supervisor is dead (see the module docstring).

    `runtime_bases` defaults to the current runtime base directory and /tmp.
    """
    bases = runtime_bases if runtime_bases is not None else _default_runtime_bases()
    removed_runs, removed_paths, live_runs = [], [], []
    for run_id, artifacts in sorted(_find_runs(shm_dir, bases).items()):
        if _is_run_stale(run_id, artifacts, shm_dir, min_age_s):
            removed_paths += _remove_paths(artifacts.all_paths())
            removed_runs.append(run_id)
        else:
            live_runs.append(run_id)
    if removed_runs:
        get_logger().info("stale_runs_removed", runs=removed_runs, paths=[str(path) for path in removed_paths])
    return CleanupReport(tuple(removed_runs), tuple(removed_paths), tuple(live_runs))


def remove_run(run_id: str, *, shm_dir: Path = SHM_DIR, runtime_bases: list[Path] | None = None) -> list[Path]:
    """Remove every shm file and runtime directory of `run_id`, alive or not (the supervisor's own clean-up)."""
    check_run_id(run_id)
    bases = runtime_bases if runtime_bases is not None else _default_runtime_bases()
    artifacts = _find_runs(shm_dir, bases).get(run_id, _RunArtifacts())
    return _remove_paths(artifacts.all_paths())


def _default_runtime_bases() -> list[Path]:
    return list(dict.fromkeys([runtime_base_dir(), Path("/tmp")]))


def _find_runs(shm_dir: Path, runtime_bases: list[Path]) -> dict[str, _RunArtifacts]:
    runs: dict[str, _RunArtifacts] = defaultdict(_RunArtifacts)
    for entry in scan_directory(shm_dir):
        match = _SHM_NAME.fullmatch(entry.name)
        if match and not entry.is_dir(follow_symlinks=False):
            runs[match.group(1)].shm_files.append(Path(entry.path))
    for base in runtime_bases:
        for entry in scan_directory(base):
            match = _RUNTIME_DIR_NAME.fullmatch(entry.name)
            if match and entry.is_dir(follow_symlinks=False) and is_own_entry(entry):
                runs[match.group(1)].runtime_dirs.append(Path(entry.path))
    return runs


def is_own_entry(entry: os.DirEntry) -> bool:
    """Whether the directory entry belongs to this user (False once it is gone)."""
    try:
        return entry.stat(follow_symlinks=False).st_uid == os.getuid()
    except FileNotFoundError:
        return False


def scan_directory(directory: Path) -> list[os.DirEntry]:
    """The entries of `directory`; none if it is missing or unreadable."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _is_run_stale(run_id: str, artifacts: _RunArtifacts, shm_dir: Path, min_age_s: float) -> bool:
    record = _supervisor_of(run_id, artifacts, shm_dir)
    if record is not None:
        return not is_process_alive(record.pid, record.start_time)
    return _age_s(artifacts.all_paths()) > min_age_s


def _supervisor_of(run_id: str, artifacts: _RunArtifacts, shm_dir: Path) -> SupervisorRecord | None:
    for directory in artifacts.runtime_dirs:
        record = read_supervisor_record(directory)
        if record is not None:
            return record
    arena = shm_dir / f"{shm_prefix(run_id)}arena"
    if arena in artifacts.shm_files:
        try:
            return SupervisorRecord(read_arena_header(arena).supervisor_pid, None)
        except (ArenaError, OSError):
            return None
    return None


def _age_s(paths: list[Path]) -> float:
    """Seconds since the newest modification among `paths` (0 if none can be read)."""
    newest = 0.0
    for path in paths:
        try:
            newest = max(newest, os.lstat(path).st_mtime)
        except FileNotFoundError:
            continue
    return time.time() - newest if newest else 0.0


def _remove_paths(paths: list[Path]) -> list[Path]:
    removed = []
    for path in paths:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed
