"""What the predictor's advice does in the I/O worker: prefetch hints become reads, pin sets pins.

The predictor sends the I/O worker `PrefetchHints`, `PinSet` and `PredictorStats`. Which hints become
prefetch reads, and which queued prefetch reads an acquire makes stale, is cache policy
(`mer.cache.admission`); `PredictorAdvice` applies it to the worker's reads (`mer.io.slot_reads`):
an admitted hint starts a read into the slot it was assigned, a stale queued read is cancelled (its
slot freed when the read ends). Pins: the slot table is built with `max_pinned` from the
configuration; a `PinSet` replaces the pins of the experts the table holds pinned (unpinned first,
then pinned in order until `max_pinned` is reached). `PredictorStats` go to the prefetch ledger.
"""

from __future__ import annotations

from mer.cache.admission import PrefetchAdmission
from mer.cache.slot_table import SlotTable
from mer.io.read_tally import ReadTally
from mer.io.slot_reads import SlotReads
from mer.protocol import Acquire, PredictorStats, PrefetchHints


class PredictorAdvice:
    """The predictor's hints, pins and accuracy reports, applied to the slot table and the reads."""

    def __init__(self, admission: PrefetchAdmission, table: SlotTable, reads: SlotReads, reader, tally: ReadTally,
                 num_experts: int):
        self.admission, self.table, self.reads, self.reader, self.tally = admission, table, reads, reader, tally
        self.num_experts = num_experts

    def admit_prefetches(self, message: PrefetchHints, current_token: int) -> None:
        self.admission.ledger.hinted(message.source, len(message.hints))
        for rank, hint in enumerate(message.hints):
            if self.reads.manifest.shard is not None and not self.reads.manifest.holds(hint.expert_id):
                continue  # a shard store's I/O worker prefetches only the experts its store holds
            in_flight = sum(load.kind == "prefetch" for load in self.reads.loads.values())
            pending = self.reader.num_in_flight + self.reader.num_queued
            assignment = self.admission.admit(message.source, rank, hint.expert_id, message.token,
                                              current_token, in_flight, pending,
                                              in_prefill=self._in_prefill(current_token))
            if assignment is not None:
                self.reads.start_read(assignment.slot, assignment.generation, hint.expert_id, "prefetch",
                                      message.token)

    def _in_prefill(self, current_token: int) -> bool:
        """Whether the current token is a generation's prefill pass (before `SplitReads`' token)."""
        split = self.tally.split_token
        return split is not None and current_token < split

    def cancel_stale_prefetches(self, request: Acquire) -> None:
        """Cancel the queued prefetch reads the admission finds stale (the done callback frees their slots)."""
        queued = [(slot, load.token) for slot, load in self.reads.loads.items() if load.kind == "prefetch"]
        for slot in self.admission.stale_slots(request.token, request.expert_ids, queued):
            if self.reader.cancel(self.reads.loads[slot].reader_future):
                self.admission.cancelled_read(slot)

    def set_pins(self, expert_ids: list[int]) -> None:
        """Pin `expert_ids` (in order, until `max_pinned`); experts pinned before and not named are unpinned."""
        wanted = [expert for expert in dict.fromkeys(expert_ids) if 0 <= expert < self.num_experts]
        for expert in range(self.num_experts):
            if self.table.is_pinned(expert) and expert not in wanted:
                self.table.unpin(expert)
        for expert in wanted:
            if not self.table.pin(expert):
                break

    def reported(self, message: PredictorStats) -> None:
        """The predictor's own hint accuracy, for the prefetch ledger's reports."""
        self.admission.ledger.reported(message)
