"""Prefetch admission: which hints become reads, and which queued prefetch reads have gone stale.

A hint is read only if its expert is not resident, a slot is FREE or evictable without touching
anything leased, pinned or used in the current token (`SlotTable.assign_prefetch`), fewer than
`limit` (`predict_fanout x pipeline_depth`) prefetch reads are in flight and, with
`governor_threshold > 0`, the governor (`mer.cache.governor`) finds the measured precision of its
predictor's hints at its rank worth the reads already pending; otherwise it is dropped. The
governor scores every non-resident hint in its shadow (admitted or not) against the acquires.

With the governor on, an acquire that misses makes the queued prefetch reads of earlier hints
stale when they were hinted `pipeline_depth` or more tokens before it and it did not join them
(`stale_slots`): the I/O worker cancels those not yet started, freeing their slots for the miss.

Every hint's fate is counted here in total (`counts()`) and per predictor in the `PrefetchLedger`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mer.cache.governor import PrefetchGovernor
from mer.cache.prefetch_ledger import PrefetchLedger
from mer.cache.slot_table import AcquireResult, Assignment, SlotTable
from mer.protocol import PrefetchCounts


class PrefetchAdmission:
    """Admits hints into the slot table and keeps the prefetch counters, total and per predictor."""

    def __init__(self, table: SlotTable, governor: PrefetchGovernor, limit: int, depth: int):
        self.table = table
        self.governor = governor
        self.ledger = PrefetchLedger()
        self.limit = limit
        self.depth = depth
        self.issued = self.completed = self.dropped = self.cancelled = 0

    def admit(self, source: str, rank: int, expert_id: int, hint_token: int, current_token: int,
              prefetches_in_flight: int, reads_pending: int, *, in_prefill: bool = False) -> Assignment | None:
        """The slot to read hint `rank` of `source` into, or None (resident: ignored; refused: dropped).
        `in_prefill`: the current token is a prefill pass (`SlotTable.assign_prefetch`'s `past_layers`)."""
        if self.table.lookup(expert_id) is not None:
            return None  # resident or already loading: nothing to do
        self.governor.noted(source, rank, expert_id, hint_token)
        worth = prefetches_in_flight < self.limit and self.governor.admits(source, rank, reads_pending)
        assignment = self.table.assign_prefetch(expert_id, current_token, past_layers=in_prefill) if worth else None
        if assignment is None:
            self.dropped += 1
            self.ledger.dropped(source)
            return None
        if assignment.wasted_prefetch:
            self.ledger.wasted(assignment.slot)
        self.ledger.issued(source, assignment.slot)
        self.issued += 1
        return assignment

    def acquired(self, result: AcquireResult) -> None:
        """Credit what an acquire did to a prefetch (used, or evicted unused) to its predictor."""
        if result.wasted_prefetch or result.used_prefetch:
            (self.ledger.used if result.used_prefetch else self.ledger.wasted)(result.slot)

    def finished(self, slot: int, ok: bool) -> None:
        """The prefetch read into `slot` ended (ok, failed or cancelled)."""
        self.completed += ok
        self.ledger.completed(slot, ok)

    def stale_slots(self, token: int, expert_ids: Sequence[int],
                    queued: Iterable[tuple[int, int]]) -> list[int]:
        """With the governor on: of the prefetch reads `queued` as (slot, hint token), the slots whose read
        an acquire of `expert_ids` for `token` that missed makes stale (not joined by it or earlier)."""
        if not self.governor.enabled:
            return []
        requested = set(expert_ids)
        stale = []
        for slot, hint_token in queued:
            if not self.governor.is_stale(hint_token, token, self.depth):
                continue
            info = self.table.slot_info(slot)
            if info.expert_id not in requested and not info.pending_leases:
                stale.append(slot)
        return stale

    def cancelled_read(self, slot: int) -> None:
        self.cancelled += 1
        self.ledger.cancelled(slot)

    def counts(self) -> PrefetchCounts:
        table = self.table.counters
        return PrefetchCounts(self.issued, self.completed, table.prefetch_used, table.prefetch_wasted, self.dropped,
                              self.cancelled)
