"""The I/O worker's read statistics: counts and bytes by kind, the reads after a split token, and the
latency histogram. Aggregates only, so `IoStats` does not grow with the run."""

from __future__ import annotations

from mer.protocol import ReadCounts
from mer.metrics.stats import LatencyHistogram, LatencyRecorder

READ_KINDS = ("foreground", "prefetch")


class ReadTally:
    """Counts every finished read; `split_token` is set by `SplitReads` (0: every read counts there too)."""

    def __init__(self) -> None:
        self.reads = {kind: 0 for kind in READ_KINDS}
        self.nbytes = {kind: 0 for kind in READ_KINDS}
        self.split_token = 0
        self.split_reads = self.split_nbytes = 0
        self.latency = LatencyRecorder()

    @property
    def num_reads(self) -> int:
        return sum(self.reads.values())

    def add(self, kind: str, nbytes: int, latency_us: float, token: int) -> None:
        """Count one finished read of `kind` for `token` (its acquire's, or its hints')."""
        self.reads[kind] += 1
        self.nbytes[kind] += nbytes
        if token >= self.split_token:
            self.split_reads += 1
            self.split_nbytes += nbytes
        self.latency.add(latency_us)

    def by_kind(self, kind: str) -> ReadCounts:
        return ReadCounts(self.reads[kind], self.nbytes[kind])

    def split(self) -> ReadCounts:
        return ReadCounts(self.split_reads, self.split_nbytes)

    def latency_histogram(self) -> LatencyHistogram:
        return self.latency.snapshot()
