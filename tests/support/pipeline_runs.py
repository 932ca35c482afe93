"""Helpers for the tests of the process graph: small stores on disk and `mer-pipeline run` as a subprocess.

Every run goes through the real console script (a real supervisor process spawning the I/O worker,
the predictor, the compute workers and the router), always with a log file, so that a test can
read the run's events (`events`) and the leak guard of `tests/conftest.py` learns the run id.
Every wait has a timeout: a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MER_PIPELINE = shutil.which("mer-pipeline", path=str(Path(sys.executable).parent)) or "mer-pipeline"
RUN_TIMEOUT_S = 120.0  # generous: the machine has 2 cores shared with other work
HANDSHAKE_TIMEOUT_S = 100.0  # numba may compile the kernels at start-up when its cache is stale
PAGE = 4096

# The issue's `run --json` keys (more may be added).
SUMMARY_KEYS = (
    "wall_s", "tokens", "sustained_tps", "avg_throughput_mibps", "hit_rate_pct", "experts", "top_k",
    "cache_slots", "pool_slots", "d_model", "d_ff", "bytes_per_expert", "dtype", "hits", "misses",
    "prefetches_issued", "prefetches_completed", "prefetches_used", "prefetches_wasted", "prefetches_dropped",
    "predictor_observations", "reads", "bytes_read", "io_latency_us", "compute_us", "cycle_us",
    "io_wait_us_per_token", "compute_us_per_token", "io_share_pct", "compute_workers", "io_backend",
)


def filesystem_type(path: Path) -> str:
    command = ["stat", "-f", "-c", "%T", str(path)]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def round_up_to_page(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (a last line still being written is skipped)."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


@dataclass
class PipelineRun:
    """A finished `mer-pipeline run`: exit status, output, wall time and the log's events."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    log_path: Path

    @property
    def events(self) -> list[dict[str, Any]]:
        return read_json_lines(self.log_path)

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("event") == name]

    @property
    def summary(self) -> dict[str, Any]:
        """The `--json` summary: stdout must be exactly one JSON object."""
        assert self.returncode == 0, f"run failed ({self.returncode}): {self.stderr}"
        return json.loads(self.stdout)

    def check_ok(self) -> "PipelineRun":
        assert self.returncode == 0, f"{' '.join(self.argv)} exited {self.returncode}:\n{self.stderr}"
        return self


def run_ids_in_log(log_path: Path) -> set[str]:
    """Run ids named in a log: the supervisor's `run_started_supervisor` and the children's `run_id`."""
    return {str(event["run_id"]) for event in read_json_lines(log_path) if event.get("run_id")}


def pipeline_argv(store: Path, *flags: Any, log_path: Path, as_json: bool = True) -> list[str]:
    argv = [MER_PIPELINE, "run", "--store", str(store), "--log-file", str(log_path),
            "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S), *map(str, flags)]
    return argv + (["--json"] if as_json else [])


def run_pipeline(guard, store: Path, *flags: Any, workdir: Path, as_json: bool = True,
                 timeout_s: float = RUN_TIMEOUT_S) -> PipelineRun:
    """Run `mer-pipeline run --store STORE FLAGS... --log-file <new file in workdir> [--json]` to the end."""
    log_path = workdir / f"run-{uuid.uuid4().hex[:8]}.jsonl"
    argv = pipeline_argv(store, *flags, log_path=log_path, as_json=as_json)
    started = time.monotonic()
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    finally:
        for run_id in run_ids_in_log(log_path):
            guard.add_run(run_id)
    return PipelineRun(argv, completed.returncode, completed.stdout, completed.stderr,
                       time.monotonic() - started, log_path)


class RunningPipeline:
    """A `mer-pipeline run` started in the background, for tests that signal or kill a process of it."""

    def __init__(self, guard, store: Path, *flags: Any, workdir: Path):
        log_path = workdir / f"run-{uuid.uuid4().hex[:8]}.jsonl"
        self._start(guard, pipeline_argv(store, *flags, log_path=log_path), log_path)

    @classmethod
    def command(cls, guard, argv: list[str], log_path: Path) -> "RunningPipeline":
        """Any `mer-pipeline` command line (`generate_argv(...)`, say) that logs to `log_path`, started."""
        running = cls.__new__(cls)
        running._start(guard, argv, log_path)
        return running

    def _start(self, guard, argv: list[str], log_path: Path) -> None:
        self.guard = guard
        self.log_path = log_path
        self.argv = argv
        self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        guard.add_supervisor_pid(self.process.pid)

    @classmethod
    def of_argv(cls, guard, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> "RunningPipeline":
        """Any `mer-pipeline` command line that writes its log to `log_path` (e.g. `generate`), in the background."""
        running = cls.__new__(cls)
        running.guard, running.log_path, running.argv = guard, log_path, argv
        running.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        guard.add_supervisor_pid(running.process.pid)
        return running

    def events(self) -> list[dict[str, Any]]:
        return read_json_lines(self.log_path)

    def wait_for_event(self, name: str, count: int = 1, timeout_s: float = RUN_TIMEOUT_S) -> list[dict[str, Any]]:
        """Wait until the log holds `count` events `name` (fails if the run ends or time runs out)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [event for event in self.events() if event.get("event") == name]
            if len(found) >= count:
                for run_id in run_ids_in_log(self.log_path):
                    self.guard.add_run(run_id)
                return found
            if self.process.poll() is not None:
                stdout, stderr = self.process.communicate()
                raise AssertionError(f"the run ended ({self.process.returncode}) before {count} {name} events:\n{stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} {name} events within {timeout_s:g} s")
            time.sleep(0.02)

    def wait_for_child_spawned(self, child_name_prefix: str, timeout_s: float = RUN_TIMEOUT_S) -> tuple[str, int]:
        """(name, pid) of the child whose name starts with `child_name_prefix`, as soon as it is spawned."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == "child_spawned" and str(event["child"]).startswith(child_name_prefix):
                    for run_id in run_ids_in_log(self.log_path):
                        self.guard.add_run(run_id)
                    return str(event["child"]), int(event["child_pid"])
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended ({self.process.returncode}) before {child_name_prefix} started")
            time.sleep(0.01)
        raise AssertionError(f"no child {child_name_prefix}* spawned within {timeout_s:g} s")

    def child_pid(self, child_name_prefix: str) -> tuple[str, int]:
        """(name, pid) of the child whose name starts with `child_name_prefix`, from `child_spawned`."""
        for event in self.events():
            if event.get("event") == "child_spawned" and str(event["child"]).startswith(child_name_prefix):
                return str(event["child"]), int(event["child_pid"])
        raise AssertionError(f"no child {child_name_prefix}* in the log")

    def finish(self, timeout_s: float = RUN_TIMEOUT_S) -> PipelineRun:
        """Wait for the CLI to exit (killing it if it does not in time) and return its result."""
        started = time.monotonic()
        try:
            stdout, stderr = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            stdout, stderr = self.process.communicate()
            raise AssertionError(f"the run did not exit within {timeout_s:g} s:\n{stderr}") from None
        finally:
            for run_id in run_ids_in_log(self.log_path):
                self.guard.add_run(run_id)
        return PipelineRun(self.argv, self.process.returncode, stdout, stderr,
                           time.monotonic() - started, self.log_path)

    def send_signal(self, number: signal.Signals) -> None:
        self.process.send_signal(number)

    def kill_if_running(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def process_title(pid: int) -> str:
    """argv[0] of a process as /proc shows it (the title a child of the graph sets), '' if gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def dead_process() -> tuple[int, int]:
    """(pid, start time in clock ticks) of a process that has exited and been reaped."""
    code = "import os; from mer.runtime.liveness import process_start_time as t; print(os.getpid(), t(os.getpid()))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    pid, start_time = map(int, completed.stdout.split())
    return pid, start_time
