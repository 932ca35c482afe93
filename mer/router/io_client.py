"""The router's client of the I/O worker: slot leases, with failover to a restarted worker (`IoClient`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from mer.errors import IoWorkerRestartedError
from mer.logging_setup import get_logger
from mer.protocol import (
    Acquire, ErrorReply, IoProgress, IoStats, LeasesDropped, Release, SlotGrant, SlotRef, SlotsReady, SplitReads,
    StatsRequest, decode, encode, raise_remote,
)
from mer.router.reply_client import ReplyClient
from mer.router.work_deadlines import Overdue, WorkDeadlines


class IoClient(ReplyClient):
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
