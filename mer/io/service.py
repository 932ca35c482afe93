"""The I/O worker role: the one owner of the slot table; reads experts into arena slots.

Binds a ROUTER on `io.sock`. The router sends `Acquire` (answered with `SlotsReady` in parts: the hits
at once, then each miss as soon as it is read; all hits: one part), `Release`, `SplitReads` and `StatsRequest`; the predictor
sends `PrefetchHints`, `PredictorStats` and `PinSet`. Misses become reads (io_uring with O_DIRECT
when available, else thread-pool preadv; `io_backend`) straight into the slot; concurrent requests
for one expert share one read; foreground reads go before queued prefetches, and a miss that finds
its expert in a queued prefetch promotes that read. Every read is logged as an `expert_read` event
and counted in a `ReadTally` (aggregates: `IoStats` does not grow with the run).

Which hints become reads, and which queued prefetch reads an acquire makes stale, is cache policy:
`mer.cache.admission`. Pins: the slot table is built with `max_pinned` from the configuration; a
`PinSet` replaces the pins of the experts the table holds pinned (unpinned first, then pinned in
order until `max_pinned` is reached).

A restarted I/O worker (`RunSpec.incarnation` > 0; the supervisor starts one in place of a dead or
stalled one) starts with an empty slot table over the same arena: it trusts nothing it has not read
itself (every slot FREE; each expert's first read is checked again), and its prefetch and policy
state start empty. Compute workers may still be reading slots under leases of the dead worker, so it
starts *fenced*: it writes no slot (no prefault of the arena, `Acquire` refused, prefetch hints
dropped) until the router's `LeasesDropped` says that no such lease is left (`mer.router.io_client.IoClient`).
Then it marks every slot empty in the arena with a generation above the dead worker's last one
(`SlotTable.continue_generations`), so that a stale reference could never match a slot it rewrites,
and serves as usual (`io_fence_lifted`).

While any `Acquire` of a peer is unanswered (reads in flight, or waiting for a slot that peer still
holds), the worker's event loop sends that peer `IoProgress` every `progress_interval_s(job_deadline_s)`:
the router's per-request deadline (`mer.router.work_deadlines`) tells a worker that is working or
waiting from one stuck in a busy loop. `MER_WORK_FAULTS=spin:io:N` injects such a loop, for the tests.

A read that hangs (still in flight `read_deadline_s` after it was started: a device that does not
answer, whose reader sits in a disk wait the stall watch counts as progress) is not retried: a retry
would wait on the same device. It is logged as `read_hung` (expert, file, offset, seconds), its load
fails like a read that keeps failing (every request waiting for the expert gets an `IoReadHungError`
naming expert, file and offset), and its slot is QUARANTINED (`slot_quarantined`): the kernel may
still write into it, so it is not handed out again until the reader says the read has ended
(`slot_quarantine_lifted`; io_uring is asked to cancel the read, a preadv thread cannot be). An
`Acquire` of more experts than the slots left in service can hold fails instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import time
from pathlib import Path

import zmq

from mer.cache.admission import PrefetchAdmission
from mer.cache.governor import PrefetchGovernor
from mer.cache.policy import make_policy
from mer.cache.slot_table import AcquireKind, SlotTable, lease_limit
from mer.cache.step import acquire_order
from mer.environment import WorkFaults, read_environment
from mer.errors import IoReadHungError, ProtocolError, SlotsQuarantinedError
from mer.io.backend import open_reader
from mer.io.payload_check import PayloadChecker
from mer.io.read_request import ReadResult
from mer.io.read_tally import ReadTally
from mer.io.slot_load import Load, injected_faults, read_failure
from mer.protocol import (
    Acquire, IoProgress, IoStats, LeasesDropped, PinSet, PredictorStats, PrefetchHints, Release, SlotGrant, SlotsReady,
    SplitReads, StatsRequest, UNKNOWN_REQUEST_ID, check_expert_ids, decode, encode, error_reply,
)
from mer.metrics.events import EXPERT_READ
from mer.runtime.child import receive_unless_stopped
from mer.runtime.fault_loops import spin_forever
from mer.runtime.stall_watch import heartbeat_interval_s
from mer.shm.arena import SlotArena
from mer.shm.layout import NO_EXPERT
from mer.shm.prefault import BackgroundPrefault
from mer.store.checksum import CRC32_IMPLEMENTATION
from mer.store.manifest import Manifest

IO_STATS_SENT = "io_stats_sent"


class IoService:
    def __init__(self, config, run, log, zmq_context):
        self.config, self.run, self.log, self.zmq = config, run, log, zmq_context
        self.manifest = Manifest.load(run.store)
        self.arena: SlotArena | None = None
        self.prefault: BackgroundPrefault | None = None
        self.reader = None
        self.table: SlotTable | None = None
        self.admission: PrefetchAdmission | None = None
        self.socket = None
        self.loads: dict[int, Load] = {}  # by slot
        self.slot_released = asyncio.Event()
        self.current_token = -1
        self.tally = ReadTally()
        self.tasks: set[asyncio.Task] = set()
        self.checker = PayloadChecker(self.manifest, Path(run.store), every_read=config.verify_reads)
        self.is_closing = False
        self.is_fenced = run.incarnation > 0  # a restart: no slot is written before LeasesDropped
        self.unanswered: dict[int, bytes] = {}  # Acquire request id -> its peer, oldest first
        self.faults = read_environment().work_faults or WorkFaults()
        self.acquires_received = 0
        self.fenced_at = time.monotonic()
        self.hints_dropped_fenced = 0  # prefetch hints dropped while fenced

    async def start(self) -> dict:
        run, config = self.run, self.config
        self.arena = SlotArena.attach(run.arena_path, writable=True)
        started = time.perf_counter()
        loop, context = asyncio.get_running_loop(), contextvars.copy_context()  # the log's bound fields

        def prefault_done(seconds: float, error: BaseException | None) -> None:  # in the prefault thread
            try:
                loop.call_soon_threadsafe(self._prefault_done, seconds, error, context=context)
            except RuntimeError:  # the loop has closed: the worker is exiting
                pass

        if self.is_fenced:  # the pages are populated already, and a touch would write slots still read
            self.log.warning("io_fenced", incarnation=run.incarnation, slots=self.arena.num_slots)
        else:
            self.prefault = self.arena.prefault_in_background(prefault_done)
        if self.prefault is None and not self.is_fenced:  # no MADV_POPULATE_WRITE: touched here, before READY
            self._prefault_done(time.perf_counter() - started, None, method="touch")
        files = [Path(run.store) / layer.file for layer in self.manifest.layers]
        self.reader = open_reader(config.io_backend, files, self.arena.data_view(), config.io_queue_depth,
                                  registration_unit=self.arena.slot_nbytes, read_deadline_s=config.read_deadline_s)
        self._inject_read_faults()
        self.table = SlotTable(self.arena.num_slots, self._policy(), max_pinned=config.max_pinned,
                               experts_per_layer=self._experts_per_layer())
        governor = PrefetchGovernor(config.governor_threshold, horizon=config.pipeline_depth)
        self.admission = PrefetchAdmission(self.table, governor, config.predict_fanout * config.pipeline_depth,
                                           config.pipeline_depth)
        self.socket = self.zmq.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(run.endpoint("io"))
        return {"io_backend": self.reader.name, "o_direct": self.reader.o_direct, "slots": self.arena.num_slots,
                "checksum": CRC32_IMPLEMENTATION, "verify_reads": config.verify_reads}

    def _inject_read_faults(self) -> None:
        """The faults and hangs `MER_READ_FAULTS` asks for (`mer.environment`), handed to the reader."""
        environment = read_environment()
        faults = injected_faults(self.manifest, environment.read_faults)
        hangs = injected_faults(self.manifest, environment.read_hangs)
        if faults or hangs:
            self.log.warning("read_faults_injected", faults=[[*key, count] for key, count in faults.items()],
                             hangs=[[*key, count, str(seconds)] for key, (count, seconds) in hangs.items()])
            self.reader.inject_faults(faults)
            self.reader.inject_hangs(hangs)

    def _prefault_done(self, seconds: float, error: BaseException | None, method: str = "madvise") -> None:
        nbytes = self.arena.num_slots * self.arena.slot_nbytes
        if error is not None:  # reads still work: each faults its own pages
            self.log.warning("arena_prefault_failed", error=str(error), seconds=round(seconds, 3), nbytes=nbytes)
        elif self.prefault is None or self.prefault.is_done or method == "touch":
            self.log.info("arena_prefaulted", method=method, background=method != "touch",
                          seconds=round(seconds, 3), nbytes=nbytes)

    def _experts_per_layer(self) -> int | None:
        """The store's experts per MoE layer when requests come per layer (a model, or a `layered` benchmark)."""
        per_layer = self.config.layered or self.run.model is not None
        return self.manifest.geometry.experts_per_layer if per_layer else None

    def _policy(self):
        """The configured eviction policy; `layer` sees the store's MoE layers when requests are per layer
        (a model, or a `layered` benchmark) and one layer (LRU) on the flat pool."""
        config, geometry = self.config, self.manifest.geometry
        if config.cache_policy != "layer":
            return make_policy(config.cache_policy)
        per_layer = config.layered or self.run.model is not None
        return make_policy("layer", experts_per_layer=geometry.experts_per_layer if per_layer else
                           geometry.num_experts, num_layers=geometry.num_moe_layers if per_layer else 1)

    async def serve(self, stop: asyncio.Event) -> None:
        progress = asyncio.create_task(self._report_progress())
        try:
            await self._serve(stop)
        finally:
            progress.cancel()

    async def _report_progress(self) -> None:
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

    async def _serve(self, stop: asyncio.Event) -> None:
        while True:
            frames = await receive_unless_stopped(self.socket, stop)
            if frames is None:
                return
            identity, *frames = frames
            identity = bytes(identity.buffer)
            message = None
            try:
                message = decode(frames, expected_kinds=(Acquire, Release, PrefetchHints, PredictorStats, PinSet,
                                                         SplitReads, StatsRequest, LeasesDropped))
                self._check(message)
                self._dispatch(identity, message)
            except Exception as error:  # a malformed message is answered and logged, never fatal
                self.log.warning("bad_io_message", peer=identity.decode(errors="replace"), error=str(error))
                request_id = getattr(message, "request_id", UNKNOWN_REQUEST_ID)
                self._spawn(self._send(identity, error_reply(request_id, error)))

    @property
    def num_experts(self) -> int:
        return self.manifest.geometry.num_experts

    def _check(self, message) -> None:
        """Refuse, before any state changes, a well-formed request that cannot be served: experts that
        are not in the store, more experts in one Acquire than the slots pins cannot hold (it could wait
        forever), an Acquire while fenced, a LeasesDropped while not."""
        if isinstance(message, Acquire) and self.is_fenced:
            raise ProtocolError("Acquire before LeasesDropped: this I/O worker was restarted and writes no slot "
                                "until the router has dropped every lease of the dead one")
        if isinstance(message, LeasesDropped) and not self.is_fenced:
            raise ProtocolError("LeasesDropped to an I/O worker that is not fenced (not restarted, or lifted already)")
        if isinstance(message, PrefetchHints):
            check_expert_ids("PrefetchHints", [hint.expert_id for hint in message.hints], self.num_experts)
        if isinstance(message, Acquire):
            check_expert_ids("Acquire", message.expert_ids, self.num_experts)
            limit = lease_limit(self.arena.num_slots, self.config.max_pinned)
            if len(set(message.expert_ids)) > limit:
                raise ProtocolError(f"Acquire: {len(set(message.expert_ids))} experts, more than the {limit} slots "
                                    f"that pins cannot hold ({self.arena.num_slots} slots, max_pinned "
                                    f"{self.config.max_pinned}): it could wait forever")
            self._check_slots_in_service(len(set(message.expert_ids)))

    def _check_slots_in_service(self, num_experts: int) -> None:
        """Refuse an Acquire that the slots left in service (hung reads quarantine theirs) cannot hold."""
        table = self.table
        limit = lease_limit(table.num_in_service, self.config.max_pinned)
        if num_experts > limit:
            raise SlotsQuarantinedError(
                f"Acquire: {num_experts} experts, more than the {max(limit, 0)} slots left that pins cannot hold: "
                f"{table.num_quarantined} of {table.num_slots} slots are quarantined under reads that hang "
                f"(max_pinned {self.config.max_pinned}); it could wait forever")

    def _dispatch(self, identity: bytes, message) -> None:
        if isinstance(message, Acquire):
            self._spawn(self._answer_acquire(identity, message))
        elif isinstance(message, Release):
            self._release(message)
        elif isinstance(message, PrefetchHints):
            if self.is_fenced:
                self.hints_dropped_fenced += len(message.hints)
            else:
                self._admit_prefetches(message)
        elif isinstance(message, LeasesDropped):
            self._lift_fence(message)
        elif isinstance(message, PredictorStats):
            self.admission.ledger.reported(message)
        elif isinstance(message, PinSet):
            self._set_pins(message.expert_ids)
        elif isinstance(message, SplitReads):
            self.tally.split_token = message.token
        else:
            self._spawn(self._send_stats(identity, message.request_id))

    def _lift_fence(self, message: LeasesDropped) -> None:
        """No lease of the dead I/O worker is left: mark every slot empty, at a generation above the dead
        worker's, and start writing slots."""
        generations = [self.arena.read_slot_header(slot).generation + 1 for slot in range(self.arena.num_slots)]
        for slot, generation in enumerate(generations):
            self.arena.write_slot_header(slot, generation, NO_EXPERT, 0)
        self.table.continue_generations(generations)
        self.is_fenced = False
        self.log.warning("io_fence_lifted", restarts=message.restarts,
                         fenced_s=round(time.monotonic() - self.fenced_at, 3), hints_dropped=self.hints_dropped_fenced,
                         max_generation=max(generations))

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, identity: bytes, message) -> None:
        await self.socket.send_multipart([identity, *encode(message)], copy=False)

    # ---- foreground ------------------------------------------------------------------------------

    async def _answer_acquire(self, identity: bytes, request: Acquire) -> None:
        self.acquires_received += 1
        if self.faults.spins_in("io", self.acquires_received, self.run.incarnation):
            spin_forever(self.log, request_id=request.request_id)
        self.unanswered[request.request_id] = identity
        try:
            await self._answer_acquire_now(identity, request)
        finally:
            self.unanswered.pop(request.request_id, None)

    async def _answer_acquire_now(self, identity: bytes, request: Acquire) -> None:
        try:
            t_received = time.monotonic()
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
                self._cancel_stale_prefetches(request)
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
                self._release(Release([read.result().ref]))

        for read in reads:
            read.add_done_callback(release)

    async def _acquire_one(self, expert_id: int, token: int, num_experts: int):
        """Lease `expert_id` (starting or joining its read) for an Acquire of `num_experts`; returns an
        awaitable of its SlotGrant."""
        while (result := self.table.acquire(expert_id, token)).kind is AcquireKind.NO_SLOT:
            self._check_slots_in_service(num_experts)
            self.slot_released.clear()
            await self.slot_released.wait()
        self.admission.acquired(result)
        slot, generation = result.slot, result.generation
        if result.kind is AcquireKind.HIT:
            return _done(SlotGrant(expert_id, slot, generation, True, 0.0, False))
        if result.kind is AcquireKind.MISS_ASSIGNED:
            self._start_read(slot, generation, expert_id, "foreground", token)
        load = self.loads[slot]
        joined_prefetch = load.kind == "prefetch"
        if joined_prefetch:
            load.priority = "foreground"  # its retries, if any, too
            self.reader.promote(load.reader_future)
        return self._grant_when_loaded(load, SlotGrant(expert_id, slot, generation, False, 0.0, joined_prefetch))

    async def _grant_when_loaded(self, load: Load, grant: SlotGrant) -> SlotGrant:
        waited_started = time.perf_counter()
        await asyncio.shield(load.future)
        return grant._replace(read_us=(time.perf_counter() - waited_started) * 1e6)

    def _cancel_stale_prefetches(self, request: Acquire) -> None:
        """Cancel the queued prefetch reads the admission finds stale (the done callback frees their slots)."""
        queued = [(slot, load.token) for slot, load in self.loads.items() if load.kind == "prefetch"]
        for slot in self.admission.stale_slots(request.token, request.expert_ids, queued):
            if self.reader.cancel(self.loads[slot].reader_future):
                self.admission.cancelled_read(slot)

    def _release(self, message: Release) -> None:
        for ref in message.refs:
            try:
                self.table.release(ref.slot, ref.generation)
            except Exception as error:  # a bad release is logged, never fatal
                self.log.warning("bad_release", slot=ref.slot, generation=ref.generation, error=str(error))
        self.slot_released.set()

    # ---- reads -----------------------------------------------------------------------------------

    def _start_read(self, slot: int, generation: int, expert_id: int, kind: str, token: int) -> None:
        payload_nbytes = self.manifest.layer_of(expert_id).format.payload_nbytes
        self.arena.write_slot_header(slot, generation, expert_id, payload_nbytes)
        load = Load(asyncio.get_running_loop().create_future(), None, kind, token, time.monotonic(),
                    expert_id=expert_id, generation=generation)
        self.loads[slot] = load
        self._submit_read(slot, load)
        load.queue_depth = self.reader.num_in_flight + self.reader.num_queued

    def _submit_read(self, slot: int, load: Load) -> None:
        """Hand the load's (next) read to the reader (`mer.io.slot_load` has the life of a load)."""
        load.retry = None
        entry = self.manifest.expert(load.expert_id)
        nbytes = self.manifest.layers[entry.moe_layer].format.read_nbytes
        destination = self.arena.slot_view(slot)[:nbytes]
        load.reader_future = self.reader.submit(entry.moe_layer, entry.offset, nbytes, destination,
                                                priority=load.priority)
        load.reader_future.add_done_callback(lambda done: self._read_done(done, slot))

    def _retry_read(self, slot: int, load: Load) -> None:
        try:
            self._submit_read(slot, load)
        except Exception as error:  # the reader refused the read it took before (a bug): fail the load, do not hang it
            self._end_load(slot, load, error=read_failure(self.manifest.describe(load.expert_id), error, load.attempts))

    def _read_done(self, done: asyncio.Future, slot: int) -> None:
        """A read ended: retry it after a backoff, have its payload checked, or end the load."""
        load = self.loads[slot]
        if done.cancelled():  # a stale prefetch cancelled by the admission
            self._end_load(slot, load, error=asyncio.CancelledError())
            return
        error = done.exception()
        if isinstance(error, IoReadHungError):  # not retried: a retry would wait on the same device
            self._quarantine(slot, load, error)
            return
        if error is not None and load.can_retry and not self.is_closing:
            self.log.warning("expert_read_retry", expert_id=load.expert_id, slot=slot, attempt=load.attempts,
                             delay_ms=round(load.retry_delay_s * 1e3, 1), error=str(error))
            load.retry = asyncio.get_running_loop().call_later(load.retry_delay_s, self._retry_read, slot, load)
            load.attempts += 1
            return
        if error is not None:
            self._end_load(slot, load, error=read_failure(self.manifest.describe(load.expert_id), error, load.attempts))
            return
        if not self.checker.needs_check(load.expert_id):
            self._end_load(slot, load, result=done.result())
            return
        payload_nbytes = self.manifest.layer_of(load.expert_id).format.payload_nbytes
        check = self.checker.start(self.arena.slot_view(slot)[:payload_nbytes])
        check.add_done_callback(lambda checked: self._check_done(checked, slot, done.result()))

    def _check_done(self, checked: asyncio.Future, slot: int, result: ReadResult) -> None:
        """The payload's checksum is known: a match ends the load well, a mismatch fails it."""
        if checked.cancelled() or self.is_closing:
            return
        load = self.loads[slot]
        try:
            checksum, check_us = checked.result()
            self.checker.finish(load.expert_id, checksum, check_us)
        except Exception as error:  # a mismatch (PayloadChecksumError), or the check itself failed
            self.log.error("payload_check_failed", expert_id=load.expert_id, slot=slot, error=str(error))
            self._end_load(slot, load, error=error)
            return
        self._end_load(slot, load, result=result, check_us=check_us)

    def _quarantine(self, slot: int, load: Load, error: IoReadHungError) -> None:
        """A read hangs: log it, keep its slot out of service until the kernel ends it, fail the load."""
        entry = self.manifest.expert(load.expert_id)
        self.log.error("read_hung", expert_id=load.expert_id, expert=self.manifest.describe(load.expert_id),
                       file=error.path, offset=error.offset, nbytes=error.nbytes, seconds=round(error.seconds, 3),
                       read_deadline_s=self.config.read_deadline_s, slot=slot, layer=entry.moe_layer,
                       kind=load.kind, cancel=error.cancel)
        self._end_load(slot, load, error=read_failure(self.manifest.describe(load.expert_id), error, load.attempts),
                       quarantine=True)
        self.log.warning("slot_quarantined", slot=slot, expert_id=load.expert_id,
                         quarantined=self.table.num_quarantined, in_service=self.table.num_in_service)
        error.released.add_done_callback(lambda released: self._lift_quarantine(slot, released))

    def _lift_quarantine(self, slot: int, released: asyncio.Future) -> None:
        """The kernel has ended the hung read into `slot`: nothing writes it any more, it serves again."""
        if self.is_closing:
            return
        self.table.lift_quarantine(slot)
        self.log.info("slot_quarantine_lifted", slot=slot, read_ok=released.result(),
                      quarantined=self.table.num_quarantined)
        self.slot_released.set()

    def _end_load(self, slot: int, load: Load, *, result: ReadResult | None = None,
                  error: BaseException | None = None, check_us: float | None = None,
                  quarantine: bool = False) -> None:
        """The slot is READY (a result), FREE again (an error) or QUARANTINED (a hung read); the load's
        waiters learn which."""
        del self.loads[slot]
        if quarantine:
            self.table.quarantine(slot, load.generation)
        else:
            self.table.finish_load(slot, load.generation, ok=error is None)
        if load.kind == "prefetch":
            self.admission.finished(slot, ok=error is None)
        self.slot_released.set()
        if isinstance(error, asyncio.CancelledError):
            load.future.cancel()
            return
        if error is not None:
            self.log.warning("expert_read_failed", expert_id=load.expert_id, slot=slot, error=str(error))
            load.future.set_exception(error)
            load.future.add_done_callback(_retrieved)  # a failed prefetch may have no waiter
            return
        self.log.info(EXPERT_READ, expert_id=load.expert_id, slot=slot, nbytes=result.nbytes,
                      latency_us=result.latency_us, kind=load.kind, token=load.token, t_submit=load.t_submit,
                      t_done=time.monotonic(), queue_depth=load.queue_depth, read_index=self.tally.num_reads,
                      attempts=load.attempts, checked=check_us is not None, check_us=round(check_us or 0.0, 1))
        self.tally.add(load.kind, result.nbytes, result.latency_us, load.token)
        load.future.set_result(result.latency_us)

    # ---- prefetch and pins -----------------------------------------------------------------------

    def _admit_prefetches(self, message: PrefetchHints) -> None:
        self.admission.ledger.hinted(message.source, len(message.hints))
        for rank, hint in enumerate(message.hints):
            in_flight = sum(load.kind == "prefetch" for load in self.loads.values())
            pending = self.reader.num_in_flight + self.reader.num_queued
            assignment = self.admission.admit(message.source, rank, hint.expert_id, message.token,
                                              self.current_token, in_flight, pending, in_prefill=self._in_prefill())
            if assignment is not None:
                self._start_read(assignment.slot, assignment.generation, hint.expert_id, "prefetch", message.token)

    def _in_prefill(self) -> bool:
        """Whether the current token is a generation's prefill pass (before `SplitReads`' token)."""
        split = self.tally.split_token
        return split is not None and self.current_token < split

    def _set_pins(self, expert_ids: list[int]) -> None:
        """Pin `expert_ids` (in order, until `max_pinned`); experts pinned before and not named are unpinned."""
        wanted = [expert for expert in dict.fromkeys(expert_ids) if 0 <= expert < self.manifest.geometry.num_experts]
        for expert in range(self.manifest.geometry.num_experts):
            if self.table.is_pinned(expert) and expert not in wanted:
                self.table.unpin(expert)
        for expert in wanted:
            if not self.table.pin(expert):
                break

    # ---- statistics ------------------------------------------------------------------------------

    def stats(self, request_id: int) -> IoStats:
        tally = self.tally
        infos = self.table.slot_infos()
        pinned = sum(info.expert_id is not None and self.table.is_pinned(info.expert_id) for info in infos)
        return IoStats(request_id, self.reader.name, self.reader.o_direct, tally.by_kind("foreground"),
                       tally.by_kind("prefetch"), tally.split(), tally.latency_histogram(), self.admission.counts(),
                       self.admission.ledger.reports(),
                       [-1 if info.expert_id is None else info.expert_id for info in infos], pinned,
                       self.reader.num_in_flight + self.reader.num_queued)

    async def _send_stats(self, identity: bytes, request_id: int) -> None:
        frames = encode(self.stats(request_id))
        self.log.info(IO_STATS_SENT, nbytes=sum(len(frame) for frame in frames), reads=self.tally.num_reads)
        await self.socket.send_multipart([identity, *frames], copy=False)

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

    async def on_control(self, message) -> None:
        pass

    async def close(self) -> None:
        self.is_closing = True
        for task in self.tasks:
            task.cancel()
        for load in self.loads.values():
            if load.retry is not None:
                load.retry.cancel()
        if self.reader is not None:
            await self.reader.close()
        self.checker.close()  # after the reads, before the arena: a check reads a slot
        self.log.info("payload_checks", **self.checker.figures())
        if self.socket is not None:
            self.socket.close(linger=0)
        if self.prefault is not None:
            self.prefault.stop()  # before the mapping goes
        if self.arena is not None:
            self.arena.close()


def _retrieved(future: asyncio.Future) -> None:
    """Mark a failed future's exception as seen (asyncio warns of one never retrieved)."""
    if not future.cancelled():
        future.exception()


def _done(value):
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future

