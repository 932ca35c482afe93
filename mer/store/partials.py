"""The hidden directories stores are written into, and the reclaiming of those that dead writers left.

`StoreWriter` writes a store `NAME` into `.NAME.partial-PID-START` next to it (PID and START: the
writer's pid and its start time in clock ticks since boot, from /proc/PID/stat) and renames it
into place when whole. A writer killed with SIGKILL (or by the OOM killer) cannot remove it: a
full-size directory is left. Every later writer into the same parent directory (`convert`, `synth`,
the cached conversion of `generate --model`) first reclaims the partial directories whose writer is
dead: the pid is gone, or now belongs to a process started at another time (a reused pid). A
directory in the older `.NAME.partial-PID` form is reclaimed only when its pid is gone, since a
live pid cannot be told apart from a reuse without the start time.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from mer.logging_setup import get_logger
from mer.runtime.cleanup import is_own_entry, scan_directory
from mer.runtime.liveness import is_process_alive, process_start_time

_PARTIAL_NAME = re.compile(r"\..+\.partial-(\d+)(?:-(\d+))?")


def partial_dir(out: Path) -> Path:
    """The hidden directory this process writes the store `out` into."""
    pid = os.getpid()
    return out.parent / f".{out.name}.partial-{pid}-{process_start_time(pid)}"


def reclaim_dead_partials(directory: Path) -> list[tuple[Path, int]]:
    """Remove the partial store directories in `directory` whose writer is dead; (path, bytes) of each,
    each also logged as `partial_store_reclaimed`."""
    reclaimed = []
    for entry in scan_directory(directory):
        match = _PARTIAL_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False) or not is_own_entry(entry):
            continue
        pid, start_time = int(match.group(1)), match.group(2)
        if is_process_alive(pid, None if start_time is None else int(start_time)):
            continue
        path = Path(entry.path)
        nbytes = _allocated_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            continue  # removed by another writer meanwhile, or not removable: not ours to report
        get_logger().warning("partial_store_reclaimed", path=str(path), bytes=nbytes, writer_pid=pid,
                             message=f"removed {path} ({nbytes / 2**20:,.1f} MiB) left by dead process {pid}")
        reclaimed.append((path, nbytes))
    return reclaimed


def _allocated_bytes(path: Path) -> int:
    """Bytes the directory's files take on disk (st_blocks: a sparse, half-written file counts what it holds)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total
