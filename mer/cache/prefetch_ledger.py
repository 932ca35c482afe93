"""Per-predictor prefetch counters of the I/O worker: who hinted what, and what became of it.

The slot table counts prefetch use and waste for all prefetches together; the ledger attributes
them to the predictor (`PrefetchHints.source`) whose hint started each read, by slot:

- `hints`: hints received; `issued`: reads started for them; `dropped`: hints refused by the
  governor (resident or loading experts are neither issued nor dropped);
- `completed`: prefetch reads finished successfully; `cancelled`: queued reads the governor
  cancelled as stale before they started (their slots are vacated: neither used nor wasted);
- `used`: prefetched slots whose first foreground acquire came before their eviction (a hit or a
  join of the read in flight); `wasted`: prefetched slots evicted before any foreground use.
So at any moment `used + wasted <= completed`, `completed + cancelled <= issued` (a joined read
completes before the acquire that joined it is answered) and `issued + dropped <= hints`.
The accuracy counters the predictor reports about itself (`PredictorStats`) are merged in.
"""

from __future__ import annotations

from collections import Counter

from mer.protocol import PredictorReport, PredictorStats
from mer.metrics.events import LayerHintCounts, PredictorCounters

ACCURACY_FIELDS = ("predictions", "top1_hits", "topk_found", "topk_observed")  # of `PredictorStats`


class PrefetchLedger:
    """Prefetch counters by predictor name, with the predictor of every unused prefetched slot."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}  # by name: the `PredictorCounters` prefetch fields
        self.accuracy: dict[str, PredictorStats] = {}
        self._slot_source: dict[int, str] = {}  # prefetched slots not yet used, wasted or failed

    def _count(self, source: str | None, counter: str, count: int = 1) -> None:
        if source is not None:
            self.counts.setdefault(source, Counter())[counter] += count

    def hinted(self, source: str, count: int = 1) -> None:
        self._count(source, "hints", count)

    def dropped(self, source: str) -> None:
        self._count(source, "dropped")

    def issued(self, source: str, slot: int) -> None:
        self._count(source, "issued")
        self._slot_source[slot] = source

    def completed(self, slot: int, ok: bool) -> None:
        """A prefetch read into `slot` finished (a failed read's slot is vacated: neither used nor wasted)."""
        if ok:
            self._count(self._slot_source.get(slot), "completed")
        else:
            self._slot_source.pop(slot, None)

    def cancelled(self, slot: int) -> None:
        """The queued prefetch read into `slot` was cancelled (its completion callback then sees it failed)."""
        self._count(self._slot_source.get(slot), "cancelled")

    def used(self, slot: int) -> None:
        """The prefetch read into `slot` served its first acquire (`AcquireResult.used_prefetch`)."""
        self._count(self._slot_source.pop(slot, None), "used")

    def wasted(self, slot: int) -> None:
        """`slot`'s unused prefetch was evicted (`wasted_prefetch`); call before the slot is issued again."""
        self._count(self._slot_source.pop(slot, None), "wasted")

    def reported(self, stats: PredictorStats) -> None:
        """The predictor's own latest accuracy counters for `stats.source`."""
        self._count(stats.source, "hints", 0)
        self.accuracy[stats.source] = stats

    def reports(self) -> list[PredictorReport]:
        """Every predictor's counters, with its reported accuracy (per layer for the gate), names sorted."""
        return [self._report(name) for name in sorted(self.counts)]

    def _report(self, name: str) -> PredictorReport:
        accuracy = self.accuracy.get(name)
        scores = {key: getattr(accuracy, key) for key in ACCURACY_FIELDS} if accuracy is not None else {}
        per_layer = [LayerHintCounts(*layer) for layer in accuracy.per_layer] if accuracy is not None else []
        return PredictorReport(name, PredictorCounters(**self.counts[name], **scores), per_layer)
