"""A real `mer-pipeline serve` for the tests: started as a subprocess on a free port, driven over HTTP.

`ServerRun.start` runs the console script with `--port 0` and a log file, reads the port from its
start-up line on stderr and waits for `/health` to say ready. `stop` sends one signal to the server
process (as a service manager would) and waits for its exit; `leftovers` lists what of its run is
still on the machine (processes titled with the run id, `/dev/shm/mer-<run>-*`, the runtime
directory). A server fixture that outlives one test checks those itself (the per-test leak guard
starts after it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mer.serve.probe import parse_metrics
from tests.support.pipeline_runs import HANDSHAKE_TIMEOUT_S, MER_PIPELINE, read_json_lines, run_ids_in_log

START_TIMEOUT_S = 240.0  # two cores shared with other work: the graph's start-up can take a minute
_LISTENING = re.compile(r"on http://([0-9.]+):(\d+)/v1")


@dataclass
class ServerRun:
    """A running `mer-pipeline serve` (see the module docstring)."""

    process: subprocess.Popen
    log_path: Path
    host: str = ""
    port: int = 0
    stderr_lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, workdir: Path, *flags: Any, cache_dir: Path | None = None,
              command: tuple[str, ...] = ("serve",)) -> "ServerRun":
        log_path = workdir / f"serve-{os.getpid()}-{time.monotonic_ns()}.jsonl"
        argv = [MER_PIPELINE, *command, "--port", "0", "--log-file", str(log_path),
                "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S), *map(str, flags)]
        environment = dict(os.environ)
        if cache_dir is not None:
            environment["MER_CACHE_DIR"] = str(cache_dir)
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, env=environment)
        run = cls(process, log_path)
        threading.Thread(target=run._read_stderr, daemon=True).start()
        try:
            run._wait_ready()
        except BaseException:
            run.kill()
            raise
        return run

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr_lines.append(line)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}: {''.join(self.stderr_lines)}")
            if not self.port:
                match = next((m for m in map(_LISTENING.search, self.stderr_lines) if m), None)
                if match:
                    self.host, self.port = match.group(1), int(match.group(2))
            elif self.get("/health")[0] == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"serve was not ready within {START_TIMEOUT_S} s: {''.join(self.stderr_lines)}")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.base_url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return 0, ""

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def metrics(self) -> dict[str, float]:
        """`/metrics` parsed by prometheus_client's parser: {sample name{labels}: value}."""
        status, text = self.get("/metrics")
        assert status == 200, text
        return parse_metrics(text)

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in read_json_lines(self.log_path) if event.get("event") == name]

    def run_ids(self) -> set[str]:
        return run_ids_in_log(self.log_path)

    def stop(self, signal_number: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send one signal to the server process and wait for its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal_number)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"serve did not exit within {timeout_s} s of {signal.Signals(signal_number).name}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def leftovers(self, run_ids: set[str]) -> list[str]:
        """What of these runs is still on the machine: processes, /dev/shm segments, runtime directories."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            found += [f"process {pid} {title}" for run_id in run_ids if title.endswith(f"-{run_id}")]
        for run_id in run_ids:
            found += [f"/dev/shm/{name}" for name in os.listdir("/dev/shm") if name.startswith(f"mer-{run_id}-")]
            for base in {os.environ.get("MER_RUNTIME_DIR") or "", os.environ.get("XDG_RUNTIME_DIR") or "", "/tmp"}:
                if base and (Path(base) / f"mer-{run_id}").exists():
                    found.append(str(Path(base) / f"mer-{run_id}"))
        return found
