"""`RemoteShards` (mer/router/remote_shards.py) against two real `mer-pipeline shard-serve` groups (each a
real graph: router, I/O worker, predictor, 2 compute workers, over the tiny q4_0 store) over real tcp
with real CURVE, from a client in this process.

One test, in phases, so that the two graphs start once (run with -s to print how long it took):

1. a uniform 2-shard map without replicas (expert e on shard e % 2): `run_layer` outputs, several
   experts of both layers, two calls in flight at once, equal mer's expert computation in this process
   bit for bit (`reference_rows` of test_shard_job.py); an f16 client's outputs equal that reference
   on the f16-rounded rows, rounded to f16, bit for bit;
2. a map with replicas=2 (every expert on both shards): the calls go to shard 0 (equal queues: the
   lowest id); shard 0's whole process group is killed with SIGKILL; the next call fails over to shard 1
   after the deadline (`shard_failed_over` logged with the shard, the experts and the reason) and its
   outputs are still bit-identical, and the call after that goes straight to shard 1;
3. the map without replicas and shard 0 dead: a call with experts on both shards fails within about
   the deadline with `ShardUnavailableError` naming shard 0 and its experts (no partial answer).

Shard 1 is stopped with SIGTERM (exit 143); the killed group's runtime directory and shared memory are
removed with mer's own `remove_run`; the leak guard checks that nothing is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid

import numpy as np
import pytest
import structlog

from mer.cluster.keys import write_key_files
from mer.cluster.shard_balance import uniform_map
from mer.cluster.wire_precision import from_wire, to_wire
from mer.errors import ShardUnavailableError
from mer.router.remote_shards import RemoteShards
from mer.store.reader import ExpertStore
from tests.integration.test_shard_job import EXPERT_SLICES, reference_rows
from tests.support.process_groups import kill_process_group, remove_runs_of_log
from tests.support.pipeline_runs import HANDSHAKE_TIMEOUT_S, MER_PIPELINE, RunningPipeline

pytestmark = pytest.mark.slow  # starts two process graphs

LAYERS, EXPERTS_PER_LAYER = 2, 8
WORKING_DEADLINE_S = 30.0  # a live shard on a loaded 2-core machine answers well within it
FAILOVER_DEADLINE_S = 4.0  # also what the live shard 1 must answer within: generous for a loaded machine
UNAVAILABLE_DEADLINE_S = 2.0


def start_group(leak_guard, tmp_path, store, keys, shard: int) -> RunningPipeline:
    """`shard-serve` as shard `shard`, serving every expert of the tiny store, in a session of its own (so
    that its whole process group can be killed)."""
    log_path = tmp_path / f"shard{shard}-{uuid.uuid4().hex[:8]}.jsonl"
    argv = [MER_PIPELINE, "shard-serve", "--store", str(store), "--bind", "tcp://127.0.0.1:0", "--keys", str(keys),
            "--shard", str(shard), "--compute-workers", "1", "--kernel-threads", "1",
            "--expert-slices", str(EXPERT_SLICES), "--log-file", str(log_path),
            "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S)]
    running = RunningPipeline.__new__(RunningPipeline)
    running.guard, running.log_path, running.argv = leak_guard, log_path, argv
    running.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
    leak_guard.add_supervisor_pid(running.process.pid)
    return running


def kill_group(running: RunningPipeline) -> None:
    """SIGKILL to the shard group's whole process group; wait until none of it is left; remove its run's
    runtime directory and shared memory as a later supervisor's stale-run clean-up would."""
    group = running.process.pid
    os.killpg(group, signal.SIGKILL)
    running.process.communicate(timeout=30)
    kill_process_group(group)
    remove_runs_of_log(running.guard, running.log_path)


def expected_outputs(store: ExpertStore, layer: int, batches: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    return {expert: reference_rows(store, layer, [expert], [0, rows.shape[0]], rows) for expert, rows in batches.items()}


def assert_bits_equal(outputs: dict[int, np.ndarray], expected: dict[int, np.ndarray]) -> None:
    assert sorted(outputs) == sorted(expected)
    for expert, rows in expected.items():
        assert outputs[expert].dtype == np.float32 and outputs[expert].shape == rows.shape
        assert np.array_equal(outputs[expert].view(np.uint32), rows.view(np.uint32)), f"expert {expert}"


def test_remote_shards_bit_identical_fail_over_and_unavailable(leak_guard, tmp_path, pipeline_stores):
    store_path = pipeline_stores["tiny"]
    store = ExpertStore.open(store_path)
    d_model = store.manifest.geometry.d_model
    keys = tmp_path / "keys"
    write_key_files(keys)
    groups: list[RunningPipeline] = []
    begun = time.monotonic()
    try:
        for shard in (0, 1):
            groups.append(start_group(leak_guard, tmp_path, store_path, keys, shard))
        endpoints = [running.wait_for_event("shard_group_listening")[0]["endpoint"] for running in groups]
        print(f"\ntwo shard groups listening after {time.monotonic() - begun:.1f} s")
        rng = np.random.default_rng(23)

        def batch(*counts_by_expert: tuple[int, int]) -> dict[int, np.ndarray]:
            return {expert: rng.standard_normal((count, d_model), dtype=np.float32) for expert, count in counts_by_expert}

        async def scenario():
            # 1. no replicas: each expert on shard e % 2; bit-identical, two calls in flight at once
            plain = RemoteShards.connect(uniform_map(LAYERS, EXPERTS_PER_LAYER, 2, 1), endpoints, keys,
                                         deadline_s=WORKING_DEADLINE_S)
            first, second = batch((0, 3), (1, 2), (5, 1), (6, 4)), batch((2, 1), (3, 3), (7, 2))
            outputs = await asyncio.gather(plain.run_layer(0, first, token=0), plain.run_layer(1, second, token=0))
            assert_bits_equal(outputs[0], expected_outputs(store, 0, first))
            assert_bits_equal(outputs[1], expected_outputs(store, 1, second))
            assert plain.queue_lengths() == [0, 0] and not plain.down

            half = RemoteShards.connect(uniform_map(LAYERS, EXPERTS_PER_LAYER, 2, 1), endpoints, keys,
                                        deadline_s=WORKING_DEADLINE_S, wire_dtype="f16")
            rows16 = batch((1, 2), (4, 3))
            out16 = await half.run_layer(1, rows16, token=1)
            for expert, rows in rows16.items():
                widened = from_wire(to_wire(rows, "f16"))
                expected = to_wire(reference_rows(store, 1, [expert], [0, rows.shape[0]], widened), "f16")
                assert np.array_equal(to_wire(out16[expert], "f16").view(np.uint16), expected.view(np.uint16))
            await half.close()

            # 2. replicas=2: shard 0 serves (equal queues -> lowest id) until its process group is killed
            replicated = RemoteShards.connect(uniform_map(LAYERS, EXPERTS_PER_LAYER, 2, 2), endpoints, keys,
                                              deadline_s=FAILOVER_DEADLINE_S)
            warm = batch((0, 2), (6, 1))  # experts shard 0 already read in phase 1
            assert_bits_equal(await replicated.run_layer(0, warm, token=2), expected_outputs(store, 0, warm))
            kill_group(groups[0])
            with structlog.testing.capture_logs() as logs:
                after = batch((0, 1), (2, 2), (7, 3))
                started = time.monotonic()
                assert_bits_equal(await replicated.run_layer(1, after, token=3), expected_outputs(store, 1, after))
                failover_s = time.monotonic() - started
                again = batch((1, 2), (6, 1))
                assert_bits_equal(await replicated.run_layer(0, again, token=4), expected_outputs(store, 0, again))
            assert FAILOVER_DEADLINE_S <= failover_s < FAILOVER_DEADLINE_S + WORKING_DEADLINE_S
            failed = [event for event in logs if event["event"] == "shard_failed_over"]
            assert [(event["shard"], event["moe_layer"], event["experts"]) for event in failed] == [(0, 1, [0, 2, 7])]
            assert failed[0]["endpoint"] == endpoints[0] and "no answer to request" in failed[0]["reason"]
            assert list(replicated.down) == [0]
            print(f"failover call: {failover_s:.2f} s (deadline {FAILOVER_DEADLINE_S:g} s)")
            await replicated.close()

            # 3. no replicas, shard 0 dead: the call fails naming shard 0 and its experts, within ~ the deadline
            lonely = RemoteShards.connect(uniform_map(LAYERS, EXPERTS_PER_LAYER, 2, 1), endpoints, keys,
                                          deadline_s=UNAVAILABLE_DEADLINE_S)
            started = time.monotonic()
            with pytest.raises(ShardUnavailableError) as caught:
                await lonely.run_layer(0, batch((1, 1), (2, 2), (4, 1)), token=5)
            elapsed = time.monotonic() - started
            print(f"unavailable call failed after {elapsed:.2f} s (deadline {UNAVAILABLE_DEADLINE_S:g} s)")
            assert UNAVAILABLE_DEADLINE_S <= elapsed < UNAVAILABLE_DEADLINE_S + 2.0, elapsed
            assert caught.value.shard == 0 and caught.value.experts == (2, 4)
            assert f"shard 0 ({endpoints[0]}) is down and layer 0 experts 2 (id 2), 4 (id 4) have no other " \
                   f"live replica" in str(caught.value)
            await lonely.close()
            # shard 1 still answers its own experts
            assert_bits_equal(await plain.run_layer(1, (odd := batch((3, 2)))), expected_outputs(store, 1, odd))
            await plain.close()

        asyncio.run(scenario())
        groups[1].send_signal(signal.SIGTERM)
        finished = groups[1].finish()
        assert finished.returncode == 143, finished.stderr
    finally:
        for running in groups:
            if running.process.poll() is None:
                os.killpg(running.process.pid, signal.SIGKILL)
                running.process.communicate()
