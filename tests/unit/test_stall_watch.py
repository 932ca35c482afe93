"""The mid-run watchdog's judgement (`mer.runtime.stall_watch`) on real processes: an idle process
without heartbeats and a stopped one are stalled; heartbeats, CPU time or I/O keep a process from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mer.runtime.stall_watch import StallWatch, heartbeat_interval_s, io_bytes, process_state

TIMEOUT_S = 0.4
SPIN = "import time\nwhile True: pass"
SLEEP = "import time; time.sleep(60)"
READ = ("import sys, time\n"
        "while True:\n"
        "    with open(sys.executable, 'rb') as f: f.read(4096)\n"
        "    time.sleep(0.05)\n")


@pytest.fixture
def spawn():
    processes = []

    def start(code: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", code])
        processes.append(process)
        time.sleep(0.3)  # past the interpreter's start-up (CPU and reads), into the code
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait(10)


def watch_for(watch: StallWatch, seconds: float, heartbeat: str | None = None):
    """Check every 0.05 s for `seconds`; the stalls seen, by name (a heartbeat for `heartbeat` at each check)."""
    seen = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if heartbeat is not None:
            watch.heartbeat(heartbeat, time.monotonic())
        for stall in watch.stalls(time.monotonic()):
            seen.setdefault(stall.name, stall)
    return seen


def test_a_stopped_process_is_stalled_and_its_state_named(spawn):
    process = spawn(SPIN)
    watch = StallWatch()
    watch.watch("spinner", process.pid, TIMEOUT_S, time.monotonic())
    assert watch_for(watch, 2 * TIMEOUT_S) == {}  # spinning: CPU time grows
    os.kill(process.pid, signal.SIGSTOP)
    stall = watch_for(watch, 3 * TIMEOUT_S)["spinner"]
    assert stall.pid == process.pid and stall.state == "stopped"
    assert TIMEOUT_S < stall.silent_s < TIMEOUT_S + 0.3
    assert stall.describe() == f"stalled: no heartbeat, CPU time or I/O for {stall.silent_s:.1f} s (process stopped)"


def test_an_idle_process_is_stalled_without_heartbeats_and_not_with_them(spawn):
    process = spawn(SLEEP)
    watch = StallWatch()
    watch.watch("sleeper", process.pid, TIMEOUT_S, time.monotonic())
    assert watch_for(watch, 3 * TIMEOUT_S, heartbeat="sleeper") == {}
    stall = watch_for(watch, 3 * TIMEOUT_S)["sleeper"]
    assert stall.state == "sleeping"


def test_io_is_progress(spawn):
    """A process that reads (a page fault or read of a busy disk) but uses almost no CPU is not stalled."""
    process = spawn(READ)
    first = io_bytes(process.pid)
    watch = StallWatch()
    watch.watch("reader", process.pid, TIMEOUT_S, time.monotonic())
    assert watch_for(watch, 4 * TIMEOUT_S) == {}
    assert io_bytes(process.pid) > first


def test_a_forgotten_or_gone_process_is_not_reported(spawn):
    process = spawn(SLEEP)
    watch = StallWatch()
    watch.watch("gone", process.pid, TIMEOUT_S, time.monotonic())
    watch.watch("forgotten", os.getpid(), 0.0, time.monotonic() - 10)
    watch.forget("forgotten")
    process.kill()
    process.wait(10)
    assert watch_for(watch, 2 * TIMEOUT_S) == {}
    assert process_state(process.pid) == "gone"


def test_the_heartbeat_interval_bounds_detection():
    assert heartbeat_interval_s(8.0) == 1.0  # the default: a stall is seen within 9 s
    assert heartbeat_interval_s(2.0) == 0.4
