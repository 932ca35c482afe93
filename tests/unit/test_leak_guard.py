"""The leak guard itself (`tests/conftest.py::leak_guard`): tests that leave a process, a `/dev/shm` file of
their run or a runtime directory behind fail, naming each leftover, and the leftovers are gone after them.

Each case runs the project's conftest on an inner test file in a pytest subprocess (pytester), so the
inner guard is the real one and the outer test's own guard is not disturbed by what the inner tests leave.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
SHM_DIR = Path("/dev/shm")


def arena_header(supervisor_pid: int) -> bytes:
    """The first 36 bytes of an arena: magic, version, slots, slot bytes, data offset, supervisor pid
    (the layout the guard reads; mer.shm.arena writes it)."""
    return (b"MERARENA" + (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + (4096).to_bytes(8, "little")
            + (4096).to_bytes(8, "little") + supervisor_pid.to_bytes(4, "little"))


def run_inner(pytester: pytest.Pytester, body: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_inner=body)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow  # the guard gives leftover processes 8 s to exit
def test_a_test_that_leaves_a_child_process_fails_naming_it_and_the_process_is_killed(pytester, tmp_path):
    pid_file = tmp_path / "child.pid"
    result = run_inner(pytester, f"""
import subprocess
from pathlib import Path

def test_leaves_a_sleeper():
    child = subprocess.Popen(["sleep", "600"])
    Path({str(pid_file)!r}).write_text(str(child.pid))

def test_waits_for_its_child():
    subprocess.run(["true"], check=True)
""")
    result.assert_outcomes(passed=2, errors=1)
    pid = int(pid_file.read_text())
    output = result.stdout.str()
    assert re.search(rf"ERROR at teardown of test_leaves_a_sleeper.*the test left behind \(now removed\): "
                     rf"pid {pid} \(sleep, parent \d+, state [SR]\)", output, re.DOTALL), output
    assert "test_waits_for_its_child" not in output.split("short test summary info")[-1]
    assert not is_running(pid)


def test_a_test_that_leaves_shm_files_and_a_runtime_dir_of_its_run_fails_naming_them_and_they_are_removed(
        pytester):
    registered, unregistered, stranger = (secrets.token_hex(4) for _ in range(3))
    leftovers = [SHM_DIR / f"mer-{registered}-arena", SHM_DIR / f"mer-{registered}-stats",
                 SHM_DIR / f"mer-{unregistered}-arena"]
    strangers_arena = SHM_DIR / f"mer-{stranger}-arena"  # another run's (supervisor pid 1): never the test's
    try:
        result = run_inner(pytester, f"""
import os
from pathlib import Path

def test_leaves_its_run(leak_guard):
    leak_guard.add_run({registered!r})
    Path("/dev/shm/mer-{registered}-arena").write_bytes(b"\\0" * 64)
    Path("/dev/shm/mer-{registered}-stats").write_bytes(b"\\0" * 8)
    (Path(os.environ["MER_RUNTIME_DIR"]) / "mer-{registered}").mkdir()

def test_leaves_an_arena_naming_it_as_supervisor():
    header = {arena_header(0)[:32]!r} + os.getpid().to_bytes(4, "little")
    Path("/dev/shm/mer-{unregistered}-arena").write_bytes(header + b"\\0" * 28)

def test_leaves_nothing_of_its_own(leak_guard):
    leak_guard.add_run({registered!r})
    Path("{strangers_arena}").write_bytes({arena_header(1)!r})
""")
        result.assert_outcomes(passed=3, errors=2)
        output = result.stdout.str()
        first, second = output.split("ERROR at teardown of ")[1:3]
        assert first.startswith("test_leaves_its_run") and second.startswith("test_leaves_an_arena_naming_it")
        for path in leftovers[:2]:
            assert str(path) in first
        assert re.search(rf"/tmp/mt-\w+/mer-{registered}\b", first), first
        assert str(leftovers[2]) in second and str(strangers_arena) not in output
        assert "test_leaves_nothing_of_its_own" not in output.split("short test summary info")[-1]
        assert not [path for path in leftovers if path.exists()]
        assert strangers_arena.exists()  # another run's file is never touched
    finally:
        for path in [*leftovers, strangers_arena]:
            path.unlink(missing_ok=True)
