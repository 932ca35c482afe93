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

from dataclasses import asdict, dataclass

from mer.protocol import PredictorReport, PredictorStats
from mer.metrics.events import LayerHintCounts, PredictorCounters


@dataclass
class _SourceCounts:
    """One predictor's prefetch counters."""

    hints: int = 0
    issued: int = 0
    completed: int = 0
    used: int = 0
    wasted: int = 0
    dropped: int = 0
    cancelled: int = 0


class PrefetchLedger:
    """Prefetch counters by predictor name, with the predictor of every unused prefetched slot."""

    def __init__(self) -> None:
        self.counts: dict[str, _SourceCounts] = {}
        self.accuracy: dict[str, PredictorStats] = {}
        self._slot_source: dict[int, str] = {}  # prefetched slots not yet used, wasted or failed

    def _of(self, source: str) -> _SourceCounts:
        return self.counts.setdefault(source, _SourceCounts())

    def hinted(self, source: str, count: int = 1) -> None:
        self._of(source).hints += count

    def dropped(self, source: str) -> None:
        self._of(source).dropped += 1

    def issued(self, source: str, slot: int) -> None:
        self._of(source).issued += 1
        self._slot_source[slot] = source

    def completed(self, slot: int, ok: bool) -> None:
        """A prefetch read into `slot` finished (a failed read's slot is vacated: neither used nor wasted)."""
        source = self._slot_source.get(slot)
        if source is None:
            return
        if ok:
            self._of(source).completed += 1
        else:
            del self._slot_source[slot]

    def cancelled(self, slot: int) -> None:
        """The queued prefetch read into `slot` was cancelled (its completion callback then sees it failed)."""
        source = self._slot_source.get(slot)
        if source is not None:
            self._of(source).cancelled += 1

    def used(self, slot: int) -> None:
        """The prefetch read into `slot` served its first acquire (`AcquireResult.used_prefetch`)."""
        source = self._slot_source.pop(slot, None)
        if source is not None:
            self._of(source).used += 1

    def wasted(self, slot: int) -> None:
        """`slot`'s unused prefetch was evicted (`wasted_prefetch`); call before the slot is issued again."""
        source = self._slot_source.pop(slot, None)
        if source is not None:
            self._of(source).wasted += 1

    def reported(self, stats: PredictorStats) -> None:
        """The predictor's own latest accuracy counters for `stats.source`."""
        self._of(stats.source)
        self.accuracy[stats.source] = stats

    def reports(self) -> list[PredictorReport]:
        """Every predictor's counters, with its reported accuracy (per layer for the gate), names sorted."""
        return [self._report(name) for name in sorted(self.counts)]

    def _report(self, name: str) -> PredictorReport:
        accuracy = self.accuracy.get(name)
        if accuracy is None:
            return PredictorReport(name, PredictorCounters(**asdict(self.counts[name])), [])
        counters = PredictorCounters(**asdict(self.counts[name]), predictions=accuracy.predictions,
                                     top1_hits=accuracy.top1_hits, topk_found=accuracy.topk_found,
                                     topk_observed=accuracy.topk_observed)
        return PredictorReport(name, counters, [LayerHintCounts(*layer) for layer in accuracy.per_layer])
