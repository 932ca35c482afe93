"""Faults of the process graph: a child killed mid-run, Ctrl-C, a child failing at start-up, a read
failing mid-run, a stale run of a dead supervisor, and start-up errors of the configuration.

Each test runs the real `mer-pipeline run` in a subprocess (with a log file, so the test can follow
it) and checks the exit status, the message the user gets, and, through the leak guard of
`tests/conftest.py`, that no process, /dev/shm file, runtime directory or socket is left.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from mer.config import PipelineConfig
from mer.errors import ChildDiedError
from mer.protocol import ChildFailed
from mer.runtime.paths import SUPERVISOR_RECORD_NAME, arena_path, new_run_id
from mer.shm.arena import SlotArena
from mer.store.reader import ExpertStore
from mer.runtime.spawned_child import Child
from mer.runtime.supervisor import Supervisor
from tests.support.host import URING_PROBLEM, forced_uring_error
from tests.support.pipeline_runs import RunningPipeline, dead_process, process_title, run_pipeline

pytestmark = pytest.mark.slow  # starts the process graph

LONG_RUN_TOKENS = 20_000  # minutes of work: every test below ends the run long before
SHUTDOWN_GRACE_S = 20.0  # children not stopped by Shutdown within this are terminated (and logged)
CHILD_ROLES = ("io", "predictor", "compute-0", "compute-1", "router")


@pytest.fixture
def long_run(leak_guard, pipeline_stores, tmp_path):
    """A long run (2 compute workers, 4 slots, markov) whose tokens are flowing; no restarts (a death
    ends it: restarts are tested in tests/integration/test_watchdog_restarts.py)."""
    run = RunningPipeline(leak_guard, pipeline_stores["tiny"], "--tokens", LONG_RUN_TOKENS, "--cache-slots", 4,
                          "--compute-workers", 2, "--shutdown-grace-s", SHUTDOWN_GRACE_S, "--max-restarts", 0,
                          workdir=tmp_path)
    try:
        run.wait_for_event("token_done", count=3)
        yield run
    finally:
        run.kill_if_running()


def _run_id(run: RunningPipeline) -> str:
    (started,) = [event for event in run.events() if event.get("event") == "run_started_supervisor"]
    return started["run_id"]


def _stopped_children(events: list[dict]) -> set[str]:
    return {event["process"] for event in events if event.get("event") == "child_stopped"}


def _forced_stops(events: list[dict]) -> list[dict]:
    return [event for event in events if event.get("event") in ("child_terminated", "child_killed")]


def test_kill_9_of_a_compute_worker_without_restarts_brings_the_graph_down(long_run):
    run_id = _run_id(long_run)
    name, pid = long_run.child_pid("mer-compute-0-")
    assert name == f"mer-compute-0-{run_id}"
    assert process_title(pid) == name  # found by its title, as an operator would

    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    result = long_run.finish()
    exit_seconds = time.monotonic() - killed_at

    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{name} (pid {pid}) died: killed by SIGKILL (after 0 restarts, max_restarts)" in result.stderr
    # prompt: the router abandons its job on Shutdown instead of waiting out the grace period
    assert exit_seconds < SHUTDOWN_GRACE_S / 2, exit_seconds
    events = result.events
    (died,) = [event for event in events if event.get("event") == "child_died"]
    assert died["child"] == name and died["exit"] == "killed by SIGKILL"
    # every other child stopped on Shutdown; the router, whose jobs for the lost worker wait for a
    # restart, abandons its job on Shutdown
    survivors = {f"mer-{role}-{run_id}" for role in CHILD_ROLES} - {name}
    assert survivors == _stopped_children(events)
    assert any(event.get("event") == "job_cancelled" for event in events)
    assert _forced_stops(events) == []
    assert [event for event in events if event.get("event") == "child_restarted"] == []


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_cli_shuts_the_graph_down_cleanly(long_run, signal_number):
    run_id = _run_id(long_run)
    signalled_at = time.monotonic()
    long_run.send_signal(signal_number)
    result = long_run.finish()
    exit_seconds = time.monotonic() - signalled_at

    assert result.returncode == 128 + signal_number  # SIGINT 130, SIGTERM 143: the shell's convention
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"mer-pipeline run: {signal_number.name}: graph shut down"
    assert exit_seconds < SHUTDOWN_GRACE_S / 2, exit_seconds
    events = result.events
    assert _stopped_children(events) == {f"mer-{role}-{run_id}" for role in CHILD_ROLES}
    assert _forced_stops(events) == []
    assert not [event for event in events if event.get("event") == "run_summary"]


def test_a_read_failing_mid_run_reaches_the_user(leak_guard, pipeline_stores, tmp_path):
    """The store's second layer file is cut short while the run goes: the next read of that layer fails."""
    store = tmp_path / "store"
    shutil.copytree(pipeline_stores["tiny"], store)
    run = RunningPipeline(leak_guard, store, "--tokens", LONG_RUN_TOKENS, "--cache-slots", 2, "--no-prefetch",
                          "--workload", "uniform", "--compute-workers", 1, workdir=tmp_path)
    try:
        run.wait_for_event("token_done", count=2)
        layer_file = store / "experts-001.bin"
        os.truncate(layer_file, 4096)
        result = run.finish()
    finally:
        run.kill_if_running()
    assert result.returncode == 1
    assert result.stdout == ""
    message = result.stderr
    assert re.search(r"mer-router-[0-9a-f]{8} failed", message), message
    assert "IoReadError" in message and str(layer_file) in message, message
    # the expert is named, and the read was retried with backoff before the run gave up
    named = re.search(rf"IoReadError: layer 1 expert \d+ \(id (\d+)\): {re.escape(str(layer_file))}: read of \d+ "
                      r"bytes at offset \d+ came back short.* \(tried 4 times over 0\.31 s\)$", message.strip())
    assert named, message
    retries = [event["attempt"] for event in result.events
               if event.get("event") == "expert_read_retry" and event["expert_id"] == int(named.group(1))]
    assert retries == [1, 2, 3]


def test_a_child_failing_at_start_up_reports_its_own_error(leak_guard, pipeline_stores, tmp_path):
    """io_uring forced on a tmpfs store: the I/O worker's error is what the user reads."""
    store = Path("/dev/shm") / f"test-store-{new_run_id()}"
    shutil.copytree(pipeline_stores["tiny"], store)
    try:
        result = run_pipeline(leak_guard, store, "--tokens", 4, "--cache-slots", 4, "--compute-workers", 2,
                              "--io-backend", "uring", "--shutdown-grace-s", SHUTDOWN_GRACE_S, workdir=tmp_path)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    assert result.returncode == 1
    assert result.stdout == ""
    expected = (re.escape(forced_uring_error("")) if URING_PROBLEM
                else r"io_backend 'uring' needs O_DIRECT: .*is on tmpfs")
    assert re.search(r"error: mer-io-[0-9a-f]{8} failed: mer\.errors\.IoBackendUnavailableError: " + expected,
                     result.stderr), result.stderr
    # the children still starting are stopped at once, not after the grace period
    assert result.seconds < SHUTDOWN_GRACE_S


def test_a_slow_start_that_keeps_using_cpu_is_given_time(leak_guard, pipeline_stores, tmp_path):
    """A handshake timeout far below the children's start-up (imports alone take longer): they keep
    using CPU, so the supervisor extends the start-up and the run completes."""
    result = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 8, "--cache-slots", 4,
                          "--compute-workers", 2, "--handshake-timeout-s", 0.2, workdir=tmp_path).check_ok()
    slow = result.events_named("child_start_slow")
    assert slow and all(event["children"] for event in slow)
    assert result.summary["tokens"] == 8


def test_a_stopped_child_fails_the_start_up_naming_it(leak_guard, pipeline_stores, tmp_path):
    """SIGSTOP of a compute worker before it is ready: it uses no CPU, so the start-up fails after the
    handshake timeout, naming it, and the stopped process is killed."""
    run = RunningPipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 8, "--cache-slots", 4,
                          "--compute-workers", 2, "--handshake-timeout-s", 3, "--shutdown-grace-s", 2,
                          workdir=tmp_path)
    try:
        name, pid = run.wait_for_child_spawned("mer-compute-0")
        os.kill(pid, signal.SIGSTOP)
        if any(event.get("event") == "child_ready" and event.get("child") == name for event in run.events()):
            os.kill(pid, signal.SIGCONT)
            pytest.fail(f"{name} was ready before it could be stopped")
        result = run.finish()
    finally:
        run.kill_if_running()
    assert result.returncode == 1 and result.stdout == ""
    assert re.search(rf"error: start-up timed out after \d+ s waiting for: .*{name}.* \(no CPU used and no I/O done in the last \d+ s\)",
                     result.stderr), result.stderr
    assert dead_or_gone(pid)


def dead_or_gone(pid: int) -> bool:
    return process_title(pid) == ""


def test_a_stale_run_of_a_dead_supervisor_is_removed_at_start_up(leak_guard, pipeline_stores, tmp_path):
    pid, start_time = dead_process()
    run_id = new_run_id()
    leak_guard.add_run(run_id)
    runtime = Path(os.environ["MER_RUNTIME_DIR"]) / f"mer-{run_id}"
    runtime.mkdir(mode=0o700)
    (runtime / SUPERVISOR_RECORD_NAME).write_text(f"{pid} {start_time}\n")
    (runtime / "io.sock").write_bytes(b"")
    arena = SlotArena.create(run_id, 2, 4096, supervisor_pid=pid)
    arena.close()  # as a killed supervisor leaves it
    hour_ago = time.time() - 3600
    for path in (runtime, runtime / SUPERVISOR_RECORD_NAME, arena_path(run_id)):
        os.utime(path, (hour_ago, hour_ago))

    result = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 2, "--cache-slots", 4,
                          "--compute-workers", 1, workdir=tmp_path).check_ok()
    assert not runtime.exists()
    assert not arena_path(run_id).exists()
    (removed,) = result.events_named("stale_runs_removed")
    assert run_id in removed["runs"]


def test_fewer_cache_slots_than_top_k_is_a_start_up_error(leak_guard, pipeline_stores, tmp_path):
    result = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 4, "--cache-slots", 2, "--top-k", 3,
                          workdir=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "cache_slots 2 is below top_k 3" in result.stderr
    assert result.events_named("child_spawned") == []  # refused before any process started


def test_a_failure_that_follows_a_death_is_reported_as_the_death(pipeline_stores):
    """The router may report its lost compute worker before the worker's death is seen: the user must
    still be told of the death (the cause), not of the router's failure (a consequence)."""
    supervisor = Supervisor(PipelineConfig(store=pipeline_stores["tiny"], compute_workers=1),
                            ExpertStore.open(pipeline_stores["tiny"]))
    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,), name="sleeper")
    process.start()
    try:
        name = f"mer-compute-0-{supervisor.run_id}"
        supervisor.children[name] = Child(name, "compute", 0, process, ready=True)
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        router_failure = ChildFailed(f"mer-router-{supervisor.run_id}", "mer.errors.PipelineError",
                                     "compute worker 0 is unreachable: it exited or disconnected", "")
        with pytest.raises(ChildDiedError, match=rf"{name} \(pid {process.pid}\) died: killed by SIGKILL"):
            asyncio.run(asyncio.wait_for(supervisor.failures.raise_for("ChildFailed", router_failure), 30))
    finally:
        process.kill()
        process.join(10)
        process.close()


def test_a_busy_supervisor_still_stops_when_cancelled(pipeline_stores):
    """A server stops its graph by cancelling `Supervisor.run` while reports keep arriving. An event
    that is ready at the moment of the cancel must not swallow it (Python 3.11's `asyncio.wait_for`
    does: `serve` then ignored SIGTERM for good, 1 run in ~10)."""
    supervisor = Supervisor(PipelineConfig(store=pipeline_stores["tiny"], compute_workers=1),
                            ExpertStore.open(pipeline_stores["tiny"]))

    async def cancel_as_an_event_arrives() -> bool:
        waiting = asyncio.create_task(supervisor._wait_job_done())
        await asyncio.sleep(0.05)  # waiting for its next event
        supervisor._events.put_nowait(("TokenGenerated", None))
        waiting.cancel()
        await asyncio.wait({waiting}, timeout=5)
        stopped = waiting.cancelled()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        return stopped

    assert asyncio.run(cancel_as_an_event_arrives())
