"""A child memory cgroup for one benchmark run: its limit, a launcher that starts a command inside
it, its processes, its peak memory.

cgroup v1 (a `memory` hierarchy, e.g. /sys/fs/cgroup/memory): `memory.limit_in_bytes`,
`memory.max_usage_in_bytes`, `memory.failcnt`, `memory.oom_control`'s `oom_kill`. cgroup v2 (a
unified hierarchy whose root lists `memory` in `cgroup.controllers`): `memory.max`,
`memory.swap.max` = 0, `memory.peak`, `memory.events`' `oom_kill`. Making one needs root (or a
delegated subtree); `make_memory_cgroup` raises `CgroupUnavailable` with the reason otherwise.

The command is started by a launcher (`launcher_prefix`): `sh -c 'echo $$ > cgroup.procs; exec
"$@"'`, so the process is in the cgroup before it loads anything and every child it starts is too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be made here (the message says why)."""


@dataclass
class MemoryCgroup:
    path: Path
    version: int  # 1 or 2

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def set_limit(self, nbytes: int) -> None:
        """The memory limit (page cache included); the kernel rounds it down to a page."""
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        (self.path / name).write_text(f"{int(nbytes)}\n")

    def reset_peak(self) -> None:
        """Start the peak over (v1; v2's memory.peak cannot be reset for other readers)."""
        if self.version == 1:
            (self.path / "memory.max_usage_in_bytes").write_text("0\n")

    def limit(self) -> int:
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        text = (self.path / name).read_text().strip()
        return -1 if text == "max" else int(text)

    def pids(self) -> list[int]:
        try:
            return [int(line) for line in self.procs_file.read_text().split()]
        except OSError:
            return []

    def peak_nbytes(self) -> int | None:
        """The most memory charged to the cgroup since it was made (None where the kernel has no counter)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def oom_kills(self) -> int:
        """Processes the OOM killer killed in the cgroup (0 where the kernel does not count them)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def limit_hits(self) -> int | None:
        """How often usage hit the limit (v1 `memory.failcnt`, v2 `memory.events` max)."""
        try:
            if self.version == 1:
                return int((self.path / "memory.failcnt").read_text())
            for line in (self.path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value)
        except (OSError, ValueError):
            pass
        return None

    def launcher_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the cgroup from its first instruction."""
        return ["sh", "-c", f'echo $$ > "{self.procs_file}" && exec "$@"', "mer-bench-launch"]

    def remove(self, timeout_s: float = 10.0) -> None:
        """Remove the (empty) cgroup, waiting up to `timeout_s` for its processes to be gone."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _v2_root() -> Path | None:
    controllers = V2_ROOT / "cgroup.controllers"
    if controllers.is_file() and "memory" in controllers.read_text().split():
        return V2_ROOT
    return None


def make_memory_cgroup(name: str, limit_nbytes: int | None = None) -> MemoryCgroup:
    """A new child memory cgroup called `name` (v1 where its hierarchy is mounted, else v2)."""
    if V1_ROOT.is_dir() and (V1_ROOT / "memory.limit_in_bytes").exists():
        group = MemoryCgroup(V1_ROOT / name, 1)
    elif (root := _v2_root()) is not None:
        group = MemoryCgroup(root / name, 2)
        try:
            subtree = root / "cgroup.subtree_control"
            if "memory" not in subtree.read_text().split():
                subtree.write_text("+memory\n")
        except OSError as error:
            raise CgroupUnavailable(f"cannot enable the memory controller in {root}: {error}") from None
    else:
        raise CgroupUnavailable(f"no cgroup memory controller: neither {V1_ROOT}/memory.limit_in_bytes (v1) "
                                f"nor 'memory' in {V2_ROOT}/cgroup.controllers (v2)")
    try:
        group.path.mkdir()
    except FileExistsError:
        pass
    except OSError as error:
        raise CgroupUnavailable(f"cannot create the memory cgroup {group.path} ({error}); it needs root") from None
    try:
        if group.version == 2:
            (group.path / "memory.swap.max").write_text("0\n")
        if limit_nbytes is not None:
            group.set_limit(limit_nbytes)
    except OSError as error:
        group.remove(timeout_s=0)
        raise CgroupUnavailable(f"cannot set the memory limit of {group.path}: {error}") from None
    return group


def cgroup_name(tag: str) -> str:
    """A unique name for a run's cgroup: `mer-bench-<pid>-<tag>`."""
    return f"mer-bench-{os.getpid()}-{tag}"
