"""`ShardNode`: the Ray actor placed on one node of the cluster, that node's supervisor.

One is placed per node (mer.cluster.ray_cluster). It says where it runs (`describe`) and starts and
stops a child process on its node: today any command (the tests run a sleeping Python), later the
node's shard group (an I/O worker and its compute workers, docs/scale-out.md). The child gets
SIGKILL when the actor's process dies (PR_SET_PDEATHSIG), so a killed actor leaves no child behind.
The class is plain Python; `ray.remote` wraps it where it is placed, so importing it needs no Ray.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
from dataclasses import dataclass

from mer.errors import ConfigError
from mer.logging_setup import get_logger

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class NodeReport:
    """Where a `ShardNode` runs: Ray's node id (hex), the host's name and the actor process's pid."""

    node_index: int
    node_id: str
    hostname: str
    pid: int


class ShardNode:
    def __init__(self, node_index: int) -> None:
        self.node_index = node_index
        self.child: subprocess.Popen | None = None
        self.log = get_logger(worker="shard_node", node_index=node_index)

    def describe(self) -> NodeReport:
        import ray  # only ever called inside a Ray worker

        return NodeReport(self.node_index, ray.get_runtime_context().get_node_id(), socket.gethostname(),
                          os.getpid())

    def start_child(self, argv: list[str]) -> int:
        """Start `argv` on this node; its pid. One child at a time: a running one is an error."""
        if self.child is not None and self.child.poll() is None:
            raise ConfigError(f"shard node {self.node_index}: child {self.child.pid} is still running; "
                              "stop it before starting another")
        self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.log.info("shard_node_child_started", child_pid=self.child.pid, argv=argv)
        return self.child.pid

    def child_returncode(self) -> int | None:
        """None while the child runs (or when none was started), else its exit status."""
        return None if self.child is None else self.child.poll()

    def stop_child(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; the child's exit status (None if none was started)."""
        if self.child is None:
            return None
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        self.log.info("shard_node_child_stopped", child_pid=self.child.pid, returncode=self.child.returncode)
        return self.child.returncode


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the actor's process (the parent) dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
