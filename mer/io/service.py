"""The I/O worker role: the one owner of the slot table; reads experts into arena slots.

Binds a ROUTER on `io.sock`. The router sends `Acquire` (answered with `SlotsReady` in parts: the hits
at once, then each miss as soon as it is read; all hits: one part), `Release`, `SplitReads` and `StatsRequest`; the predictor
sends `PrefetchHints`, `PredictorStats` and `PinSet`. Misses become reads (io_uring with O_DIRECT
when available, else thread-pool preadv; `io_backend`) straight into the slot; concurrent requests
for one expert share one read; foreground reads go before queued prefetches, and a miss that finds
its expert in a queued prefetch promotes that read. Every read is logged as an `expert_read` event
and counted in a `ReadTally` (aggregates: `IoStats` does not grow with the run).

`IoService` builds the worker's parts on start and routes each request to the one that owns it:
- `mer.io.lease_requests`: `Acquire` and `Release` (and `IoProgress` while an `Acquire` is unanswered);
- `mer.io.slot_reads`: the reads into slots, their retries and checks, and a hung read's quarantine;
- `mer.io.predictor_advice`: `PrefetchHints`, `PinSet` and `PredictorStats` (the admission itself is
  cache policy: `mer.cache.admission`);
- `mer.io.restart_fence`: a restarted worker writes no slot until the router's `LeasesDropped`.
A malformed or unservable request is answered with an error and logged (`bad_io_message`), never fatal.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from pathlib import Path

import zmq

from mer.cache.admission import PrefetchAdmission
from mer.cache.governor import PrefetchGovernor
from mer.cache.policy import make_policy
from mer.cache.slot_table import SlotTable, lease_limit
from mer.environment import WorkFaults, read_environment
from mer.errors import ProtocolError
from mer.io.backend import open_reader
from mer.io.lease_requests import LeaseRequests
from mer.io.payload_check import PayloadChecker
from mer.io.predictor_advice import PredictorAdvice
from mer.io.read_tally import ReadTally
from mer.io.restart_fence import RestartFence
from mer.io.slot_load import injected_faults
from mer.io.slot_reads import SlotReads, check_slots_in_service
from mer.protocol import (
    Acquire, IoStats, LeasesDropped, PinSet, PredictorStats, PrefetchHints, Release, SplitReads, StatsRequest,
    UNKNOWN_REQUEST_ID, check_expert_ids, decode, encode, error_reply,
)
from mer.runtime.child import receive_unless_stopped
from mer.shm.arena import SlotArena
from mer.shm.prefault import BackgroundPrefault
from mer.store.checksum import CRC32_IMPLEMENTATION
from mer.store.manifest import Manifest

IO_STATS_SENT = "io_stats_sent"


class IoService:
    """The I/O worker: its slot table, reader and socket, and the parts that answer each request."""

    def __init__(self, config, run, log, zmq_context):
        self.config, self.run, self.log, self.zmq = config, run, log, zmq_context
        self.manifest = Manifest.load(run.store)
        self.arena: SlotArena | None = None
        self.prefault: BackgroundPrefault | None = None
        self.reader = None
        self.table: SlotTable | None = None
        self.admission: PrefetchAdmission | None = None
        self.reads: SlotReads | None = None
        self.advice: PredictorAdvice | None = None
        self.leases: LeaseRequests | None = None
        self.socket = None
        self.slot_released = asyncio.Event()
        self.tally = ReadTally()
        self.tasks: set[asyncio.Task] = set()
        self.checker = PayloadChecker(self.manifest, Path(run.store), every_read=config.verify_reads)
        self.fence = RestartFence(run.incarnation, log)
        self.faults = read_environment().work_faults or WorkFaults()

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

        if self.fence.is_fenced:  # the pages are populated already, and a touch would write slots still read
            self.log.warning("io_fenced", incarnation=run.incarnation, slots=self.arena.num_slots)
        else:
            self.prefault = self.arena.prefault_in_background(prefault_done)
        if self.prefault is None and not self.fence.is_fenced:  # no MADV_POPULATE_WRITE: touched here, before READY
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
        self.reads = SlotReads(self.manifest, self.arena, self.reader, self.table, self.admission, self.checker,
                               self.tally, self.slot_released, self.log, read_deadline_s=config.read_deadline_s)
        self.advice = PredictorAdvice(self.admission, self.table, self.reads, self.reader, self.tally, self.num_experts)
        self.socket = self.zmq.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(run.endpoint("io"))
        self.leases = LeaseRequests(config, self.socket, self.table, self.reads, self.advice, self.admission,
                                    self.reader, self.tally, self.slot_released, self.log, faults=self.faults,
                                    incarnation=run.incarnation)
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
        progress = asyncio.create_task(self.leases.report_progress())
        try:
            await self._serve(stop)
        finally:
            progress.cancel()

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
        self.fence.check(message)
        if isinstance(message, PrefetchHints):
            check_expert_ids("PrefetchHints", [hint.expert_id for hint in message.hints], self.num_experts)
        if isinstance(message, Acquire):
            check_expert_ids("Acquire", message.expert_ids, self.num_experts)
            limit = lease_limit(self.arena.num_slots, self.config.max_pinned)
            if len(set(message.expert_ids)) > limit:
                raise ProtocolError(f"Acquire: {len(set(message.expert_ids))} experts, more than the {limit} slots "
                                    f"that pins cannot hold ({self.arena.num_slots} slots, max_pinned "
                                    f"{self.config.max_pinned}): it could wait forever")
            check_slots_in_service(self.table, self.config.max_pinned, len(set(message.expert_ids)))

    def _dispatch(self, identity: bytes, message) -> None:
        if isinstance(message, Acquire):
            self._spawn(self.leases.answer_acquire(identity, message))
        elif isinstance(message, Release):
            self.leases.release(message)
        elif isinstance(message, PrefetchHints):
            if self.fence.is_fenced:
                self.fence.drop_hints(message)
            else:
                self.advice.admit_prefetches(message, self.leases.current_token)
        elif isinstance(message, LeasesDropped):
            self.fence.lift(message, self.arena, self.table)
        elif isinstance(message, PredictorStats):
            self.advice.reported(message)
        elif isinstance(message, PinSet):
            self.advice.set_pins(message.expert_ids)
        elif isinstance(message, SplitReads):
            self.tally.split_token = message.token
        else:
            self._spawn(self._send_stats(identity, message.request_id))

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, identity: bytes, message) -> None:
        await self.socket.send_multipart([identity, *encode(message)], copy=False)

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

    async def on_control(self, message) -> None:
        pass

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.reads is not None:
            self.reads.close()
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
