"""The memory this process's run may use: the host's available memory, bounded by its memory cgroup.

`generate` with no `--ram-budget` and no `--cache-slots` sizes its cache from this (`default_ram_budget`),
so a model that fits is held whole and one that does not streams through the largest cache the machine
can give. What is available is the smaller of

- the host's `MemAvailable` (/proc/meminfo: free memory plus what the kernel can reclaim), and
- for each memory cgroup from this process's up to the root (v1 `memory.limit_in_bytes`, v2
  `memory.max`), its limit minus what it holds that cannot simply be dropped (usage less its
  inactive file pages),

less a headroom for the kernel and the page cache of the files the run reads outside its budget
(`HEADROOM_FRACTION` of it, at least `MIN_HEADROOM`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
HEADROOM_FRACTION = 0.10
MIN_HEADROOM = 1 * GIB
UNLIMITED = 2**60  # a cgroup "limit" above this means none (v1 writes 9223372036854771712)
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class AvailableMemory:
    """Bytes available and where the bound came from (for messages)."""

    nbytes: int
    source: str  # "MemAvailable" or the cgroup directory that bounds it

    def describe(self) -> str:
        return f"{self.nbytes / GIB:.1f} GiB available ({self.source})"


def meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{meminfo}: no MemAvailable line")


def _stat_value(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def cgroup_directories(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> list[Path]:
    """This process's memory cgroup directories, innermost first, up to the mount's root (v1 `memory`
    controller, else the v2 unified hierarchy); those that do not exist here are skipped."""
    found: list[Path] = []
    for line in proc_cgroup.read_text().splitlines():
        _, controllers, relative = line.split(":", 2)
        if "memory" in controllers.split(","):
            mount = root / "memory"
        elif controllers == "" and (root / "cgroup.controllers").exists():
            mount = root
        else:
            continue
        directory = mount / relative.lstrip("/")
        while True:
            if directory.is_dir():
                found.append(directory)
            if directory == mount:
                break
            directory = directory.parent
        if found:
            return found
    return found


def cgroup_available(directory: Path) -> int | None:
    """The cgroup's limit minus its usage that is not inactive file cache; None without a limit."""
    if (directory / "memory.limit_in_bytes").exists():  # v1
        limit = int((directory / "memory.limit_in_bytes").read_text())
        usage = int((directory / "memory.usage_in_bytes").read_text())
        reclaimable = _stat_value(directory / "memory.stat", "total_inactive_file")
    elif (directory / "memory.max").exists():  # v2
        text = (directory / "memory.max").read_text().strip()
        if text == "max":
            return None
        limit = int(text)
        usage = int((directory / "memory.current").read_text())
        reclaimable = _stat_value(directory / "memory.stat", "inactive_file")
    else:
        return None
    if limit >= UNLIMITED:
        return None
    return max(limit - max(usage - reclaimable, 0), 0)


def available_memory() -> AvailableMemory:
    """What this process's run may use now (see the module docstring), before the headroom."""
    best = AvailableMemory(meminfo_available(), "MemAvailable")
    try:
        directories = cgroup_directories()
    except OSError:
        directories = []
    for directory in directories:
        try:
            available = cgroup_available(directory)
        except (OSError, ValueError):
            continue
        if available is not None and available < best.nbytes:
            best = AvailableMemory(available, f"memory cgroup {directory}")
    return best


def default_ram_budget(available: AvailableMemory | None = None) -> tuple[int, AvailableMemory]:
    """The RAM budget a run gets by default: what is available less the headroom."""
    available = available or available_memory()
    headroom = max(int(available.nbytes * HEADROOM_FRACTION), MIN_HEADROOM)
    return max(available.nbytes - headroom, 0), available
