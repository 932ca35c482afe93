"""A Ray cluster with one `ShardNode` actor per node, up for the length of a `with` block.

    with ray_cluster("local:2") as cluster:
        for node in cluster.nodes:        # one per Ray node, on distinct node ids
            node.report.node_id, node.actor.start_child.remote([...])

`local:N` starts a throw-away cluster of N nodes on this machine with Ray's own test utilities
(`ray.cluster_utils.Cluster`): each node with 1 CPU, a small object store, no dashboard, no
autoscaler monitor, and a custom resource `mer_node_<i>` (quantity 1) naming it, which the i-th
actor asks for, so exactly one actor lands on each node. Its Ray files (sessions, logs, sockets, the
`ray_current_cluster` address file) go under a private `/tmp/mer-ray-*` directory (`RAY_TMPDIR`,
set while the cluster is up) that teardown removes, so nothing grows in /tmp/ray and `auto` in
another process never finds this cluster. `auto`, `HOST:PORT` and `ray://HOST:PORT` join an existing
cluster and place one actor on each alive node by node affinity (not a soft preference).

Leaving the block, however it is left: each actor stops its child (`stop_shard_group`: SIGTERM, SIGKILL
only past half of CHILD_STOP_TIMEOUT_S), the actors are killed, the
driver disconnects; for `local:N` the nodes are shut down, then every process this process started
for the cluster (found in /proc as its descendants when the cluster was up) is waited for and, past
`PROCESS_EXIT_GRACE_S`, killed with a `ray_process_killed` warning; the private directory goes last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mer.cluster.cluster_address import ClusterAddress, parse_cluster_address
from mer.cluster.process_tree import kill_all, processes_with_environment, wait_gone
from mer.cluster.shard_node import NodeReport, ShardNode
from mer.errors import ConfigError
from mer.logging_setup import get_logger

OBJECT_STORE_BYTES = 80 * 1024 * 1024  # per local node; Ray's own minimum is 75 MiB
ACTOR_START_TIMEOUT_S = 60.0
CHILD_STOP_TIMEOUT_S = 30.0  # a shard group's graph comes down on SIGTERM; SIGKILL only past half of it
PROCESS_EXIT_GRACE_S = 10.0
NODE_RESOURCE_PREFIX = "mer_node_"
_RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0"}  # no usage report from a test or a local trial


@dataclass(frozen=True)
class PlacedNode:
    """One node of the cluster and the `ShardNode` actor placed on it."""

    report: NodeReport
    actor: Any  # a Ray ActorHandle of ShardNode


@dataclass
class RayCluster:
    address: ClusterAddress
    nodes: list[PlacedNode]
    local_processes: set[int] = field(default_factory=set)  # local:N: the processes started for it, when up
    ray_directory: str | None = None  # local:N: the private RAY_TMPDIR
    head_address: str | None = None  # local:N: the head's HOST:PORT, which other processes can join


@contextlib.contextmanager
def ray_cluster(address: str | ClusterAddress) -> Iterator[RayCluster]:
    """Bring the cluster up (or join it), place one `ShardNode` per node, and always take it down."""
    parsed = parse_cluster_address(address) if isinstance(address, str) else address
    ray = _import_ray(parsed)
    if ray.is_initialized():
        raise ConfigError(f"--cluster {parsed.text!r}: this process is already connected to a Ray cluster")
    log = get_logger(worker="ray_cluster")
    cluster = RayCluster(parsed, [])
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            _bring_up(ray, cluster, stack)
            log.info("ray_cluster_started", cluster=parsed.text, num_nodes=len(cluster.nodes),
                     node_ids=[node.report.node_id for node in cluster.nodes],
                     seconds=round(time.monotonic() - started, 3))
            try:
                yield cluster
            finally:
                started = time.monotonic()
    finally:
        log.info("ray_cluster_stopped", cluster=parsed.text, num_nodes=len(cluster.nodes),
                 seconds=round(time.monotonic() - started, 3))


def _bring_up(ray, cluster: RayCluster, stack: contextlib.ExitStack) -> None:
    """Each step registers its own undoing on `stack` as soon as it is done."""
    if cluster.address.kind == "local":
        _start_local(ray, cluster.address.num_local_nodes, cluster, stack)
    else:
        _join(ray, cluster.address, stack)
    cluster.nodes = _place_shard_nodes(ray, cluster.address, stack)
    if cluster.address.kind == "local":
        cluster.local_processes = _local_processes(cluster)


def _import_ray(address: ClusterAddress):
    try:
        import ray
    except ImportError as error:
        raise ConfigError(f"--cluster {address.text!r} needs Ray: pip install 'mer[ray]'") from error
    if address.is_ray_client:
        try:
            import grpc  # noqa: F401  (Ray Client's transport)
        except ImportError as error:
            raise ConfigError(f"--cluster {address.text!r} joins through Ray Client, which needs "
                              "pip install 'ray[client]'; or give the head's HOST:PORT") from error
    return ray


def _start_local(ray, num_nodes: int, cluster: RayCluster, stack: contextlib.ExitStack) -> None:
    from ray.cluster_utils import Cluster

    directory = tempfile.mkdtemp(prefix="mer-ray-", dir="/tmp")
    cluster.ray_directory = directory
    stack.callback(shutil.rmtree, directory, True)
    stack.enter_context(_environment({"RAY_TMPDIR": directory, **_RAY_ENVIRONMENT}))
    stack.callback(_reap, cluster)
    local = Cluster(initialize_head=False, shutdown_at_exit=True)
    stack.callback(local.shutdown)
    for index in range(num_nodes):
        local.add_node(**_local_node_arguments(index))
    local.wait_for_nodes()
    cluster.head_address = local.address
    _ray_errors_to_stderr(stack)
    ray.init(address=local.address, logging_level="warning", log_to_driver=False)
    stack.callback(ray.shutdown)


def _ray_errors_to_stderr(stack: contextlib.ExitStack) -> None:
    """Ray's driver prints the cluster's error messages (a worker that died, ...) to stdout, even with
    `log_to_driver=False`; a command's stdout carries only its own output (`--json`), so while the cluster
    is up they go to stderr. (Ray 2.60's `ray._private.worker.print_to_stdstream`, looked up by name when
    its error listener prints; pinned in pyproject.)"""
    from ray._private import worker

    original = worker.print_to_stdstream

    def print_to_stderr(data, ignore_prefix: bool):
        original({**data, "is_err": True}, ignore_prefix)

    worker.print_to_stdstream = print_to_stderr
    stack.callback(setattr, worker, "print_to_stdstream", original)


def _local_node_arguments(index: int) -> dict:
    arguments = {"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES, "include_log_monitor": False,
                 "resources": {f"{NODE_RESOURCE_PREFIX}{index}": 1}}
    if index == 0:  # the head
        arguments.update(include_dashboard=False, no_monitor=True)
    return arguments


def _join(ray, address: ClusterAddress, stack: contextlib.ExitStack) -> None:
    stack.enter_context(_environment(_RAY_ENVIRONMENT))
    _ray_errors_to_stderr(stack)
    try:
        ray.init(address=address.ray_address, logging_level="warning", log_to_driver=False)
    except (ConnectionError, RuntimeError) as error:
        raise ConfigError(f"--cluster {address.text!r}: cannot join the Ray cluster: {error}") from error
    stack.callback(ray.shutdown)


def _place_shard_nodes(ray, address: ClusterAddress, stack: contextlib.ExitStack) -> list[PlacedNode]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_shard_node = ray.remote(ShardNode)
    alive = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
    actors = []
    for index, node_id in enumerate(alive):
        if address.kind == "local":
            options = {"resources": {f"{NODE_RESOURCE_PREFIX}{index}": 1}}
        else:
            options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}
        actor = remote_shard_node.options(num_cpus=0, **options).remote(index)
        actors.append(actor)
        stack.callback(_stop_shard_node, ray, actor)
    try:
        reports = ray.get([actor.describe.remote() for actor in actors], timeout=ACTOR_START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as error:
        raise ConfigError(f"--cluster {address.text!r}: the ShardNode actors were not all running on their "
                          f"nodes {alive} within {ACTOR_START_TIMEOUT_S:.0f} s") from error
    node_ids = [report.node_id for report in reports]
    if len(set(node_ids)) != len(node_ids) or set(node_ids) != set(alive):
        raise ConfigError(f"--cluster {address.text!r}: the shard nodes landed on nodes {node_ids}, "
                          f"not one on each of {alive}")
    return [PlacedNode(report, actor) for report, actor in zip(reports, actors, strict=True)]


def _stop_shard_node(ray, actor) -> None:
    try:
        ray.get(actor.stop_shard_group.remote(CHILD_STOP_TIMEOUT_S / 2), timeout=CHILD_STOP_TIMEOUT_S)
    except Exception as error:  # it died (its child with it) or did not answer: killed below all the same
        get_logger(worker="ray_cluster").warning("shard_node_stop_failed", error=repr(error))
    ray.kill(actor)


def _local_processes(cluster: RayCluster) -> set[int]:
    """Every process started for a local cluster, found by the private RAY_TMPDIR they all inherit."""
    return processes_with_environment("RAY_TMPDIR", cluster.ray_directory)


def _reap(cluster: RayCluster) -> None:
    """After the nodes' shutdown: wait for what was started for the cluster, kill what is left."""
    survivors = wait_gone(_local_processes(cluster) | cluster.local_processes, PROCESS_EXIT_GRACE_S)
    if survivors:
        get_logger(worker="ray_cluster").warning("ray_process_killed", pids=sorted(survivors),
                                                 cluster=cluster.address.text)
        kill_all(survivors)
        wait_gone(survivors, PROCESS_EXIT_GRACE_S)


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
