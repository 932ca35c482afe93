"""Who is still in a run, and who removes its resources: the last member out.

Every process of a run (the supervisor and each child) holds a shared `flock` on the run's lock
file `<runtime dir>/members.lock` for as long as it lives. The kernel drops a process's lock when it
dies, however it dies (kill -9 and the OOM killer included), so the set of holders is always exactly
the set of live members. On its way out a member closes its shared lock and asks for an exclusive
one without blocking: that succeeds only when no other member holds the file, i.e. for the last
member out, which then removes the run's `/dev/shm/mer-<run>-*` files and runtime directory.

Races, and why they are harmless:
- two members leaving at once: whichever asks for the exclusive lock last sees no shared holder and
  cleans; a failed request holds nothing, so it cannot stop the other;
- a member asking after the cleaner removed everything finds no lock file (or, having opened it
  before the removal, a file that is no longer the one at the path: the inode check), and does
  nothing: nothing is removed twice, and removal ignores what is already gone;
- a child joining while the run is being removed gets no shared lock (or the inode check fails) and
  exits: a run being torn down takes no new members.
A cleaner killed half-way leaves the rest to the start-up backstop of the next run
(`mer.runtime.cleanup.remove_stale_runs`), which judges runs by their supervisor's liveness.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mer.runtime.cleanup import remove_run

LOCK_FILE_NAME = "members.lock"


class RunMembership:
    """This process's shared lock on a run's lock file (see the module docstring)."""

    def __init__(self, run_id: str, runtime_dir: Path, fd: int):
        self.run_id = run_id
        self.runtime_dir = runtime_dir
        self.fd: int | None = fd

    @classmethod
    def found(cls, run_id: str, runtime_dir: str | os.PathLike) -> "RunMembership":
        """Create the lock file in a new runtime directory and join (the supervisor, before any child)."""
        path = Path(runtime_dir) / LOCK_FILE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return cls(run_id, Path(runtime_dir), fd)

    @classmethod
    def join(cls, run_id: str, runtime_dir: str | os.PathLike) -> "RunMembership | None":
        """Join a running run (a child at start-up); None if the run is gone or being removed."""
        path = Path(runtime_dir) / LOCK_FILE_NAME
        fd = _lock_if_current(path, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None if fd is None else cls(run_id, Path(runtime_dir), fd)

    @property
    def lock_path(self) -> Path:
        return self.runtime_dir / LOCK_FILE_NAME

    def leave(self) -> list[Path]:
        """Drop this member's lock; if it was the last member, remove the run's resources and return
        the paths removed (else [])."""
        if self.fd is None:
            return []
        os.close(self.fd)
        self.fd = None
        fd = _lock_if_current(self.lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            return []
        try:
            return remove_run(self.run_id, runtime_bases=[self.runtime_dir.parent])
        finally:
            os.close(fd)


def _lock_if_current(path: Path, operation: int) -> int | None:
    """An fd of `path` locked with `operation`, provided the lock is granted at once and the file is
    still the one at `path` (not removed or replaced meanwhile); else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, operation)
        opened = os.fstat(fd)
        current = os.stat(path)
        if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return fd
