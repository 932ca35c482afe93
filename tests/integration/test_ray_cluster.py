"""A throw-away local Ray cluster (Ray's own `cluster_utils.Cluster`) of 2 and 3 nodes on this machine:
exactly one ShardNode actor per node, on distinct node ids; each starts a real child process on its
node; a killed actor takes its child with it; and after the `with` block no child, no actor and no
Ray process started for the cluster is alive, and its private Ray directory is gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from mer.cluster.process_tree import live_descendants, wait_gone
from mer.cluster.ray_cluster import ray_cluster
from mer.errors import ConfigError
from mer.runtime.liveness import is_process_alive

ray = pytest.importorskip("ray")  # in the `test` extra: the README's test command runs these

SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]
# leaves the actor's process group, which Ray kills when the actor dies: only PR_SET_PDEATHSIG ends it
SESSION_LEADER = [sys.executable, "-c", "import os, time; os.setsid(); time.sleep(300)"]
EXIT_WAIT_S = 10.0


def shared_ray_files() -> set[str]:
    """What is in /tmp/ray, Ray's default directory (shared with any other Ray user of the machine)."""
    shared = Path("/tmp/ray")
    return {str(path) for path in shared.rglob("*")} if shared.is_dir() else set()


def resident_mib(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


JOINER = """
import json, sys
import ray
from mer.cluster.ray_cluster import ray_cluster
placements = {}
for address in sys.argv[1:]:
    with ray_cluster(address) as cluster:
        placements[address] = [node.report.node_id for node in cluster.nodes]
    assert not ray.is_initialized()
print(json.dumps(placements))
"""


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: ppid is [1], the session id [3]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2:].split()


def parent_pid(pid: int) -> int:
    return int(stat_fields(pid)[1])


def wait_own_session(pid: int) -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    while int(stat_fields(pid)[3]) != pid:
        assert time.monotonic() < deadline, f"child {pid} did not call setsid()"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("num_nodes", [2, 3])
def test_local_cluster_places_one_shard_node_per_node_and_leaves_nothing(num_nodes):
    ray_directory_before = os.environ.get("RAY_TMPDIR")
    # children the test process already had (multiprocessing's resource tracker, started by an earlier
    # test, lives as long as pytest) are not the cluster's
    children_before = live_descendants(os.getpid())
    shared_ray_files_before = shared_ray_files()
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs, ray_cluster(f"local:{num_nodes}") as cluster:
        up_seconds = time.monotonic() - started
        alive_ids = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
        reports = [node.report for node in cluster.nodes]
        assert len(alive_ids) == num_nodes
        assert sorted(report.node_id for report in reports) == alive_ids  # one per node, all distinct
        assert [report.node_index for report in reports] == list(range(num_nodes))
        assert all(report.hostname == socket.gethostname() for report in reports)
        actor_pids = {report.pid for report in reports}
        assert len(actor_pids) == num_nodes and actor_pids <= cluster.local_processes
        assert Path(cluster.ray_directory).is_dir() and os.environ["RAY_TMPDIR"] == cluster.ray_directory
        # the address file that `auto` reads is in the private directory, not /tmp/ray
        assert Path(cluster.ray_directory, "ray", "ray_current_cluster").is_file()

        if num_nodes == 2:  # another process joins it by `auto` (the private RAY_TMPDIR's address file)
            # and by HOST:PORT: one actor per alive node by node affinity, taken down when it leaves
            joined = subprocess.run([sys.executable, "-c", JOINER, "auto", cluster.head_address],
                                    capture_output=True, text=True, timeout=120, check=True)
            placements = json.loads(joined.stdout.strip().splitlines()[-1])
            assert {address: sorted(ids) for address, ids in placements.items()} == {
                "auto": alive_ids, cluster.head_address: alive_ids}

        commands = [SLEEPER] * (num_nodes - 1) + [SESSION_LEADER]
        child_pids = ray.get([node.actor.start_child.remote(command)
                              for node, command in zip(cluster.nodes, commands, strict=True)])
        for report, child in zip(reports, child_pids, strict=True):
            assert is_process_alive(child) and parent_pid(child) == report.pid
        assert ray.get([node.actor.child_returncode.remote() for node in cluster.nodes]) == [None] * num_nodes
        with pytest.raises(ConfigError, match="is still running"):
            ray.get(cluster.nodes[0].actor.start_child.remote(SLEEPER))

        # a supervisor killed with SIGKILL takes its child with it, even one in its own session
        wait_own_session(child_pids[-1])
        os.kill(reports[-1].pid, signal.SIGKILL)
        assert wait_gone({reports[-1].pid, child_pids[-1]}, EXIT_WAIT_S) == set()
        assert all(is_process_alive(pid) for pid in child_pids[:-1])
        ray_processes = set(cluster.local_processes) | (live_descendants(os.getpid()) - children_before)
        ray_rss_mib = sum(resident_mib(pid) for pid in ray_processes)
        ray_directory = cluster.ray_directory
    events = {log["event"]: log for log in logs}
    print(f"\nlocal:{num_nodes}: up in {up_seconds:.1f} s, down in {events['ray_cluster_stopped']['seconds']:.1f} s, "
          f"{len(ray_processes)} processes, {ray_rss_mib:.0f} MiB resident (sum of RSS, shared pages counted per process)")

    assert not ray.is_initialized()
    assert wait_gone(ray_processes | set(child_pids) | actor_pids, 0.0) == set()
    assert "ray_process_killed" not in events  # Ray's own shutdown ended them all, not the safety net
    assert not Path(ray_directory).exists()
    assert shared_ray_files() == shared_ray_files_before
    assert os.environ.get("RAY_TMPDIR") == ray_directory_before


@pytest.mark.slow
def test_a_cluster_is_torn_down_when_the_block_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with ray_cluster("local:1") as cluster:
            child = ray.get(cluster.nodes[0].actor.start_child.remote(SLEEPER))
            processes = set(cluster.local_processes) | {child}
            ray_directory = cluster.ray_directory
            raise RuntimeError("boom")
    assert not ray.is_initialized()
    assert wait_gone(processes, 0.0) == set()
    assert not Path(ray_directory).exists()
