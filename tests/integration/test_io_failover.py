"""The I/O worker's restart, in process: a dead worker's leases, a fenced new worker, the router's failover.

Two real `IoService`s one after the other on one real slot arena (the second started as a restart,
`RunSpec.incarnation` 1), the router's real `IoClient` and `ExpertDispatcher`, and a fake compute
worker on a real ZeroMQ socket that answers when the test says so. What is checked is the
invariant of docs/reliability.md: no slot is written by the new worker while the router holds a
lease of the dead one (a compute job may still be reading it); requests in flight are retried on the
new worker; every slot the new worker writes is at a generation above the dead one's.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import structlog.testing
import zmq
import zmq.asyncio

from mer.compute.slicing import plan_slices
from mer.config import PipelineConfig
from mer.errors import IoWorkerRestartedError, StaleSlotError
from mer.io.service import IoService
from mer.logging_setup import get_logger
from mer.protocol import Acquire, ExpertBatchJob, ExpertBatchResult, Hello, PrefetchHint, PrefetchHints, decode, encode
from mer.router.compute_client import ComputeClient
from mer.router.io_client import IoClient
from mer.router.dispatcher import ExpertDispatcher
from mer.runtime.paths import new_run_id
from mer.runtime.run_spec import RunSpec
from mer.shm.arena import SlotArena
from mer.shm.layout import NO_EXPERT
from mer.store.manifest import Manifest

NUM_SLOTS = 4
QUIET_S = 0.3  # how long the test watches for a message that must not come
TIMEOUT_S = 10.0


class Graph:
    """An arena, a run spec per incarnation, and helpers to start I/O workers on them."""

    def __init__(self, store, tmp_path, leak_guard):
        self.manifest = Manifest.load(store)
        run_id = new_run_id()
        leak_guard.add_run(run_id)
        self.arena = SlotArena.create(run_id, NUM_SLOTS, self.manifest.slot_nbytes)
        self.config = PipelineConfig(store=store, cache_slots=NUM_SLOTS, compute_workers=1, prefetch=True)
        runtime = tmp_path / "rt"
        runtime.mkdir(mode=0o700)
        self.run = RunSpec(run_id, str(runtime), str(self.arena.path), NUM_SLOTS, self.manifest.slot_nbytes,
                           str(store), os.getpid(), 1, self.config.to_dict())

    async def start_io(self, context, incarnation: int) -> tuple[IoService, asyncio.Event, asyncio.Task]:
        run = RunSpec(**{**self.run.__dict__, "incarnation": incarnation})
        service = IoService(self.config, run, get_logger(), context)
        await service.start()
        stop = asyncio.Event()
        return service, stop, asyncio.create_task(service.serve(stop))

    def headers(self) -> list[tuple[int, int]]:
        return [(header.generation, header.expert_id)
                for header in map(self.arena.read_slot_header, range(NUM_SLOTS))]


async def stop_io(service: IoService, stop: asyncio.Event, serving: asyncio.Task) -> None:
    """End a worker as a death would for its peers: its socket closes and its state is gone."""
    stop.set()
    await serving
    await service.close()


async def nothing_arrives(socket: zmq.asyncio.Socket) -> bool:
    return await socket.poll(QUIET_S * 1000) == 0


@pytest.fixture
def graph(pipeline_stores, tmp_path, leak_guard):
    graph = Graph(pipeline_stores["tiny"], tmp_path, leak_guard)
    yield graph
    graph.arena.destroy()


def test_a_restarted_io_worker_writes_no_slot_until_the_dead_one_s_leases_are_dropped(graph):
    async def scenario():
        context = zmq.asyncio.Context()
        client = None
        old = new = None
        try:
            old = await graph.start_io(context, 0)
            client = IoClient(context, graph.run.endpoint("io"))
            await client.split_reads(1)
            (held,) = await client.acquire(0, [3])  # read into a slot by the first worker, then leased
            slow = {(0, graph.manifest.expert(expert).offset): 3 for expert in (4, 5)}  # retried for 0.31 s
            old[0].reader.inject_faults(slow)
            waiting = asyncio.create_task(client.acquire(0, [4, 5]))
            await asyncio.sleep(0.05)
            before = graph.headers()
            await stop_io(*old)
            old = None
            client.on_restart("mer-io-test", 1)
            with pytest.raises(IoWorkerRestartedError):  # the request of the dead worker is void
                await asyncio.wait_for(waiting, TIMEOUT_S)
            new = await graph.start_io(context, 1)
            service = new[0]
            assert service.fence.is_fenced
            # a stray Acquire (not from the router's client) is refused, hints are dropped: nothing is written
            stray = context.socket(zmq.DEALER)
            stray.setsockopt(zmq.LINGER, 0)
            stray.connect(graph.run.endpoint("io"))
            await stray.send_multipart(encode(Acquire(77, 1, [6])))
            await stray.send_multipart(encode(PrefetchHints(1, [PrefetchHint(7, 1.0), PrefetchHint(8, 0.5)], "markov")))
            refusal = decode(await asyncio.wait_for(stray.recv_multipart(), TIMEOUT_S))
            stray.close(linger=0)
            assert refusal.request_id == 77 and "Acquire before LeasesDropped" in refusal.message
            retried = asyncio.create_task(client.acquire(1, [4, 5]))  # waits: the old lease is still held
            await asyncio.sleep(QUIET_S)
            assert not retried.done() and service.fence.is_fenced and service.tally.num_reads == 0
            assert graph.headers() == before and held.slot in range(NUM_SLOTS)
            assert before[held.slot] == (held.generation, 3)  # the leased slot is as the dead worker left it
            await client.release([held.ref])  # the last old lease: LeasesDropped, then the retried acquire
            grants = await asyncio.wait_for(retried, TIMEOUT_S)
            assert not service.fence.is_fenced and service.fence.hints_dropped == 2
            assert service.tally.split_token == 1  # SplitReads was sent again to the new worker
            for grant in grants:
                assert grant.generation > before[grant.slot][0]
            with pytest.raises(StaleSlotError):  # the old reference can never match again
                graph.arena.check_slot(held.slot, held.generation, 3)
            await client.release([grant.ref for grant in grants])
            stats = await client.stats()  # the new worker's own: its two reads, not the dead one's
            assert stats.reads.reads == 2 and stats.split_reads.reads == 2
            fresh = graph.headers()
            untouched = [slot for slot in range(NUM_SLOTS) if slot not in {grant.slot for grant in grants}]
            assert all(fresh[slot] == (before[slot][0] + 1, NO_EXPERT) for slot in untouched), (before, fresh)
            return service.checker.figures()
        finally:
            if client is not None:
                client.close()
            for worker in (old, new):
                if worker is not None:
                    await stop_io(*worker)
            context.term()

    with structlog.testing.capture_logs() as logs:
        figures = asyncio.run(scenario())
    assert figures["checks"] >= 2  # the new worker checked its first reads again: it trusts nothing it did not read
    (failover,) = [entry for entry in logs if entry["event"] == "io_failover"]
    assert failover["leases_held"] == 1 and failover["requests_failed"] == 1
    assert [entry["event"] for entry in logs if entry["event"] in ("io_leases_dropped", "io_fence_lifted")] == [
        "io_leases_dropped", "io_fence_lifted"]
    (noted,) = [entry for entry in logs if entry["event"] == "io_stats_since_restart"]
    assert noted["restarts"] == 1 and noted["reads"] == 2


def test_a_compute_job_on_a_dead_worker_s_slot_ends_before_the_new_worker_writes_and_the_rest_is_retried(graph):
    """The dispatcher, mid-chunk: one expert granted (a hit) and computing on a fake compute worker, the
    other's read in flight when the I/O worker dies. Nothing reaches the new worker until that compute job
    has answered; then the other expert is acquired there; the outputs are the fake worker's partials."""
    manifest = graph.manifest
    hit, miss = 3, 4

    async def answer(worker: zmq.asyncio.Socket, value: float) -> list[int]:
        job = decode(await asyncio.wait_for(worker.recv_multipart(), TIMEOUT_S), expected_kinds=(ExpertBatchJob,))
        partials = np.full((len(job.slices), *job.x.shape), value, dtype=np.float32)
        await worker.send_multipart(encode(ExpertBatchResult(job.job_id, 0, partials, 1.0)))
        return [item.expert_id for item in job.items]

    async def scenario():
        context = zmq.asyncio.Context()
        io = compute = worker = None
        old = new = None
        try:
            old = await graph.start_io(context, 0)
            io = IoClient(context, graph.run.endpoint("io"))
            (warm,) = await io.acquire(0, [hit])  # resident: the dispatcher's acquire gets it as a hit
            await io.release([warm.ref])
            compute = ComputeClient(context, graph.run.endpoint("compute"), 1)
            worker = context.socket(zmq.DEALER)
            worker.setsockopt(zmq.IDENTITY, b"compute-0")
            worker.setsockopt(zmq.LINGER, 0)
            worker.connect(graph.run.endpoint("compute"))
            await worker.send_multipart(encode(Hello("compute-0", 1)))
            await compute.wait_connected(TIMEOUT_S)
            dispatcher = ExpertDispatcher(manifest, io, compute, max_leases=NUM_SLOTS, expert_slices=2)
            x = np.ones((1, manifest.geometry.d_model), dtype=np.float32)
            old[0].reader.inject_faults({(0, manifest.expert(miss).offset): 3})  # the miss's read retries a while
            running = asyncio.create_task(dispatcher.run_experts(1, {hit: x, miss: x}))
            first = decode(await asyncio.wait_for(worker.recv_multipart(), TIMEOUT_S), expected_kinds=(ExpertBatchJob,))
            assert [item.expert_id for item in first.items] == [hit]
            await stop_io(*old)
            old = None
            io.on_restart("mer-io-test", 1)
            new = await graph.start_io(context, 1)
            await asyncio.sleep(QUIET_S)
            assert new[0].fence.is_fenced and not running.done()  # the hit's job still runs on the dead worker's slot
            partials = np.full((len(first.slices), *first.x.shape), 2.0, dtype=np.float32)
            await worker.send_multipart(encode(ExpertBatchResult(first.job_id, 0, partials, 1.0)))
            assert await answer(worker, 5.0) == [miss]  # acquired again from the new worker, then computed
            assert not new[0].fence.is_fenced
            outputs, stats = await asyncio.wait_for(running, TIMEOUT_S)
            return outputs, stats, len(first.slices)
        finally:
            for client in (io, compute):
                if client is not None:
                    client.close()
            if worker is not None:
                worker.close(linger=0)
            for service in (old, new):
                if service is not None:
                    await stop_io(*service)
            context.term()

    with structlog.testing.capture_logs() as logs:
        outputs, stats, num_slices = asyncio.run(scenario())
    slices = len(plan_slices(manifest.layers[0].format, 2))
    assert num_slices == slices
    assert np.all(outputs[hit] == 2.0 * slices) and np.all(outputs[miss] == 5.0 * slices)
    assert stats.hits + stats.misses == 2  # each expert counted once, across the restart
    (retried,) = [entry for entry in logs if entry["event"] == "acquire_retried"]
    assert retried["expert_ids"] == [miss]


def test_a_second_restart_before_the_leases_are_dropped_fences_only_the_newest_worker(graph):
    """Two deaths in a row while the router still holds a lease of the first worker: the second worker is
    never told anything; the third gets one `LeasesDropped` once that lease is given back, and serves."""

    async def scenario():
        context = zmq.asyncio.Context()
        client = None
        workers = []
        try:
            workers.append(await graph.start_io(context, 0))
            client = IoClient(context, graph.run.endpoint("io"))
            (held,) = await client.acquire(0, [3])
            for incarnation in (1, 2):
                await stop_io(*workers.pop())
                client.on_restart("mer-io-test", incarnation)
                workers.append(await graph.start_io(context, incarnation))
                await asyncio.sleep(QUIET_S)
                assert workers[-1][0].fence.is_fenced
            newest = workers[-1][0]
            acquiring = asyncio.create_task(client.acquire(1, [3]))
            await asyncio.sleep(QUIET_S)
            assert not acquiring.done() and newest.fence.is_fenced
            await client.release([held.ref])
            (grant,) = await asyncio.wait_for(acquiring, TIMEOUT_S)
            assert not newest.fence.is_fenced and not grant.hit and grant.generation > held.generation
            await client.release([grant.ref])
            return client.leases
        finally:
            if client is not None:
                client.close()
            for worker in workers:
                await stop_io(*worker)
            context.term()

    with structlog.testing.capture_logs() as logs:
        leases = asyncio.run(scenario())
    assert leases == {}  # every lease given back, of every worker
    assert [entry["restarts"] for entry in logs if entry["event"] == "io_fence_lifted"] == [2]
    assert [entry["restarts"] for entry in logs if entry["event"] == "io_leases_dropped"] == [2]
    assert not [entry for entry in logs if entry["event"] == "bad_io_message"]


def test_leases_dropped_to_a_worker_that_was_not_restarted_is_refused_and_it_keeps_serving(graph):
    """`LeasesDropped` to a worker that is not fenced (a bug in the router) is refused and logged; the
    worker serves on."""

    async def scenario():
        context = zmq.asyncio.Context()
        worker = await graph.start_io(context, 0)
        client = IoClient(context, graph.run.endpoint("io"))
        try:
            client.on_restart("mer-io-test", 1)  # no restart happened: the worker gets a LeasesDropped it refuses
            await asyncio.sleep(QUIET_S)
            (grant,) = await client.acquire(0, [2])
            await client.release([grant.ref])
            return grant
        finally:
            client.close()
            await stop_io(*worker)
            context.term()

    with structlog.testing.capture_logs() as logs:
        grant = asyncio.run(scenario())
    assert grant.expert_id == 2 and not grant.hit
    (bad,) = [entry for entry in logs if entry["event"] == "bad_io_message"]
    assert "LeasesDropped to an I/O worker that is not fenced" in bad["error"]
