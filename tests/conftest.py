"""Shared test hooks: after every test, nothing of a process-graph run may be left on the machine.

The autouse fixture `leak_guard` gives every test

- a private runtime base directory (`MER_RUNTIME_DIR`, short, under /tmp), so every runtime
  directory and ipc socket of a run the test starts lies there;
- a marker in the environment (`PYTEST_MER_LEAK_MARK`), inherited by every process the test starts
  and by their children (multiprocessing spawn and subprocess both pass the environment on), so
  those processes are found in /proc even after they were re-parented.

After the test, passed or failed, it checks that there is no process carrying the marker, no live
child of the test process, no `mer-*` runtime directory or socket file in the private base, and no
`/dev/shm/mer-<run>-*` file of a run of this test (runs are known by the run ids registered with
`leak_guard.add_run`, found in the base directory or in the titles of marked processes, and by an
arena header naming the test process or a marked process as supervisor). What it finds is killed or
removed, and the test then fails, naming every leftover. Processes get a few seconds to exit first:
children of a killed supervisor die by PR_SET_PDEATHSIG, a moment after it.

psutil is not a dependency: processes are read from /proc/<pid>/{stat,cmdline,environ}.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LEAK_MARK_VARIABLE = "PYTEST_MER_LEAK_MARK"
SHM_DIR = Path("/dev/shm")
PROCESS_EXIT_GRACE_S = 8.0
_RUN_ID = re.compile(r"[0-9a-f]{8}")
_SHM_NAME = re.compile(r"mer-([0-9a-f]{8})-.+")
_TITLE_RUN_ID = re.compile(r"^mer-[a-z0-9-]*?-([0-9a-f]{8})$")
_ARENA_MAGIC = b"MERARENA"


@dataclass(frozen=True)
class ProcessEntry:
    """A process seen in /proc."""

    pid: int
    ppid: int
    state: str
    title: str


def _read_process(pid: int) -> ProcessEntry | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rfind(")") + 2:].split()
    return ProcessEntry(pid, int(fields[1]), fields[0], title)


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _carries_mark(pid: int, mark: bytes) -> bool:
    try:
        return mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


def _is_resource_tracker(entry: ProcessEntry) -> bool:
    """multiprocessing's resource tracker: started once per parent process, lives as long as it."""
    try:
        command = Path(f"/proc/{entry.pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return b"multiprocessing.resource_tracker" in command


def _arena_supervisor_pid(path: Path) -> int | None:
    """The supervisor pid in an arena header (magic, version u32, slots u32, slot bytes u64,
    data offset u64, pid u32, ...), or None if the file is not a complete arena."""
    try:
        with open(path, "rb") as file:
            header = file.read(36)
    except OSError:
        return None
    if len(header) < 36 or header[:8] != _ARENA_MAGIC:
        return None
    return int.from_bytes(header[32:36], "little")


@dataclass
class LeakGuard:
    """What one test may leave behind, and the checks run after it (see the module docstring)."""

    mark: str
    runtime_base: Path
    shm_before: set[str]
    children_before: set[int]
    run_ids: set[str] = field(default_factory=set)
    supervisor_pids: set[int] = field(default_factory=set)

    def add_run(self, run_id: str) -> None:
        """Register a run id started by the test (its /dev/shm files are then checked)."""
        if _RUN_ID.fullmatch(run_id):
            self.run_ids.add(run_id)

    def add_supervisor_pid(self, pid: int) -> None:
        """Register the pid of a supervisor (a CLI process) the test started."""
        self.supervisor_pids.add(pid)

    # ---- finding leftovers ---------------------------------------------------------------------

    def marked_processes(self) -> list[ProcessEntry]:
        """Live processes carrying this test's mark, or titled `mer-...-<run>` for a run of this test."""
        mark = f"{LEAK_MARK_VARIABLE}={self.mark}".encode()
        found = []
        for pid in _all_pids():
            if pid == os.getpid():
                continue
            entry = _read_process(pid)
            if entry is None or entry.state in ("Z", "X") or self._is_tolerated(entry):
                continue
            title_run = _TITLE_RUN_ID.match(entry.title)
            if _carries_mark(pid, mark) or (title_run is not None and title_run.group(1) in self.run_ids):
                found.append(entry)
        return found

    def live_children(self) -> list[ProcessEntry]:
        multiprocessing.active_children()  # joins finished multiprocessing children
        found = []
        for pid in _all_pids():
            entry = _read_process(pid)
            if (entry is not None and entry.ppid == os.getpid() and entry.state not in ("Z", "X")
                    and pid not in self.children_before and not self._is_tolerated(entry)):
                found.append(entry)
        return found

    def _is_tolerated(self, entry: ProcessEntry) -> bool:
        # The test process's own resource tracker (started by multiprocessing spawn) lives as long as
        # pytest; a CLI's tracker exits with its CLI and is not tolerated once that has exited.
        return entry.ppid == os.getpid() and _is_resource_tracker(entry)

    def leftover_processes(self) -> list[ProcessEntry]:
        """Marked or child processes still alive after a grace period for exits in progress."""
        deadline = time.monotonic() + PROCESS_EXIT_GRACE_S
        while True:
            found = {entry.pid: entry for entry in self.marked_processes() + self.live_children()}
            if not found or time.monotonic() > deadline:
                return list(found.values())
            time.sleep(0.05)

    def leftover_paths(self, processes: list[ProcessEntry]) -> list[Path]:
        run_ids = set(self.run_ids)
        for entry in processes:
            match = _TITLE_RUN_ID.match(entry.title)
            if match:
                run_ids.add(match.group(1))
        paths: list[Path] = []
        for path in sorted(self.runtime_base.rglob("*")):
            if path.name.startswith("mer-") or _is_socket(path):
                paths.append(path)
                match = re.fullmatch(r"mer-([0-9a-f]{8})", path.name)
                if match:
                    run_ids.add(match.group(1))
        for base in {Path("/tmp"), Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")}:
            paths += [base / f"mer-{run_id}" for run_id in run_ids if (base / f"mer-{run_id}").exists()]
        owners = self.supervisor_pids | {os.getpid()} | {entry.pid for entry in processes}
        for name in sorted(set(os.listdir(SHM_DIR)) - self.shm_before):
            match = _SHM_NAME.fullmatch(name)
            if not match:
                continue
            if match.group(1) in run_ids or _arena_supervisor_pid(SHM_DIR / name) in owners:
                paths.append(SHM_DIR / name)
        return paths


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def _kill_and_reap(processes: list[ProcessEntry]) -> None:
    """SIGKILL the processes; reap those that are children of the test process."""
    multiprocessing_children = {process.pid for process in multiprocessing.active_children()}
    for entry in processes:
        try:
            os.kill(entry.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    for entry in processes:
        if entry.ppid == os.getpid() and entry.pid not in multiprocessing_children:
            try:
                os.waitpid(entry.pid, 0)
            except ChildProcessError:
                pass
    for process in multiprocessing.active_children():  # reaps through their own Popen objects
        process.join(PROCESS_EXIT_GRACE_S)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _describe(entry: ProcessEntry) -> str:
    return f"pid {entry.pid} ({entry.title or '?'}, parent {entry.ppid}, state {entry.state})"


@pytest.fixture(autouse=True)
def leak_guard(monkeypatch) -> LeakGuard:
    """Fail the test if it leaves a process, a /dev/shm segment, a runtime dir or an ipc socket."""
    runtime_base = Path(tempfile.mkdtemp(prefix="mt-", dir="/tmp"))
    guard = LeakGuard(
        mark=uuid.uuid4().hex,
        runtime_base=runtime_base,
        shm_before=set(os.listdir(SHM_DIR)),
        children_before={entry.pid for entry in map(_read_process, _all_pids())
                         if entry is not None and entry.ppid == os.getpid()},
    )
    monkeypatch.setenv(LEAK_MARK_VARIABLE, guard.mark)
    monkeypatch.setenv("MER_RUNTIME_DIR", str(runtime_base))
    try:
        yield guard
    finally:
        processes = guard.leftover_processes()
        _kill_and_reap(processes)
        paths = guard.leftover_paths(processes)
        _remove(paths)
        shutil.rmtree(runtime_base, ignore_errors=True)
    leftovers = [_describe(entry) for entry in processes] + [str(path) for path in paths]
    if leftovers:
        pytest.fail("the test left behind (now removed): " + "; ".join(leftovers), pytrace=False)


# ---- small expert stores for the process-graph tests (tests/support/pipeline_runs.py) ----------------------

STORE_SPECS = {
    # name: (dtypes gate, up, down); all 2 MoE layers x 8 experts, top-2, d_model 256, d_ff 512
    "tiny": ("q4_0", "q4_0", "q4_0"),  # the `tiny` preset: payload 221,184 bytes, 54 pages exactly
    "mixed": ("q4_k", "q4_k", "q6_k"),  # payload 254,976 bytes: the read is rounded up to 63 pages
    "q8": ("q8_0", "q8_0", "q8_0"),
}


@pytest.fixture(scope="session")
def disk_dir(tmp_path_factory) -> Path:
    """A session directory on a filesystem with O_DIRECT (io_uring reads): tmp_path unless it is tmpfs."""
    from tests.support.pipeline_runs import filesystem_type

    directory = tmp_path_factory.mktemp("disk")
    if filesystem_type(directory) != "tmpfs":
        yield directory
        return
    directory = Path("/work/tmp-pipeline-tests") / uuid.uuid4().hex
    directory.mkdir(parents=True)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def pipeline_stores(disk_dir) -> dict[str, Path]:
    """Synthetic stores on disk, by name (see STORE_SPECS), written once per session."""
    from mer.store.synth import SynthSpec, synth_store

    stores = {}
    for name, dtypes in STORE_SPECS.items():
        spec = SynthSpec(num_layers=2, experts_per_layer=8, top_k=2, d_model=256, d_ff=512, dtypes=dtypes,
                         seed=7, preset="tiny" if name == "tiny" else None)
        stores[name] = synth_store(spec, disk_dir / f"store-{name}").out
    return stores


@pytest.fixture(autouse=True)
def structlog_configuration_restored():
    """A test that configures logging in-process (a CLI `main()` call: warning level, stderr) leaves
    it as it found it, so a later test's `structlog.testing.capture_logs` still sees info events
    (seen: test_ray_cluster after test_shard_group_start failed on a missing `ray_cluster_stopped`)."""
    import structlog
    import structlog.contextvars

    saved, context = structlog.get_config(), structlog.contextvars.get_contextvars()
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)
