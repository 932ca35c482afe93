"""Starting a node's shard group (`mer-pipeline shard-serve`) from its `ShardNode` and knowing its endpoint.

`ShardGroupSpec` says what to serve: the node's store path (the same path on every node by default,
docs/scale-out.md), the key directory (a path every node reads), the shard index, the expert ids and any
graph flags of `shard-serve` (`--compute-workers 2`, ...). The group binds `tcp://<node ip>:0`: the
operating system of that node picks a free port when the group binds it (no window in which another
process could take a port chosen beforehand), and the group logs the bound endpoint in
`shard_group_listening`, which `wait_for_listening` reads from its log file and returns. A group that
exits, or does not log it within the timeout, is an error naming the node, its ip, what the group logged
last and its exit status and stderr.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mer.errors import ConfigError, PipelineError

LISTENING_EVENT = "shard_group_listening"
LISTEN_TIMEOUT_S = 120.0  # numba may compile the kernels at a group's first start on a busy node
POLL_INTERVAL_S = 0.05
LOG_NAME = "shard-serve.jsonl"
STDOUT_NAME = "shard-serve.stdout"
STDERR_NAME = "shard-serve.stderr"
SEEN_EVENTS_NAMED = 5  # the last events a start error names
STDERR_TAIL_CHARS = 2000


class ShardGroupStartError(PipelineError):
    """A shard group that exited or never logged `shard_group_listening` in time."""


@dataclass(frozen=True)
class ShardGroupSpec:
    """What a node's shard group serves; `graph_flags` are more `shard-serve` flags (`--compute-workers`, ...)."""

    store: str
    key_dir: str
    shard: int
    experts: tuple[int, ...] | None = None  # global ids; None: every expert of the store
    graph_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardGroupEndpoint:
    """A started shard group: where it listens, its pid, its files' directory and how long it took to listen."""

    node_index: int
    node_ip: str
    endpoint: str
    pid: int
    work_dir: str
    start_seconds: float


def mer_pipeline_command() -> str:
    """The `mer-pipeline` console script of this Python (the node's environment)."""
    found = shutil.which("mer-pipeline", path=str(Path(sys.executable).parent))
    if found is None:
        raise ConfigError(f"no mer-pipeline next to {sys.executable} on this node: install mer in its environment")
    return found


def format_expert_ids(experts: tuple[int, ...]) -> str:
    """Ascending ids as `shard-serve --experts` reads them: `0-3,8,10-11`."""
    ids = sorted(experts)
    if not ids or len(set(ids)) != len(ids) or ids[0] < 0:
        raise ConfigError(f"shard group experts {list(experts)[:16]}: not distinct ids >= 0")
    parts, first = [], ids[0]
    for previous, current in zip(ids, ids[1:] + [None], strict=True):
        if current != previous + 1:
            parts.append(str(first) if first == previous else f"{first}-{previous}")
            first = current
    return ",".join(parts)


def shard_serve_argv(spec: ShardGroupSpec, node_ip: str, log_file: Path) -> list[str]:
    argv = [mer_pipeline_command(), "shard-serve", "--store", spec.store, "--bind", f"tcp://{node_ip}:0",
            "--keys", spec.key_dir, "--shard", str(spec.shard), "--log-file", str(log_file), "--json"]
    if spec.experts is not None:
        argv += ["--experts", format_expert_ids(spec.experts)]
    return argv + list(spec.graph_flags)


def read_events(log_file: Path) -> list[dict]:
    """The complete JSON lines of the group's log so far (a line still being written is skipped)."""
    try:
        text = log_file.read_text()
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def wait_for_listening(child, work_dir: Path, node_index: int, node_ip: str, timeout_s: float) -> str:
    """The endpoint of the group's `shard_group_listening`; ShardGroupStartError if it exits or times out."""
    log_file = work_dir / LOG_NAME
    deadline = time.monotonic() + timeout_s
    while True:
        events = read_events(log_file)
        for event in events:
            if event.get("event") == LISTENING_EVENT:
                return event["endpoint"]
        returncode = child.poll()
        if returncode is not None or time.monotonic() >= deadline:
            what = (f"exited with status {returncode}" if returncode is not None
                    else f"did not log {LISTENING_EVENT} within {timeout_s:.0f} s")
            raise ShardGroupStartError(
                f"shard node {node_index} ({node_ip}): the shard group (pid {child.pid}) {what}; "
                f"its last events: {_last_events(events)}; stderr: {_stderr_tail(work_dir)!r} (files in {work_dir})")
        time.sleep(POLL_INTERVAL_S)


def _last_events(events: list[dict]) -> list[str]:
    return [f"{event.get('event')}" + (f" ({event['error']})" if "error" in event else "")
            for event in events[-SEEN_EVENTS_NAMED:]] or ["none"]


def _stderr_tail(work_dir: Path) -> str:
    try:
        return (work_dir / STDERR_NAME).read_text()[-STDERR_TAIL_CHARS:]
    except FileNotFoundError:
        return ""
