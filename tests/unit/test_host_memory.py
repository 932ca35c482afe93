"""The memory a run may use by default (`mer.runtime.host_memory`): MemAvailable bounded by the memory
cgroups of the process, less a headroom; a real child cgroup where this host lets us make one."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mer.runtime.host_memory import (GIB, MIN_HEADROOM, AvailableMemory, cgroup_available, cgroup_directories,
                                     default_ram_budget, meminfo_available)

MIB = 2**20


def test_meminfo_available_reads_kib(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683100 kB\nMemFree:  1000 kB\nMemAvailable:   23417548 kB\n")
    assert meminfo_available(meminfo) == 23417548 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    with pytest.raises(OSError, match="no MemAvailable"):
        meminfo_available(meminfo)


def test_v1_and_v2_cgroups_subtract_what_cannot_be_dropped(tmp_path):
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{8 * GIB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{3 * GIB}\n")
    (v1 / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {GIB}\ntotal_rss 7\n")
    assert cgroup_available(v1) == 8 * GIB - (3 * GIB - GIB)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_available(v1) is None  # v1's "no limit"
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{4 * GIB}\n")
    (v2 / "memory.current").write_text(f"{GIB}\n")
    (v2 / "memory.stat").write_text(f"anon 1\ninactive_file {512 * MIB}\n")
    assert cgroup_available(v2) == 4 * GIB - 512 * MIB
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_available(v2) is None
    assert cgroup_available(tmp_path) is None  # no memory controller files


def test_cgroup_directories_walk_from_the_process_cgroup_to_the_root(tmp_path):
    root = tmp_path / "cgroup"
    (root / "memory" / "a" / "b").mkdir(parents=True)
    proc = tmp_path / "cgroup-of-self"
    proc.write_text("5:devices:/x\n4:memory:/a/b\n0::/\n")
    assert cgroup_directories(proc, root) == [root / "memory" / "a" / "b", root / "memory" / "a", root / "memory"]
    unified = tmp_path / "unified"
    (unified / "user.slice").mkdir(parents=True)
    (unified / "cgroup.controllers").write_text("memory\n")
    proc.write_text("0::/user.slice\n")
    assert cgroup_directories(proc, unified) == [unified / "user.slice", unified]


def test_the_default_budget_leaves_a_tenth_and_at_least_a_gib():
    assert default_ram_budget(AvailableMemory(20 * GIB, "x"))[0] == 18 * GIB
    assert default_ram_budget(AvailableMemory(4 * GIB, "x"))[0] == 3 * GIB  # the minimum headroom
    assert default_ram_budget(AvailableMemory(MIN_HEADROOM // 2, "x"))[0] == 0


def test_a_real_memory_cgroup_bounds_what_a_process_in_it_may_use():
    """A child moved into a new v1 memory cgroup with a 768 MiB limit sees at most that much."""
    proc_line = next((line for line in Path("/proc/self/cgroup").read_text().splitlines()
                      if "memory" in line.split(":")[1].split(",")), None)
    parent = Path("/sys/fs/cgroup/memory") / proc_line.split(":", 2)[2].lstrip("/") if proc_line else None
    if parent is None or not (parent / "memory.limit_in_bytes").exists():
        pytest.skip("no cgroup v1 memory controller for this process")
    group = parent / f"mer-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(768 * MIB))
    except OSError as error:
        pytest.skip(f"cannot make a memory cgroup here: {error}")
    try:
        script = (f"import os; open('{group}/cgroup.procs', 'w').write(str(os.getpid()))\n"
                  "from mer.runtime.host_memory import available_memory\n"
                  "available = available_memory(); print(available.nbytes, available.source)")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        nbytes, source = result.stdout.split(" ", 1)
        assert 0 < int(nbytes) <= 768 * MIB and source.strip() == f"memory cgroup {group}"
    finally:
        group.rmdir()
