"""A shard group per node of a throw-away local Ray cluster (`local:2`), started through each node's
`ShardNode` actor: each runs `mer-pipeline shard-serve` over its own shard store (`store shard 0/2` and
`1/2` of the tiny test store), bound to a free port of its node, and the actor returns the endpoint once
the group listens. A CURVE client sends a `ShardLayerRequest` to each endpoint for experts of that shard:
the outputs equal mer's expert computation in this process on the whole store, bit for bit (the
reference of test_shard_job). A group that cannot start (no store at its path) is an error naming the
node and the group's own message. Stopping each group through its actor is SIGTERM: the graph comes down
itself (exit 143, `job_cancelled`), and after the cluster's teardown the leak guard finds no process,
/dev/shm segment or runtime directory, and the cluster's Ray directory is gone."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from mer.cluster.keys import load_key_pair, load_public_key, write_key_files
from mer.cluster.process_tree import wait_gone
from mer.cluster.ray_cluster import ray_cluster
from mer.cluster.secure_socket import curve_client_socket
from mer.cluster.shard_group_launch import LOG_NAME, ShardGroupSpec, ShardGroupStartError, read_events
from mer.protocol import ShardLayerRequest, ShardLayerResult
from mer.store.reader import ExpertStore
from mer.store.shard_copy import copy_shard
from tests.integration.test_shard_job import EXPERT_SLICES, ask, reference_rows
from tests.support.pipeline_runs import HANDSHAKE_TIMEOUT_S

ray = pytest.importorskip("ray")  # in the `test` extra: the README's test command runs these

pytestmark = pytest.mark.slow  # a Ray cluster and two process graphs

NUM_SHARDS = 2
GRAPH_FLAGS = ("--compute-workers", "1", "--kernel-threads", "1", "--expert-slices", str(EXPERT_SLICES),
               "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S))


def test_each_node_serves_its_shard_through_its_actor_and_leaves_nothing(leak_guard, tmp_path, pipeline_stores):
    whole = ExpertStore.open(pipeline_stores["tiny"])
    manifest = whole.manifest
    keys = tmp_path / "keys"
    write_key_files(keys)
    specs = []
    for index in range(NUM_SHARDS):
        out = tmp_path / f"store-{index}of{NUM_SHARDS}"
        copy_shard(pipeline_stores["tiny"], out, (index, NUM_SHARDS))
        held = ExpertStore.open(out).manifest.shard.experts
        specs.append(ShardGroupSpec(str(out), str(keys), index, tuple(held), GRAPH_FLAGS))
    assert set(specs[0].experts).isdisjoint(specs[1].experts)
    assert set(specs[0].experts) | set(specs[1].experts) == set(range(manifest.geometry.num_experts))

    context = zmq.Context()
    clients = []
    try:
        with ray_cluster(f"local:{NUM_SHARDS}") as cluster:
            # a group that cannot start (no store at the path) is an error naming the node and what it said
            missing = ShardGroupSpec(str(tmp_path / "no-store"), str(keys), 0, None, GRAPH_FLAGS)
            with pytest.raises(ray.exceptions.RayTaskError) as raised:
                ray.get(cluster.nodes[0].actor.start_shard_group.remote(missing, str(tmp_path / "failed")))
            assert isinstance(raised.value.as_instanceof_cause(), ShardGroupStartError)
            message = str(raised.value)
            assert "shard node 0 (" in message and "exited with status" in message, message
            assert str(tmp_path / "no-store") in message, message  # its stderr says which store is missing

            started = time.monotonic()
            groups = ray.get([node.actor.start_shard_group.remote(spec, str(tmp_path / f"node-{index}"))
                              for index, (node, spec) in enumerate(zip(cluster.nodes, specs, strict=True))])
            both_listening_s = time.monotonic() - started
            for node, group in zip(cluster.nodes, groups, strict=True):
                assert group.node_index == node.report.node_index
                assert group.endpoint.startswith(f"tcp://{group.node_ip}:") and not group.endpoint.endswith(":0")
            assert ray.get([node.actor.child_returncode.remote() for node in cluster.nodes]) == [None, None]
            assert len({group.endpoint for group in groups}) == NUM_SHARDS

            rng = np.random.default_rng(170)
            d_model = manifest.geometry.d_model
            per_layer = manifest.geometry.experts_per_layer
            for request_id, (spec, group) in enumerate(zip(specs, groups, strict=True)):
                client = curve_client_socket(context, zmq.DEALER, load_key_pair(keys, "router"),
                                             load_public_key(keys, "shard"))
                clients.append(client)
                client.connect(group.endpoint)
                for moe_layer in range(manifest.geometry.num_moe_layers):
                    experts = [expert_id % per_layer for expert_id in spec.experts
                               if expert_id // per_layer == moe_layer][:3]
                    offsets = list(range(0, 2 * len(experts) + 1, 2))  # 2 rows per expert
                    x = rng.standard_normal((offsets[-1], d_model), dtype=np.float32)
                    request = ShardLayerRequest(request_id, request_id, moe_layer, experts, offsets, x)
                    result = ask(client, request)
                    assert isinstance(result, ShardLayerResult), result
                    result.check_answers(request)
                    assert result.shard == spec.shard
                    expected = reference_rows(whole, moe_layer, experts, offsets, x)
                    assert np.all(np.isfinite(expected)) and np.abs(expected).max() > 0
                    assert np.array_equal(result.outputs.view(np.uint32), expected.view(np.uint32))  # bit for bit

            returncodes = ray.get([node.actor.stop_shard_group.remote() for node in cluster.nodes])
            assert returncodes == [143, 143]  # SIGTERM, and the graph came down itself (never SIGKILL)
            processes = set(cluster.local_processes) | {group.pid for group in groups}
            ray_directory = cluster.ray_directory
    finally:
        for client in clients:
            client.close(linger=0)
        context.term()

    for index, group in enumerate(groups):
        events = [event.get("event") for event in read_events(Path(group.work_dir) / LOG_NAME)]
        assert group.work_dir == str(tmp_path / f"node-{index}")
        assert "shard_group_listening" in events and "job_cancelled" in events, events
    print(f"\nshard groups through the actors: {', '.join(f'{g.start_seconds:.1f} s' for g in groups)} "
          f"to listen (both, started together: {both_listening_s:.1f} s)")
    assert not ray.is_initialized()
    assert wait_gone(processes, 0.0) == set()
    assert not Path(ray_directory).exists()
    assert os.environ.get("RAY_TMPDIR") != ray_directory
