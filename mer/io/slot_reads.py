"""The I/O worker's reads into arena slots: each load from its start to its end.

`SlotReads` holds the loads in flight (by slot) and drives each one's life (`mer.io.slot_load` draws
it): the read handed to the reader, its retries with backoff, the payload check when it is due
(`mer.io.payload_check`), and its end: the slot READY (the waiters get the read's latency), FREE
again (they get the error; a cancelled stale prefetch), or QUARANTINED. Every read is logged as an
`expert_read` event and counted in the `ReadTally`.

A read that hangs (still in flight `read_deadline_s` after it was started: a device that does not
answer, whose reader sits in a disk wait the stall watch counts as progress) is not retried: a retry
would wait on the same device. It is logged as `read_hung` (expert, file, offset, seconds), its load
fails like a read that keeps failing (every request waiting for the expert gets an `IoReadHungError`
naming expert, file and offset), and its slot is QUARANTINED (`slot_quarantined`): the kernel may
still write into it, so it is not handed out again until the reader says the read has ended
(`slot_quarantine_lifted`; io_uring is asked to cancel the read, a preadv thread cannot be). An
`Acquire` of more experts than the slots left in service can hold fails instead of waiting forever
(`check_slots_in_service`).
"""

from __future__ import annotations

import asyncio
import time

from mer.cache.admission import PrefetchAdmission
from mer.cache.slot_table import SlotTable, lease_limit
from mer.errors import IoReadHungError, SlotsQuarantinedError
from mer.io.payload_check import PayloadChecker
from mer.io.read_request import ReadResult
from mer.io.read_tally import ReadTally
from mer.io.slot_load import Load, read_failure
from mer.metrics.events import EXPERT_READ
from mer.shm.arena import SlotArena
from mer.store.manifest import Manifest


def check_held(manifest: Manifest, expert_ids) -> None:
    """StoreError naming the expert and the shard when a shard store does not hold one of `expert_ids`
    (before any slot is taken: such an expert is never read, never a zero payload)."""
    if manifest.shard is None:
        return  # a whole store: ids out of range fail where they always did
    for expert_id in expert_ids:
        manifest.expert(expert_id)  # StoreError naming the expert and the shard when it is not held


class SlotReads:
    """The loads in flight into the arena's slots, and what ends each one."""

    def __init__(self, manifest: Manifest, arena: SlotArena, reader, table: SlotTable, admission: PrefetchAdmission,
                 checker: PayloadChecker, tally: ReadTally, slot_released: asyncio.Event, log, *,
                 read_deadline_s: float):
        self.manifest, self.arena, self.reader, self.table, self.admission = manifest, arena, reader, table, admission
        self.checker, self.tally, self.slot_released, self.log = checker, tally, slot_released, log
        self.read_deadline_s = read_deadline_s
        self.loads: dict[int, Load] = {}  # by slot
        self.is_closing = False

    def start_read(self, slot: int, generation: int, expert_id: int, kind: str, token: int) -> None:
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
                       read_deadline_s=self.read_deadline_s, slot=slot, layer=entry.moe_layer,
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

    def close(self) -> None:
        """No retry, check or quarantine lift from now on (the worker is exiting)."""
        self.is_closing = True
        for load in self.loads.values():
            if load.retry is not None:
                load.retry.cancel()


def check_slots_in_service(table: SlotTable, max_pinned: int, num_experts: int) -> None:
    """Refuse an Acquire that the slots left in service (hung reads quarantine theirs) cannot hold."""
    limit = lease_limit(table.num_in_service, max_pinned)
    if num_experts > limit:
        raise SlotsQuarantinedError(
            f"Acquire: {num_experts} experts, more than the {max(limit, 0)} slots left that pins cannot hold: "
            f"{table.num_quarantined} of {table.num_slots} slots are quarantined under reads that hang "
            f"(max_pinned {max_pinned}); it could wait forever")


def _retrieved(future: asyncio.Future) -> None:
    """Mark a failed future's exception as seen (asyncio warns of one never retrieved)."""
    if not future.cancelled():
        future.exception()
