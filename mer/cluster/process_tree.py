"""Processes read from /proc (psutil is not a dependency): a process's live descendants, the processes
whose environment carries a variable, waiting for them to exit, killing them."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from mer.runtime.liveness import is_process_alive


def _parent_pids() -> dict[int, int]:
    parents = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = text[text.rfind(")") + 2:].split()
        if fields[0] not in ("Z", "X"):
            parents[int(name)] = int(fields[1])
    return parents


def live_descendants(pid: int) -> set[int]:
    """Pids of the live (not zombie) children of `pid`, their children, and so on."""
    children: dict[int, list[int]] = {}
    for child, parent in _parent_pids().items():
        children.setdefault(parent, []).append(child)
    found, frontier = set(), [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def processes_with_environment(name: str, value: str) -> set[int]:
    """Pids of the live processes (of this user) whose initial environment holds `name=value`,
    this process excluded. Children inherit the environment, so this finds them after re-parenting."""
    entry = f"{name}={value}".encode()
    found = set()
    for pid in _parent_pids():
        if pid == os.getpid():
            continue
        try:
            if entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    """Wait up to `timeout_s` for `pids` to exit; those still alive then."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = {pid for pid in pids if is_process_alive(pid)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
