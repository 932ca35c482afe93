"""`ShardNode`: the Ray actor placed on one node of the cluster, that node's supervisor.

One is placed per node (mer.cluster.ray_cluster). It says where it runs (`describe`) and starts and
stops a child process on its node: any command (`start_child`; the tests run a sleeping Python) or the
node's shard group (`start_shard_group`: `mer-pipeline shard-serve` over the node's store, an I/O
worker and its compute workers, returning its endpoint once it listens; docs/scale-out.md). The child gets
SIGKILL when the actor's process dies (PR_SET_PDEATHSIG), so a killed actor leaves no child behind.
The class is plain Python; `ray.remote` wraps it where it is placed, so importing it needs no Ray.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mer.cluster.shard_group_launch import (LISTEN_TIMEOUT_S, LOG_NAME, STDERR_NAME, STDOUT_NAME,
                                            ShardGroupEndpoint, ShardGroupSpec, shard_serve_argv,
                                            wait_for_listening)
from mer.errors import ConfigError
from mer.logging_setup import get_logger
from mer.runtime.supervisor_watch import set_parent_death_signal

SHARD_GROUP_STOP_TIMEOUT_S = 60.0  # the graph's own teardown (children, arena, runtime dir) on a busy node


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
        self.shard_group_dir: Path | None = None  # the group's files, when this actor made the directory
        self.log = get_logger(worker="shard_node", node_index=node_index)

    def describe(self) -> NodeReport:
        import ray  # only ever called inside a Ray worker

        return NodeReport(self.node_index, ray.get_runtime_context().get_node_id(), socket.gethostname(),
                          os.getpid())

    def start_child(self, argv: list[str], stdout=None, stderr=None) -> int:
        """Start `argv` on this node; its pid. One child at a time: a running one is an error."""
        if self.child is not None and self.child.poll() is None:
            raise ConfigError(f"shard node {self.node_index}: child {self.child.pid} is still running; "
                              "stop it before starting another")
        self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                      preexec_fn=_die_with_parent)
        self.log.info("shard_node_child_started", child_pid=self.child.pid, argv=argv)
        return self.child.pid

    def start_shard_group(self, spec: ShardGroupSpec, work_dir: str | None = None,
                          timeout_s: float = LISTEN_TIMEOUT_S) -> ShardGroupEndpoint:
        """Start this node's shard group (`shard-serve` bound to `tcp://<node ip>:0`) as the child and return
        its endpoint once it logs `shard_group_listening`. Its log, stdout and stderr go to `work_dir` (the
        caller's, kept) or to a directory of its own that `stop_shard_group` removes. A group that exits or
        does not listen within `timeout_s` is stopped and a ShardGroupStartError naming the node is raised."""
        import ray  # only ever called inside a Ray worker

        node_ip = ray.util.get_node_ip_address()
        if self.child is not None and self.child.poll() is None:
            raise ConfigError(f"shard node {self.node_index}: child {self.child.pid} is still running; "
                              "stop it before starting a shard group")
        if self.shard_group_dir is not None:  # a previous group's files (it failed or exited): replaced
            shutil.rmtree(self.shard_group_dir, ignore_errors=True)
            self.shard_group_dir = None
        if work_dir is None:
            directory = Path(tempfile.mkdtemp(prefix=f"mer-shard-group-{self.node_index}-"))
            self.shard_group_dir = directory
        else:
            directory = Path(work_dir)
            directory.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(directory / STDOUT_NAME, "wb") as stdout, open(directory / STDERR_NAME, "wb") as stderr:
            pid = self.start_child(shard_serve_argv(spec, node_ip, directory / LOG_NAME), stdout, stderr)
        try:
            endpoint = wait_for_listening(self.child, directory, self.node_index, node_ip, timeout_s)
        except Exception:
            self.stop_shard_group(remove_files=False)  # the error names the files: they stay
            raise
        seconds = round(time.monotonic() - started, 3)
        self.log.info("shard_node_group_listening", shard=spec.shard, endpoint=endpoint, child_pid=pid,
                      seconds=seconds)
        return ShardGroupEndpoint(self.node_index, node_ip, endpoint, pid, str(directory), seconds)

    def stop_shard_group(self, timeout_s: float = SHARD_GROUP_STOP_TIMEOUT_S, remove_files: bool = True) -> int | None:
        """SIGTERM to the shard group, which brings its graph down (children, arena, runtime directory), then
        its exit status (143 for a clean stop); SIGKILL only past `timeout_s`. Removes the directory that
        `start_shard_group` made (not the caller's `work_dir`)."""
        returncode = self.stop_child(timeout_s)
        if remove_files and self.shard_group_dir is not None:
            shutil.rmtree(self.shard_group_dir, ignore_errors=True)
            self.shard_group_dir = None
        return returncode

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
    set_parent_death_signal(signal.SIGKILL)
