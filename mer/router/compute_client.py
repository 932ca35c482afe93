"""The router's client of the compute workers: expert batch jobs out, partials back, jobs of a restarted
worker sent again (`ComputeClient`)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import zmq
import zmq.asyncio

from mer.errors import PipelineError
from mer.logging_setup import get_logger
from mer.compute.batches import PackedBatches
from mer.protocol import (
    ComputeItem, ErrorReply, ExpertBatchJob, ExpertBatchResult, Hello, JobProgress, SliceRange, decode, encode,
)
from mer.compute.slicing import slices_of_worker
from mer.router.reply_client import ReplyClient
from mer.router.work_deadlines import Overdue, WorkDeadlines


def worker_index(identity: bytes) -> int:
    """The worker number in a compute worker's socket identity `compute-<i>`."""
    prefix, _, number = identity.decode(errors="replace").rpartition("-")
    if prefix != "compute" or not number.isdigit():
        raise PipelineError(f"unexpected identity {identity!r} on the compute socket")
    return int(number)


def _reply_id(message: ExpertBatchResult | ErrorReply) -> int:
    return message.job_id if isinstance(message, ExpertBatchResult) else message.request_id


class ComputeClient(ReplyClient):
    """Sends expert batch jobs to N workers (a ROUTER on `compute.sock`) and gathers their partials.

    `compute_batches` is the one way work reaches the compute workers (the benchmark and generation
    alike, through `mer.router.dispatcher.ExpertDispatcher`).

    A worker that dies is restarted by the supervisor under the same identity (`compute-<i>`): its
    `Hello` then means that every job sent to the dead process before it is lost, and those jobs
    are sent again to the new one (`compute_jobs_resubmitted`). A job for a worker that is down
    meanwhile waits for it. Slices are computed the same way by any process, so the partials, and
    the outputs, are bit-identical to an undisturbed run's.

    A worker with jobs in hand reports progress between their items (`JobProgress`); one that shows
    none for `job_deadline_s` is stuck (`stuck_workers`, `mer.router.work_deadlines`): the router has
    the supervisor kill it, and its jobs go to its replacement as after any death."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, num_workers: int, job_deadline_s: float = 8.0):
        self.num_workers = num_workers
        self.busy_us = [0.0] * num_workers  # per worker: the kernels' time of the batch jobs it answered
        self.identities: dict[int, bytes] = {}
        self.processes: dict[int, Hello] = {}  # worker -> the Hello (name, pid) of its current process
        self.deadlines = WorkDeadlines(job_deadline_s)
        self.sent_to: dict[int, bytes] = {}  # job id -> identity of the worker it was sent to
        self.jobs: dict[int, tuple[int, ExpertBatchJob]] = {}  # job id -> (worker, job), until its reply
        self.resubmitted: set[int] = set()  # job ids sent again to a restarted worker
        self.all_connected = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over its identity at once
        socket.bind(endpoint)
        super().__init__(socket, "compute")

    def _on_frames(self, frames: list) -> None:
        identity, *frames = frames
        identity_bytes = bytes(identity.buffer)
        message = decode(frames, expected_kinds=(Hello, ExpertBatchResult, ErrorReply, JobProgress))
        if isinstance(message, Hello):
            self._on_hello(identity_bytes, message)
            return
        job_id = message.job_id if isinstance(message, JobProgress) else _reply_id(message)
        if self.sent_to.get(job_id) != identity_bytes:
            if job_id in self.resubmitted and job_id not in self.sent_to:
                if not isinstance(message, JobProgress):  # the second answer of a job the restarted worker
                    self.deadlines.answered(worker_index(identity_bytes), job_id, time.monotonic())  # got twice
                return  # the first answer was used
            raise PipelineError(f"{type(message).__name__} for job {job_id} from {identity_bytes!r}, "
                                f"which was not sent that job")
        if isinstance(message, JobProgress):
            self.deadlines.progressed(worker_index(identity_bytes), time.monotonic())
            return
        self.deadlines.answered(worker_index(identity_bytes), job_id, time.monotonic())
        del self.sent_to[job_id]
        self.jobs.pop(job_id, None)
        self.pending.resolve(job_id, message)

    def _on_hello(self, identity: bytes, hello: Hello) -> None:
        index = worker_index(identity)
        if index >= self.num_workers:
            raise PipelineError(f"Hello from {identity!r}: there are only {self.num_workers} compute workers")
        restarted = index in self.identities
        self.identities[index] = identity
        self.processes[index] = hello
        self.deadlines.hello(index, time.monotonic())
        if len(self.identities) == self.num_workers:
            self.all_connected.set()
        if restarted:  # the jobs sent to the process before this one are lost with it
            lost = [job_id for job_id, (worker, _) in self.jobs.items() if worker == index]
            task = asyncio.ensure_future(self._resubmit(index, lost))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _resubmit(self, worker: int, job_ids: list[int]) -> None:
        get_logger().warning("compute_jobs_resubmitted", worker=worker, job_ids=job_ids)
        self.resubmitted.update(job_ids)
        for job_id in job_ids:
            if job_id in self.jobs:
                await self._send_job(worker, self.jobs[job_id][1])

    async def _send_job(self, worker: int, job: ExpertBatchJob) -> None:
        """Send `job` to `worker`; a worker that is down (exited, restarting) gets it again on its next Hello."""
        try:
            await self.socket.send_multipart([self.identities[worker], *encode(job)], copy=False)
        except zmq.ZMQError as error:
            if error.errno != zmq.EHOSTUNREACH:
                raise
            return
        self.deadlines.sent(worker, job.job_id, time.monotonic())

    def stuck_workers(self) -> list[tuple[Hello, Overdue]]:
        """The workers that have had jobs in hand and shown no progress for `job_deadline_s`, each named
        once per process (its Hello: name and pid). Call every `deadlines.interval_s`."""
        return [(self.processes[overdue.worker], overdue) for overdue in self.deadlines.overdue(time.monotonic())
                if overdue.worker in self.processes]

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        super().close()

    async def wait_connected(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: see Supervisor._next_event
                await self.all_connected.wait()
        except TimeoutError:
            raise PipelineError(
                f"only {len(self.identities)} of {self.num_workers} compute workers connected within {timeout_s:g} s"
            ) from None

    async def compute_batches(self, items: list[ComputeItem], slices: list[SliceRange], packed: PackedBatches,
                              dispatched: list[tuple[int, int]] | None = None) -> np.ndarray:
        """Partials `[slices, rows, d_model]` of the packed batches (item i on its rows, in slot
        `items[i]`): one `ExpertBatchJob` per worker, slice s computed by worker s % N.

        `dispatched`, when given, gets one `(job_id, worker)` per job sent (for the logs). A job of a
        worker that has died waits for its restart (the supervisor ends the run if there is none).
        """
        partials = np.empty((len(slices), *packed.x.shape), dtype=np.float32)
        waits = []
        for worker in range(self.num_workers):
            mine = slices_of_worker(len(slices), worker, self.num_workers)
            if not mine:
                continue
            job_id, future = self.pending.new()
            job = ExpertBatchJob(job_id, items, [slices[s] for s in mine], packed.x, list(packed.row_offsets))
            self.sent_to[job_id] = self.identities[worker]
            self.jobs[job_id] = (worker, job)
            await self._send_job(worker, job)
            waits.append((job_id, mine, future))
            if dispatched is not None:
                dispatched.append((job_id, worker))
        try:
            for _, mine, future in waits:
                result: ExpertBatchResult = await future
                partials[mine] = result.partials
                self.busy_us[result.worker] += result.compute_us
        finally:  # answered, failed or cancelled: never resubmitted
            for job_id, _, _ in waits:
                self.jobs.pop(job_id, None)
        return partials
