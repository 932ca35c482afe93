"""The supervisor or the router killed mid-run: every child exits on its own within 5 s, and the run's
shared memory and runtime directory are removed by the last process out (`mer.runtime.membership`).

Real `mer-pipeline run` and `generate` processes, killed with SIGKILL through their real pids; the
children are found by their process titles in /proc, the resources by their names. Each test measures
the time from the kill to the moment nothing of the run is left, and asserts it is under 5 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from mer.runtime.paths import SHM_DIR, runtime_base_dir
from tests.support.generate_runs import generate_argv
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.pipeline_runs import RunningPipeline, read_json_lines, run_ids_in_log

pytestmark = pytest.mark.slow  # starts the process graph

EXIT_BOUND_S = 5.0
LONG_RUN_TOKENS = 20_000  # minutes of work: every test below ends the run long before


def run_processes(run_id: str) -> dict[int, str]:
    """{pid: title} of the live (not zombie) processes titled `mer-...-<run_id>`."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            title = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if title.startswith("mer-") and title.endswith(f"-{run_id}") and state not in ("Z", "X"):
            found[int(name)] = title
    return found


def run_resources(run_id: str) -> list[Path]:
    """The run's /dev/shm files and runtime directory that exist."""
    shm = [SHM_DIR / name for name in os.listdir(SHM_DIR) if name.startswith(f"mer-{run_id}-")]
    directory = runtime_base_dir() / f"mer-{run_id}"
    return shm + ([directory] if directory.exists() else [])


def seconds_until_gone(run_id: str, since: float, timeout_s: float = 20.0) -> float:
    """Seconds from `since` until no process, /dev/shm file or runtime directory of the run is left."""
    while run_processes(run_id) or run_resources(run_id):
        if time.monotonic() - since > timeout_s:
            raise AssertionError(f"left {timeout_s:g} s after the kill: {run_processes(run_id)} {run_resources(run_id)}")
        time.sleep(0.01)
    return time.monotonic() - since


def started_run_id(log_path: Path) -> str:
    (run_id,) = {str(event["run_id"]) for event in read_json_lines(log_path)
                 if event.get("event") == "run_started_supervisor"}
    return run_id


def assert_removed_by_last_child(log_path: Path, run_id: str) -> None:
    removals = [event for event in read_json_lines(log_path) if event.get("event") == "run_resources_removed"]
    assert len(removals) == 1, removals  # exactly one member cleans
    (removal,) = removals
    assert removal["run_id"] == run_id and removal["by"] == "last child out"
    assert f"{SHM_DIR}/mer-{run_id}-arena" in removal["paths"]
    assert str(runtime_base_dir() / f"mer-{run_id}") in removal["paths"]
    lost = [event for event in read_json_lines(log_path) if event.get("event") == "supervisor_lost"]
    assert lost, "no child logged the supervisor's death"


@pytest.fixture
def long_run(leak_guard, pipeline_stores, tmp_path):
    run = RunningPipeline(leak_guard, pipeline_stores["tiny"], "--tokens", LONG_RUN_TOKENS, "--cache-slots", 4,
                          "--compute-workers", 2, workdir=tmp_path)
    try:
        run.wait_for_event("token_done", count=3)
        yield run
    finally:
        run.kill_if_running()


def test_kill_9_of_the_supervisor_of_a_run_leaves_nothing(long_run):
    run_id = started_run_id(long_run.log_path)
    children = run_processes(run_id)
    assert len(children) == 5, children  # io, predictor, 2 compute workers, router
    assert len(run_resources(run_id)) == 2  # the arena and the runtime directory

    killed_at = time.monotonic()
    os.kill(long_run.process.pid, signal.SIGKILL)
    seconds = seconds_until_gone(run_id, killed_at)
    long_run.process.communicate(timeout=10)

    assert long_run.process.returncode == -signal.SIGKILL
    assert seconds < EXIT_BOUND_S, seconds
    assert_removed_by_last_child(long_run.log_path, run_id)
    print(f"supervisor kill -9: children gone and resources removed {seconds * 1000:.0f} ms after the kill")


def test_kill_9_of_the_router_brings_the_run_down_and_leaves_nothing(long_run):
    run_id = started_run_id(long_run.log_path)
    name, pid = long_run.child_pid("mer-router-")

    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    seconds = seconds_until_gone(run_id, killed_at)
    result = long_run.finish(timeout_s=30)

    assert result.returncode == 1
    assert f"{name} (pid {pid}) died: killed by SIGKILL" in result.stderr
    assert seconds < EXIT_BOUND_S, seconds
    print(f"router kill -9: graph down and resources removed {seconds * 1000:.0f} ms after the kill")


def test_kill_9_of_the_supervisor_of_a_generation_leaves_nothing(leak_guard, tmp_path):
    model = write_tiny_moe_gguf(tmp_path / "tiny.gguf", n_layers=2, n_experts=8, top_k=2, seed=5).path
    log_path = tmp_path / f"generate-{uuid.uuid4().hex[:8]}.jsonl"
    argv = generate_argv(model, "--prompt", "a b c", "-n", 100_000, "--ignore-eos", "--compute-workers", 1,
                         "--cache-slots", 4, log_path=log_path)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MER_CACHE_DIR": str(tmp_path / "cache")})
    leak_guard.add_supervisor_pid(process.pid)
    try:
        deadline = time.monotonic() + 120
        while not any(event.get("event") == "generation_token" for event in read_json_lines(log_path)):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no generated token within 120 s"
            time.sleep(0.02)
        run_id = started_run_id(log_path)
        for found in run_ids_in_log(log_path):
            leak_guard.add_run(found)
        assert len(run_processes(run_id)) == 4  # io, predictor, 1 compute worker, router

        killed_at = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)
        seconds = seconds_until_gone(run_id, killed_at)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)

    assert seconds < EXIT_BOUND_S, seconds
    assert_removed_by_last_child(log_path, run_id)
