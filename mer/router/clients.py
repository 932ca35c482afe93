"""The router's request/reply clients: the I/O worker (slot leases) and the compute workers.

Each client owns one socket and one receiver task that resolves the future of every reply by its
request or job id, so the router's event loop never blocks. An `ErrorReply` from the other side is
raised locally as `RemoteError` (type, message and traceback of the remote error). A malformed or
unexpected message (bad frames, a reply from a peer the job was not sent to, an unknown id) is
logged as `bad_reply` and dropped: the receiver keeps serving the replies that follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

import numpy as np
import zmq
import zmq.asyncio

from mer.errors import IoWorkerRestartedError, PipelineError
from mer.logging_setup import get_logger
from mer.compute.batches import PackedBatches
from mer.protocol import (
    Acquire, ComputeItem, ErrorReply, ExpertBatchJob, ExpertBatchResult, Hello, IoProgress, IoStats, JobProgress,
    LeasesDropped, Release, SlotGrant, SlotRef, SlotsReady, SliceRange, SplitReads, StatsRequest, decode, encode,
    raise_remote,
)
from mer.compute.slicing import slices_of_worker
from mer.router.work_deadlines import Overdue, WorkDeadlines


class _PendingReplies:
    """Futures waiting for replies, and queues for requests answered in parts (streams), by id."""

    def __init__(self):
        self.futures: dict[int, asyncio.Future] = {}
        self.streams: dict[int, asyncio.Queue] = {}
        self.ids = itertools.count(1)

    def new_stream(self) -> tuple[int, asyncio.Queue]:
        """An id whose replies are queued as they come (the last part ends it: `resolve(..., final=True)`)."""
        request_id = next(self.ids)
        self.streams[request_id] = asyncio.Queue()
        return request_id, self.streams[request_id]

    def new(self) -> tuple[int, asyncio.Future]:
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.futures[request_id] = future
        return request_id, future

    def resolve(self, request_id: int, message, final: bool = True) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            if final or isinstance(message, ErrorReply):
                del self.streams[request_id]
            stream.put_nowait(message)
            return
        future = self.futures.pop(request_id, None)
        if future is None:
            raise PipelineError(f"{type(message).__name__} for id {request_id}, which no request is waiting for")
        if future.done():
            return
        if isinstance(message, ErrorReply):
            try:
                raise_remote(message)
            except Exception as error:
                future.set_exception(error)
        else:
            future.set_result(message)

    def fail_all(self, error: BaseException) -> None:
        for future in self.futures.values():
            if not future.done():
                future.set_exception(error)
        self.futures.clear()
        for stream in self.streams.values():
            stream.put_nowait(error)
        self.streams.clear()


class _Client:
    """One socket and the receiver task that hands every message to `_on_frames`; when receiving
    fails, every pending reply fails with a `PipelineError` naming the `peer`."""

    def __init__(self, socket: zmq.asyncio.Socket, peer: str):
        socket.setsockopt(zmq.LINGER, 0)
        self.socket = socket
        self.peer = peer
        self.pending = _PendingReplies()
        self.receiver = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        while True:
            try:
                frames = await self.socket.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the socket itself failed: nothing more will arrive
                self.pending.fail_all(PipelineError(f"{self.peer} connection failed: {error}"))
                return
            try:
                self._on_frames(frames)
            except Exception as error:  # one bad message: log it, keep serving
                get_logger().warning("bad_reply", peer=self.peer, error=str(error))

    def close(self) -> None:
        self.receiver.cancel()
        self.socket.close(linger=0)


class IoClient(_Client):
    """Leases slots from the I/O worker (a DEALER on `io.sock`).

    Failover (`on_restart`, when the supervisor says `IoWorkerRestarted`): every request of the dead
    worker fails with `IoWorkerRestartedError` (its asker tries again: `mer.router.dispatcher`; `stats`
    does so itself), the socket is replaced (nothing queued for the dead worker reaches the new one),
    and nothing is sent to the new worker until every lease of the dead one has been given back with
    `release`. Those leases are only forgotten (the dead worker's table is gone), but a compute job may
    still be reading their slots: so `release` of the last one is what sends `LeasesDropped`, which lets
    the new worker write slots; requests wait for it. Invariant: no slot is written by an I/O worker
    while the router holds a lease of it from any worker (docs/reliability.md).

    Deadlines: while an `Acquire` is unanswered the I/O worker's event loop sends `IoProgress` (whether
    it reads or waits for a slot the router holds); a worker with acquires in hand and no message at
    all for `job_deadline_s` is stuck (`stuck`, `mer.router.work_deadlines`): a busy loop."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, name: str = "I/O worker",
                 job_deadline_s: float = 8.0):
        self.context, self.endpoint = context, endpoint
        self.name, self.pid = name, 0  # the current I/O worker's process name and pid (0: not known yet)
        self.deadlines = WorkDeadlines(job_deadline_s)
        self.deadlines.hello(0, time.monotonic())
        self.restarts = 0  # I/O worker restarts seen
        self.leases: dict[tuple[int, SlotRef], int] = {}  # (incarnation, ref) -> leases held
        self.resumed = asyncio.Event()  # set while requests may go to the current worker
        self.resumed.set()
        self.split_token: int | None = None  # sent again to a new worker
        self.resuming: asyncio.Task | None = None
        self.stats_restarts_noted = 0  # the restarts `io_stats_since_restart` has been logged for
        super().__init__(self._connected_socket(), "I/O worker")

    def _connected_socket(self) -> zmq.asyncio.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)  # what is queued for a dead worker is dropped with the socket
        socket.connect(self.endpoint)
        return socket

    def _on_frames(self, frames: list) -> None:
        message = decode(frames, expected_kinds=(SlotsReady, IoStats, ErrorReply, IoProgress))
        self.deadlines.progressed(0, time.monotonic())
        if isinstance(message, IoProgress):
            self.pid = message.pid
            return
        self.pending.resolve(message.request_id, message, final=getattr(message, "final", True))

    def stuck(self) -> list[Overdue]:
        """The I/O worker, once, if it has had acquires in hand and sent nothing for `job_deadline_s`.
        Call every `deadlines.interval_s`."""
        return self.deadlines.overdue(time.monotonic())

    # ---- failover --------------------------------------------------------------------------------

    def on_restart(self, name: str, pid: int) -> None:
        """The I/O worker died and `pid` is starting in its place: fail its requests, and send nothing to
        the new one until the dead one's leases are given back."""
        self.restarts += 1
        self.name, self.pid = name, pid
        self.deadlines.hello(0, time.monotonic())  # nothing in hand at the new worker; its deadline starts anew
        self.resumed.clear()
        self.receiver.cancel()
        self.socket.close(linger=0)
        self.socket = self._connected_socket()
        self.receiver = asyncio.create_task(self._receive())
        waiting = len(self.pending.futures) + len(self.pending.streams)
        self.pending.fail_all(IoWorkerRestartedError(f"{name} restarted (new pid {pid}): the request is void"))
        get_logger().warning("io_failover", child=name, child_pid=pid, restarts=self.restarts,
                             requests_failed=waiting, leases_held=self.old_leases())
        self._resume_when_no_old_leases()

    def old_leases(self) -> int:
        """Leases the router still holds on slots of dead I/O workers."""
        return sum(count for (incarnation, _), count in self.leases.items() if incarnation < self.restarts)

    def _resume_when_no_old_leases(self) -> None:
        if not self.resumed.is_set() and self.old_leases() == 0 and self.resuming is None:
            self.resuming = asyncio.ensure_future(self._resume(self.restarts))

    async def _resume(self, restarts: int) -> None:
        """Tell the new worker that it may write slots (`LeasesDropped`), then let requests through."""
        socket = self.socket
        try:
            await self._send(socket, LeasesDropped(restarts))
            if self.split_token is not None:
                await self._send(socket, SplitReads(self.split_token))
        except IoWorkerRestartedError:
            pass  # restarted again while sending: the newest worker gets its own LeasesDropped (below)
        finally:
            self.resuming = None
        if restarts == self.restarts:
            get_logger().warning("io_leases_dropped", restarts=restarts)
            self.resumed.set()
        else:  # restarted again meanwhile: the newest worker gets its own LeasesDropped
            self._resume_when_no_old_leases()

    async def _send(self, socket: zmq.asyncio.Socket, message) -> None:
        """Send on `socket`; if a restart replaced it meanwhile, raise IoWorkerRestartedError."""
        try:
            await socket.send_multipart(encode(message))
        except zmq.ZMQError:
            if socket is self.socket:
                raise
            raise IoWorkerRestartedError(f"the I/O worker restarted while {type(message).__name__} was sent") from None

    async def _ready_socket(self) -> zmq.asyncio.Socket:
        while not self.resumed.is_set():
            await self.resumed.wait()
        return self.socket

    def _hold(self, refs) -> None:
        for ref in refs:
            key = (self.restarts, ref)
            self.leases[key] = self.leases.get(key, 0) + 1

    def _give_back(self, refs: list[SlotRef]) -> list[SlotRef]:
        """Forget one lease of each ref; the refs of the current worker's leases, to release there."""
        current = []
        for ref in refs:
            incarnation = next((incarnation for incarnation in range(self.restarts, -1, -1)
                                if self.leases.get((incarnation, ref), 0) > 0), None)
            if incarnation is None:
                continue  # not held (a bug, or a double release): there is nothing to give back
            key = (incarnation, ref)
            self.leases[key] -= 1
            if self.leases[key] == 0:
                del self.leases[key]
            if incarnation == self.restarts:
                current.append(ref)
        return current

    # ---- requests --------------------------------------------------------------------------------

    async def acquire_parts(self, token: int, expert_ids: list[int]) -> AsyncIterator[list[SlotGrant]]:
        """Lease `expert_ids` for `token`: yields the grants as the I/O worker sends them (the hits at
        once, then the misses once read; `SlotsReady`). Raises the I/O worker's error as `RemoteError`,
        and `IoWorkerRestartedError` if it died meanwhile (the grants yielded stay leased until released)."""
        socket = await self._ready_socket()
        request_id, stream = self.pending.new_stream()
        await self._send(socket, Acquire(request_id, token, list(expert_ids)))
        self.deadlines.sent(0, request_id, time.monotonic())
        try:
            while True:
                message = await stream.get()
                if isinstance(message, BaseException):
                    raise message
                if isinstance(message, ErrorReply):
                    raise_remote(message)
                self._hold(grant.ref for grant in message.refs)
                yield list(message.refs)
                if message.final:
                    return
        finally:
            self.deadlines.answered(0, request_id, time.monotonic())

    async def acquire(self, token: int, expert_ids: list[int]) -> list[SlotGrant]:
        """Every grant of `expert_ids` for `token`, in request order, once all are leased."""
        grants = {grant.expert_id: grant async for part in self.acquire_parts(token, expert_ids) for grant in part}
        return [grants[expert_id] for expert_id in expert_ids]

    async def release(self, refs: list[SlotRef]) -> None:
        """Give back leases: to the I/O worker that granted them if it still lives; those of a dead one are
        forgotten, and the last of them lets the new worker write slots (see the class docstring)."""
        current = self._give_back(list(refs))
        if current and self.resumed.is_set():
            with contextlib.suppress(IoWorkerRestartedError):  # died meanwhile: its leases went with it
                await self._send(self.socket, Release(current))
        self._resume_when_no_old_leases()

    async def split_reads(self, token: int) -> None:
        """Have the I/O worker count the reads for tokens >= `token` apart (`IoStats.split_reads`)."""
        self.split_token = token
        await self._send(await self._ready_socket(), SplitReads(token))

    async def stats(self) -> IoStats:
        """The I/O worker's counters; after a restart, the new worker's: they count from its start (the dead
        worker's are lost with it; `io_stats_since_restart` says so once per restart)."""
        while True:
            socket = await self._ready_socket()
            request_id, future = self.pending.new()
            try:
                await self._send(socket, StatsRequest(request_id))
                stats = await future
                if self.restarts > self.stats_restarts_noted:
                    self.stats_restarts_noted = self.restarts
                    get_logger().warning("io_stats_since_restart", restarts=self.restarts, reads=stats.reads.reads)
                return stats
            except IoWorkerRestartedError:
                if future.done() and not future.cancelled():
                    future.exception()  # seen: the request goes again to the new worker
                continue

    def close(self) -> None:
        if self.resuming is not None:
            self.resuming.cancel()
        super().close()


def worker_index(identity: bytes) -> int:
    """The worker number in a compute worker's socket identity `compute-<i>`."""
    prefix, _, number = identity.decode(errors="replace").rpartition("-")
    if prefix != "compute" or not number.isdigit():
        raise PipelineError(f"unexpected identity {identity!r} on the compute socket")
    return int(number)


def _reply_id(message: ExpertBatchResult | ErrorReply) -> int:
    return message.job_id if isinstance(message, ExpertBatchResult) else message.request_id


class ComputeClient(_Client):
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
