"""Helpers for the tests of `mer-pipeline generate`: the CLI as a subprocess, and the graph's memory.

Every run goes through the real console script with a log file (so the leak guard of
`tests/conftest.py` learns its run id) and a timeout, and with `MER_CACHE_DIR` pointing at the test's
cache directory (the implicit conversion writes its store there). `GraphMemory` samples the
proportional set size (Pss, `/proc/PID/smaps_rollup`: a shared page counts once, split between the
processes sharing it) of the CLI and all its descendants while it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.pipeline_runs import HANDSHAKE_TIMEOUT_S, MER_PIPELINE, read_json_lines, run_ids_in_log

GENERATE_TIMEOUT_S = 120.0  # generous: the machine has 2 cores shared with other work


@dataclass
class GenerateRun:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    log_path: Path
    peak_pss_bytes: int = 0

    @property
    def result(self) -> dict[str, Any]:
        """The `--json` object: stdout must be exactly one JSON object."""
        assert self.returncode == 0, f"generate failed ({self.returncode}): {self.stderr}"
        return json.loads(self.stdout)

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in read_json_lines(self.log_path) if event.get("event") == name]


def generate_argv(model: Path, *flags: Any, log_path: Path, as_json: bool = True) -> list[str]:
    argv = [MER_PIPELINE, "generate", "--model", str(model), "--log-file", str(log_path),
            "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S), *map(str, flags)]
    return argv + (["--json"] if as_json else [])


def run_generate(guard, model: Path, *flags: Any, workdir: Path, cache_dir: Path, as_json: bool = True,
                 timeout_s: float = GENERATE_TIMEOUT_S, sample_memory: bool = False) -> GenerateRun:
    """Run `mer-pipeline generate --model MODEL FLAGS... [--json]` to its end (killed after `timeout_s`)."""
    log_path = workdir / f"generate-{uuid.uuid4().hex[:8]}.jsonl"
    argv = generate_argv(model, *flags, log_path=log_path, as_json=as_json)
    environment = {**os.environ, "MER_CACHE_DIR": str(cache_dir)}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    guard.add_supervisor_pid(process.pid)
    memory = GraphMemory(process.pid) if sample_memory else None
    try:
        if memory is not None:
            memory.sample_until_exit(process, timeout_s)
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"generate did not exit within {timeout_s:g} s:\n{stderr}") from None
    finally:
        for run_id in run_ids_in_log(log_path):
            guard.add_run(run_id)
    return GenerateRun(argv, process.returncode, stdout, stderr, log_path,
                       memory.peak_bytes if memory is not None else 0)


def run_cli_to_end(guard, argv: list[str], *, cache_dir: Path, log_path: Path | None = None,
                   timeout_s: float = GENERATE_TIMEOUT_S) -> tuple[int, str, str]:
    """Run a `mer-pipeline` command line (no stdin) to its end under the leak guard: (returncode, stdout, stderr)."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "MER_CACHE_DIR": str(cache_dir)})
    guard.add_supervisor_pid(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(argv[1:3])} did not exit within {timeout_s:g} s:\n{stderr}") from None
    finally:
        for run_id in run_ids_in_log(log_path) if log_path is not None else ():
            guard.add_run(run_id)
    return process.returncode, stdout, stderr


def _parent_of(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(text[text.rfind(")") + 2:].split()[1])


def descendants(root: int) -> list[int]:
    """`root` and every live process below it."""
    parents = {int(name): _parent_of(int(name)) for name in os.listdir("/proc") if name.isdigit()}
    found, frontier = [root], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def pss_bytes(pid: int) -> int:
    """Pss of one process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    return 0


class GraphMemory:
    """The largest sum of Pss over the CLI and its descendants seen while it runs."""

    def __init__(self, root: int, interval_s: float = 0.02):
        self.root = root
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.samples = 0

    def sample_until_exit(self, process: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            self.peak_bytes = max(self.peak_bytes, sum(pss_bytes(pid) for pid in descendants(self.root)))
            self.samples += 1
            time.sleep(self.interval_s)
