"""The router's lease requests to the I/O worker: `Acquire`, answered in parts, and `Release`.

An `Acquire` is answered with `SlotsReady` in parts: the hits at once, then each miss as soon as it
is read (all hits: one part). A miss starts a read (`mer.io.slot_reads`), or joins the one already
in flight for its expert; a miss that finds its expert in a queued prefetch promotes that read, and
the queued prefetches the acquire makes stale are cancelled (`mer.io.predictor_advice`). Resident
experts are leased first, so that an acquire never evicts its own experts; one that finds no slot
waits for a release (or fails once the slots left in service cannot hold it). A miss that fails the
acquire gives back the leases of its other misses, which the router will never get.

While any `Acquire` of a peer is unanswered (reads in flight, or waiting for a slot that peer still
holds), the worker's event loop sends that peer `IoProgress` every `progress_interval_s(job_deadline_s)`:
the router's per-request deadline (`mer.router.work_deadlines`) tells a worker that is working or
waiting from one stuck in a busy loop. `MER_WORK_FAULTS=spin:io:N` injects such a loop, for the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import zmq

from mer.cache.admission import PrefetchAdmission
from mer.cache.slot_table import AcquireKind, SlotTable
from mer.cache.step import acquire_order
from mer.environment import WorkFaults
from mer.io.predictor_advice import PredictorAdvice
from mer.io.read_tally import ReadTally
from mer.io.slot_load import Load
from mer.io.slot_reads import SlotReads, check_held, check_slots_in_service
from mer.protocol import Acquire, IoProgress, Release, SlotGrant, SlotsReady, encode, error_reply
from mer.runtime.fault_loops import spin_forever
from mer.runtime.stall_watch import heartbeat_interval_s


class LeaseRequests:
    """Answers `Acquire` and `Release` on the I/O worker's socket; knows the requests still unanswered."""

    def __init__(self, config, socket, table: SlotTable, reads: SlotReads, advice: PredictorAdvice,
                 admission: PrefetchAdmission, reader, tally: ReadTally, slot_released: asyncio.Event, log, *,
                 faults: WorkFaults, incarnation: int):
        self.config, self.socket, self.table, self.reads, self.advice = config, socket, table, reads, advice
        self.admission, self.reader, self.tally = admission, reader, tally
        self.slot_released, self.log = slot_released, log
        self.faults, self.incarnation = faults, incarnation
        self.current_token = -1
        self.unanswered: dict[int, bytes] = {}  # Acquire request id -> its peer, oldest first
        self.acquires_received = 0

    async def report_progress(self) -> None:
        """`IoProgress` to every peer with an unanswered `Acquire`, naming its oldest, at every interval."""
        interval = heartbeat_interval_s(self.config.job_deadline_s)
        while True:
            await asyncio.sleep(interval)
            oldest: dict[bytes, int] = {}
            for request_id, identity in self.unanswered.items():
                oldest.setdefault(identity, request_id)
            for identity, request_id in oldest.items():
                message = IoProgress(request_id, os.getpid(), self.tally.num_reads)
                with contextlib.suppress(zmq.ZMQError):  # the peer is gone: nothing to report to
                    await self.socket.send_multipart([identity, *encode(message)], flags=zmq.NOBLOCK, copy=False)

    async def _send(self, identity: bytes, message) -> None:
        await self.socket.send_multipart([identity, *encode(message)], copy=False)

    async def answer_acquire(self, identity: bytes, request: Acquire) -> None:
        self.acquires_received += 1
        if self.faults.spins_in("io", self.acquires_received, self.incarnation):
            spin_forever(self.log, request_id=request.request_id)
        self.unanswered[request.request_id] = identity
        try:
            await self._answer_acquire_now(identity, request)
        finally:
            self.unanswered.pop(request.request_id, None)

    async def _answer_acquire_now(self, identity: bytes, request: Acquire) -> None:
        try:
            t_received = time.monotonic()
            check_held(self.reads.manifest, request.expert_ids)
            self.current_token = max(self.current_token, request.token)
            self.admission.governor.demanded(request.expert_ids, request.token)
            self.table.policy.record_step(request.expert_ids)
            waits: list = [None] * len(request.expert_ids)
            try:
                for index in acquire_order(self.table, request.expert_ids):  # resident first: no self-eviction
                    waits[index] = await self._acquire_one(request.expert_ids[index], request.token,
                                                           len(set(request.expert_ids)))
            except Exception:  # slots quarantined while it waited: give back what it holds or will hold
                self._release_unsent([asyncio.ensure_future(wait) for wait in waits if wait is not None], [])
                raise
            ready = [wait.result() for wait in waits if isinstance(wait, asyncio.Future)]  # hits
            loading = [wait for wait in waits if not isinstance(wait, asyncio.Future)]  # misses
            t_hits_sent = None
            loaded: list[SlotGrant] = []
            if not loading:
                await self._send(identity, SlotsReady(request.request_id, ready, True))
            else:
                self.advice.cancel_stale_prefetches(request)
                if ready:  # the hits go at once: the router computes them while the misses load
                    t_hits_sent = time.monotonic()
                    await self._send(identity, SlotsReady(request.request_id, ready, False))
                reads = [asyncio.ensure_future(wait) for wait in loading]
                try:
                    for arrival in asyncio.as_completed(reads):
                        loaded.append(await arrival)  # each miss as soon as it is read
                        await self._send(identity, SlotsReady(request.request_id, [loaded[-1]],
                                                              len(loaded) == len(loading)))
                except Exception:
                    self._release_unsent(reads, loaded)
                    raise
            t_answered = time.monotonic()
            if self.config.log_file:
                self._log_acquire_done(request, ready + loaded, t_received, t_answered, t_hits_sent)
        except Exception as error:
            self.log.warning("acquire_failed", request_id=request.request_id, error=str(error))
            await self._send(identity, error_reply(request.request_id, error))

    def _release_unsent(self, reads: list[asyncio.Future], sent: list[SlotGrant]) -> None:
        """A miss failed the acquire: the leases of its other misses, which the router will never get,
        are released (now, or when their reads end), and their failures are seen, not left to asyncio."""
        sent_refs = {grant.ref for grant in sent}

        def release(read: asyncio.Future) -> None:
            if not read.cancelled() and read.exception() is None and read.result().ref not in sent_refs:
                self.release(Release([read.result().ref]))

        for read in reads:
            read.add_done_callback(release)

    async def _acquire_one(self, expert_id: int, token: int, num_experts: int):
        """Lease `expert_id` (starting or joining its read) for an Acquire of `num_experts`; returns an
        awaitable of its SlotGrant."""
        while (result := self.table.acquire(expert_id, token)).kind is AcquireKind.NO_SLOT:
            check_slots_in_service(self.table, self.config.max_pinned, num_experts)
            self.slot_released.clear()
            await self.slot_released.wait()
        self.admission.acquired(result)
        slot, generation = result.slot, result.generation
        if result.kind is AcquireKind.HIT:
            return _done(SlotGrant(expert_id, slot, generation, True, 0.0, False))
        if result.kind is AcquireKind.MISS_ASSIGNED:
            self.reads.start_read(slot, generation, expert_id, "foreground", token)
        load = self.reads.loads[slot]
        joined_prefetch = load.kind == "prefetch"
        if joined_prefetch:
            load.priority = "foreground"  # its retries, if any, too
            self.reader.promote(load.reader_future)
        return self._grant_when_loaded(load, SlotGrant(expert_id, slot, generation, False, 0.0, joined_prefetch))

    async def _grant_when_loaded(self, load: Load, grant: SlotGrant) -> SlotGrant:
        waited_started = time.perf_counter()
        await asyncio.shield(load.future)
        return grant._replace(read_us=(time.perf_counter() - waited_started) * 1e6)

    def release(self, message: Release) -> None:
        for ref in message.refs:
            try:
                self.table.release(ref.slot, ref.generation)
            except Exception as error:  # a bad release is logged, never fatal
                self.log.warning("bad_release", slot=ref.slot, generation=ref.generation, error=str(error))
        self.slot_released.set()

    def _log_acquire_done(self, request: Acquire, grants: list, t_received: float, t_answered: float,
                          t_hits_sent: float | None) -> None:
        """`acquire_done` (docs/events.md): the request's timing and a snapshot of the slots and counters."""
        infos = self.table.slot_infos()
        states = [info.state.value for info in infos]
        pinned = sum(info.expert_id is not None and self.table.is_pinned(info.expert_id) for info in infos)
        prefetch = self.admission.counts()
        hits = sum(grant.hit for grant in grants)
        self.log.info(
            "acquire_done", token=request.token, request_id=request.request_id,
            expert_ids=list(request.expert_ids), hits=hits, misses=len(grants) - hits,
            t_received=t_received, t_hits_sent=t_hits_sent, t_answered=t_answered,
            occupied_slots=len(states) - states.count("free"), loading_slots=states.count("loading"),
            leased_slots=states.count("leased"), pinned_slots=pinned,
            queue_depth=self.reader.num_in_flight + self.reader.num_queued,
            prefetches_issued=prefetch.issued, prefetches_completed=prefetch.completed,
            prefetches_dropped=prefetch.dropped, prefetches_used=prefetch.used, prefetches_wasted=prefetch.wasted,
        )


def _done(value):
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
