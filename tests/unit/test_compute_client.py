"""The one compute dispatcher (`ComputeClient.compute_batches`) over real ZeroMQ ipc sockets.

Fake workers (DEALERs with identity `compute-<i>`) answer every `ExpertBatchJob` with partials that
name the slice and row, so the test sees which worker got which slice and where each partial landed.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zmq
import zmq.asyncio

from mer.errors import PipelineError
from mer.compute.batches import expert_outputs, pack_batches
from mer.protocol import ComputeItem, ExpertBatchJob, ExpertBatchResult, Hello, SliceRange, decode, encode
from mer.router.compute_client import ComputeClient

D_MODEL = 4
SLICES = [SliceRange(start, start + 32) for start in range(0, 5 * 32, 32)]


async def fake_worker(context: zmq.asyncio.Context, endpoint: str, index: int, jobs: list) -> None:
    """Answer each job with partials[s, r, :] = slice start + 1000 x (row value)."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, f"compute-{index}".encode())
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        await socket.send_multipart(encode(Hello(f"compute-{index}", index)))
        while True:
            job = decode(await socket.recv_multipart(), expected_kinds=(ExpertBatchJob,))
            jobs.append((index, job))
            partials = np.stack([np.float32(start) + 1000 * job.x for start, _ in job.slices]).astype(np.float32)
            await socket.send_multipart(encode(ExpertBatchResult(job.job_id, index, partials, 1.0)))
    finally:
        socket.close(linger=0)


def run_with_client(tmp_path, num_workers: int, body):
    async def main():
        context = zmq.asyncio.Context()
        endpoint = f"ipc://{tmp_path}/compute.sock"
        client = ComputeClient(context, endpoint, num_workers)
        jobs: list = []
        workers = [asyncio.create_task(fake_worker(context, endpoint, index, jobs)) for index in range(num_workers)]
        try:
            await client.wait_connected(10)
            return await body(client, workers, jobs)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            client.close()
            context.term()

    return asyncio.run(main())


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_slice_s_goes_to_worker_s_mod_n_and_partials_land_in_slice_order(tmp_path, num_workers):
    batches = {7: np.full((2, D_MODEL), 1.0, np.float32), 3: np.full((1, D_MODEL), 2.0, np.float32)}
    packed = pack_batches(batches)
    items = [ComputeItem(7, 0, 1, 0), ComputeItem(3, 1, 1, 0)]

    async def body(client, workers, jobs):
        dispatched: list = []
        partials = await client.compute_batches(items, SLICES, packed, dispatched)
        return partials, dispatched, jobs

    partials, dispatched, jobs = run_with_client(tmp_path, num_workers, body)
    assert partials.shape == (len(SLICES), 3, D_MODEL) and partials.dtype == np.float32
    for index, (start, _) in enumerate(SLICES):
        np.testing.assert_array_equal(partials[index], start + 1000 * packed.x)
    assert sorted(worker for _, worker in dispatched) == list(range(num_workers))
    assert len({job_id for job_id, _ in dispatched}) == num_workers
    for worker, job in jobs:
        assert job.slices == SLICES[worker::num_workers]
        assert job.items == items and job.row_offsets == [0, 2, 3]
        assert (job.job_id, worker) in dispatched
    outputs = expert_outputs(packed, partials)
    np.testing.assert_array_equal(outputs[3], np.full((1, D_MODEL), sum(start for start, _ in SLICES) + 5 * 2000.0))


def test_the_jobs_of_a_worker_that_went_away_are_resubmitted_when_it_comes_back(tmp_path):
    """Worker 1 goes away (as a killed process does): jobs for it wait, whether sent before or after
    its socket closed; when a new worker says Hello as `compute-1` (the supervisor's restart), every
    waiting job is sent to it again, and the partials are those of an undisturbed dispatch."""
    packed = pack_batches({0: np.ones((1, D_MODEL), np.float32)})
    items = [ComputeItem(0, 0, 1, 0)]

    async def body(client, workers, jobs):
        context = zmq.asyncio.Context.instance()
        expected = await client.compute_batches(items, SLICES, packed)
        workers[1].cancel()
        await asyncio.gather(workers[1], return_exceptions=True)
        waiting = [asyncio.ensure_future(client.compute_batches(items, SLICES, packed)) for _ in range(3)]
        done, _ = await asyncio.wait(waiting, timeout=1.0)
        assert not done  # nothing answers worker 1's slices: the dispatches wait, they do not fail
        assert sorted(worker for worker, _ in client.jobs.values()) == [1, 1, 1]
        restarted: list = []
        workers.append(asyncio.create_task(fake_worker(context, client.socket.getsockopt_string(zmq.LAST_ENDPOINT),
                                                       1, restarted)))
        results = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        return expected, results, restarted, client

    expected, results, restarted, client = run_with_client(tmp_path, 2, body)
    for partials in results:
        np.testing.assert_array_equal(partials, expected)
    assert len({job.job_id for _, job in restarted}) == 3  # each lost job, sent again to the new worker
    assert client.jobs == {} and client.sent_to == {}
