"""Run names, the private runtime directory, supervisor liveness and removal of stale runs (mer/runtime)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mer.errors import ConfigError, RuntimeDirError
from mer.runtime.cleanup import remove_run, remove_stale_runs
from mer.runtime.liveness import is_process_alive, process_start_time
from mer.runtime.paths import (
    SHM_DIR,
    arena_path,
    check_run_id,
    create_runtime_dir,
    endpoint,
    new_run_id,
    process_name,
    read_supervisor_record,
    remove_runtime_dir,
    runtime_dir,
    write_supervisor_record,
)
from tests.support.runtime_dirs import check_runtime_dir_private
from mer.shm import SlotArena

HOUR_S = 3600.0


@pytest.fixture
def runtime_base(tmp_path, monkeypatch) -> Path:
    base = tmp_path / "runtime"
    base.mkdir()
    monkeypatch.setenv("MER_RUNTIME_DIR", str(base))
    return base


@pytest.fixture
def shm_dir(tmp_path) -> Path:
    """A private stand-in for /dev/shm, so these tests judge only the runs they made."""
    directory = tmp_path / "shm"
    directory.mkdir()
    return directory


@pytest.fixture(scope="module")
def dead_process() -> tuple[int, int]:
    """(pid, start time) of a process that has exited and been reaped."""
    code = "import os; from mer.runtime.liveness import process_start_time as t; print(os.getpid(), t(os.getpid()))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    pid, start_time = map(int, completed.stdout.split())
    return pid, start_time


@pytest.fixture
def real_shm_run_ids():
    """Run ids for files in the real /dev/shm; whatever a test leaves there is removed and fails the test."""
    runs: list[str] = []

    def next_run_id() -> str:
        runs.append(new_run_id())
        return runs[-1]

    yield next_run_id
    leftovers = [path for run in runs for path in SHM_DIR.glob(f"mer-{run}-*")]
    for path in leftovers:
        path.unlink(missing_ok=True)
    assert not leftovers, f"left behind: {leftovers}"


def make_run(run_id: str, shm_dir: Path, supervisor_pid: int | None, start_time: int | None = None) -> list[Path]:
    """A fake run: a runtime dir (with a supervisor record unless pid is None) and two shm files."""
    directory = runtime_dir(run_id)
    directory.mkdir(mode=0o700)
    (directory / "io.sock").write_bytes(b"")
    if supervisor_pid is not None:
        (directory / "supervisor.pid").write_text(f"{supervisor_pid} {start_time if start_time else '-'}\n")
    files = [shm_dir / f"mer-{run_id}-arena", shm_dir / f"mer-{run_id}-extra"]
    for path in files:
        path.write_bytes(b"\0" * 64)
    return [directory, *files]


def age(paths: list[Path], seconds: float) -> None:
    past = time.time() - seconds
    for path in paths:
        os.utime(path, (past, past))


# ---- names ------------------------------------------------------------------------------------


def test_run_ids_and_names(runtime_base, monkeypatch):
    run_ids = {new_run_id() for _ in range(200)}
    assert len(run_ids) == 200 and all(check_run_id(run) == run for run in run_ids)
    for bad in ("0123456", "0123456G", "ABCDEF01", "../../x", 12345678):
        with pytest.raises(ConfigError, match="run id"):
            check_run_id(bad)
    assert runtime_dir("0a1b2c3d") == runtime_base / "mer-0a1b2c3d"
    assert endpoint("0a1b2c3d", "io") == f"ipc://{runtime_base}/mer-0a1b2c3d/io.sock"
    assert arena_path("0a1b2c3d") == Path("/dev/shm/mer-0a1b2c3d-arena")
    assert process_name("io", "0a1b2c3d") == "mer-io-0a1b2c3d"
    assert process_name("compute", "0a1b2c3d", 3) == "mer-compute-3-0a1b2c3d"
    with pytest.raises(ConfigError, match="endpoint name"):
        endpoint("0a1b2c3d", "../io")
    monkeypatch.setenv("MER_RUNTIME_DIR", "/" + "d" * 100)
    with pytest.raises(ConfigError, match="over the 107 a unix socket allows"):
        endpoint("0a1b2c3d", "io")
    monkeypatch.delenv("MER_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert runtime_dir("0a1b2c3d") == Path("/run/user/1234/mer-0a1b2c3d")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime_dir("0a1b2c3d") == Path("/tmp/mer-0a1b2c3d")


def test_runtime_dir_is_private_and_records_its_supervisor(runtime_base):
    run = new_run_id()
    old_umask = os.umask(0)
    try:
        directory = create_runtime_dir(run)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    check_runtime_dir_private(directory)
    record = read_supervisor_record(directory)
    assert (record.pid, record.start_time) == (os.getpid(), process_start_time(os.getpid()))
    with pytest.raises(RuntimeDirError, match="already exists"):
        create_runtime_dir(run)
    os.chmod(directory, 0o755)
    with pytest.raises(RuntimeDirError, match="not private: mode 755"):
        check_runtime_dir_private(directory)
    remove_runtime_dir(run)
    assert not directory.exists()


def test_supervisor_record_survives_garbage(tmp_path):
    assert read_supervisor_record(tmp_path) is None
    (tmp_path / "supervisor.pid").write_text("not a pid\n")
    assert read_supervisor_record(tmp_path) is None
    write_supervisor_record(tmp_path, os.getpid())
    assert read_supervisor_record(tmp_path).pid == os.getpid()


# ---- liveness ---------------------------------------------------------------------------------


def test_liveness_of_live_dead_reused_and_zombie_processes(dead_process):
    me = os.getpid()
    assert is_process_alive(me) and is_process_alive(me, process_start_time(me))
    assert not is_process_alive(me, process_start_time(me) + 1)  # same pid, another start time: reused
    assert not is_process_alive(*dead_process)
    assert not is_process_alive(0) and not is_process_alive(-1)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        assert not is_process_alive(zombie.pid)
    finally:
        zombie.wait()


# ---- clean-up ---------------------------------------------------------------------------------


def test_dead_runs_are_removed_and_live_runs_kept(runtime_base, shm_dir, dead_process):
    stale, live = new_run_id(), new_run_id()
    stale_paths = make_run(stale, shm_dir, *dead_process)
    live_paths = make_run(live, shm_dir, os.getpid(), process_start_time(os.getpid()))
    report = remove_stale_runs(shm_dir=shm_dir, runtime_bases=[runtime_base])
    assert report.removed_runs == (stale,) and report.live_runs == (live,)
    assert sorted(report.removed_paths) == sorted(stale_paths)
    assert not any(path.exists() for path in stale_paths)
    assert all(path.exists() for path in live_paths)


def test_a_reused_pid_does_not_keep_a_dead_run(runtime_base, shm_dir):
    run = new_run_id()
    paths = make_run(run, shm_dir, os.getpid(), process_start_time(os.getpid()) + 1)
    assert remove_stale_runs(shm_dir=shm_dir, runtime_bases=[runtime_base]).removed_runs == (run,)
    assert not any(path.exists() for path in paths)


def test_runs_without_a_readable_pid_are_removed_only_when_old(runtime_base, shm_dir):
    young, old = new_run_id(), new_run_id()
    young_paths = make_run(young, shm_dir, supervisor_pid=None)
    old_paths = make_run(old, shm_dir, supervisor_pid=None)
    age(old_paths, 2 * HOUR_S)
    report = remove_stale_runs(shm_dir=shm_dir, runtime_bases=[runtime_base], min_age_s=HOUR_S)
    assert (report.removed_runs, report.live_runs) == ((old,), (young,))
    assert all(path.exists() for path in young_paths)
    assert not any(path.exists() for path in old_paths)


def test_the_arena_header_names_the_supervisor_when_there_is_no_runtime_dir(
    runtime_base, dead_process, real_shm_run_ids
):
    stale, live = real_shm_run_ids(), real_shm_run_ids()
    SlotArena.create(stale, 1, 4096, supervisor_pid=dead_process[0]).close()
    live_arena = SlotArena.create(live, 1, 4096)
    try:
        report = remove_stale_runs(runtime_bases=[runtime_base], min_age_s=HOUR_S)  # the real /dev/shm
        assert stale in report.removed_runs and live in report.live_runs
        assert not arena_path(stale).exists() and arena_path(live).exists()
    finally:
        live_arena.destroy()


def test_other_names_and_symlinks_are_left_alone(runtime_base, shm_dir, dead_process, tmp_path):
    run = new_run_id()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "supervisor.pid").write_text(f"{dead_process[0]} -\n")
    (runtime_base / f"mer-{run}").symlink_to(target)
    untouched = [shm_dir / "mer-notarun-arena", shm_dir / "mer-0123456-arena", shm_dir / "other",
                 runtime_base / "mer-x"]
    for path in untouched:
        path.write_bytes(b"")
    age(untouched, 2 * HOUR_S)
    report = remove_stale_runs(shm_dir=shm_dir, runtime_bases=[runtime_base], min_age_s=HOUR_S)
    assert report.removed_paths == ()
    assert all(path.exists() for path in untouched) and (target / "supervisor.pid").exists()


def test_remove_run_removes_one_run_even_if_alive(runtime_base, shm_dir):
    mine, other = new_run_id(), new_run_id()
    my_paths = make_run(mine, shm_dir, os.getpid())
    other_paths = make_run(other, shm_dir, os.getpid())
    assert sorted(remove_run(mine, shm_dir=shm_dir, runtime_bases=[runtime_base])) == sorted(my_paths)
    assert not any(path.exists() for path in my_paths) and all(path.exists() for path in other_paths)
    assert remove_run(mine, shm_dir=shm_dir, runtime_bases=[runtime_base]) == []
