"""The I/O worker's messages on `io.sock` (docs/pipeline.md, "Messages"): slot leases (`Acquire` ->
`SlotsReady`, `Release`), its progress, its counters, and the records they carry. What the predictor
sends it on the same socket: `mer.protocol.predictor_messages`.
"""

from typing import NamedTuple

from mer.metrics.events import LayerHintCounts, PredictorCounters
from mer.metrics.stats import LatencyHistogram
from mer.protocol.kinds import MessageKind
from mer.protocol.schema import message


class SlotRef(NamedTuple):
    """A reference to the expert held in a slot; valid while the slot keeps this generation."""

    expert_id: int
    slot: int
    generation: int


class SlotGrant(NamedTuple):
    """A leased slot, with how it was found: a hit, or a miss with its read latency."""

    expert_id: int
    slot: int
    generation: int
    hit: bool
    read_us: float  # 0 for a hit
    joined_prefetch: bool  # a miss that waited on a prefetch already in flight

    @property
    def ref(self) -> SlotRef:
        return SlotRef(self.expert_id, self.slot, self.generation)


class ReadCounts(NamedTuple):
    """Expert reads finished, and the bytes they read into slots (header page included)."""

    reads: int
    nbytes: int


class PrefetchCounts(NamedTuple):
    """The I/O worker's prefetch counters: hints admitted as reads (`issued`), reads finished
    (`completed`), prefetched slots used before eviction (`used`) or evicted unused (`wasted`), hints
    refused (`dropped`) and queued reads cancelled as stale (`cancelled`)."""

    issued: int
    completed: int
    used: int
    wasted: int
    dropped: int
    cancelled: int


class PredictorReport(NamedTuple):
    """One predictor's counters at the I/O worker, with the gate's per-layer accuracies ([] for others)."""

    name: str
    counters: PredictorCounters
    per_layer: list[LayerHintCounts]


# --- io.sock: slot leases, progress and stats -----------------------------------------------------


@message(MessageKind.ACQUIRE, version=2)
class Acquire:
    """Lease slots holding `expert_ids` for `token`, reading the missing ones."""

    request_id: int
    token: int
    expert_ids: list[int]


@message(MessageKind.SLOTS_READY, version=2)
class SlotsReady:
    """Answer to `Acquire`, in parts: the hits' grants at once, then one part per miss as soon as its
    read is done (the last part has `final` true); a request of hits only is one part. Every requested
    expert is granted once; the router computes each part as it comes."""

    request_id: int
    refs: list[SlotGrant]
    final: bool


@message(MessageKind.RELEASE)
class Release:
    """Return leases taken with `Acquire`."""

    refs: list[SlotRef]


@message(MessageKind.LEASES_DROPPED)
class LeasesDropped:
    """The router to a restarted I/O worker: it holds no lease of the dead worker's slots any more
    (every compute job naming one has ended), so the new worker may write slots. Until it comes, a
    restarted I/O worker writes nothing (it refuses `Acquire` and drops prefetch hints); `restarts`
    counts the I/O worker's restarts the router has seen, for the logs."""

    restarts: int


@message(MessageKind.IO_PROGRESS)
class IoProgress:
    """The I/O worker (process `pid`) is still working on this peer's requests, the oldest of them being
    `request_id` (reads in flight, or waiting for a slot to be released): sent every
    `mer.router.work_deadlines.progress_interval_s` while any `Acquire` of the peer is unanswered. Its
    event loop sends it, so a worker spinning in a busy loop sends none (the router's deadline,
    `job_deadline_s`); `reads_done` counts the reads it has finished in its lifetime."""

    request_id: int
    pid: int
    reads_done: int


@message(MessageKind.STATS_REQUEST)
class StatsRequest:
    """Ask the I/O worker for its counters."""

    request_id: int


@message(MessageKind.SPLIT_READS)
class SplitReads:
    """Count the reads for tokens >= `token` (of an acquire, or of the hints that started a prefetch)
    also apart, in `IoStats.split_reads`: generation names its prompt length, so the bytes read for
    its decode steps are exact. Sent before the first `Acquire` on the same socket."""

    token: int


@message(MessageKind.IO_STATS, version=3)
class IoStats:
    """Answer to `StatsRequest`: the I/O worker's counters. Aggregates only, so its size does not
    grow with the run (`tests/integration/test_io_stats_size.py`)."""

    request_id: int
    io_backend: str
    o_direct: bool
    foreground_reads: ReadCounts
    prefetch_reads: ReadCounts
    split_reads: ReadCounts  # the reads for tokens >= the `SplitReads` token (all of them without one)
    read_latency_us: LatencyHistogram  # every finished read, foreground and prefetch
    prefetch: PrefetchCounts
    predictors: list[PredictorReport]  # by name
    slot_experts: list[int]  # the expert each slot holds or is loading now (-1: free); one entry per slot
    pinned_slots: int  # slots of pinned experts now
    queue_depth: int  # reads in flight or queued now

    @property
    def reads(self) -> ReadCounts:
        """Every finished read."""
        return ReadCounts(self.foreground_reads.reads + self.prefetch_reads.reads,
                          self.foreground_reads.nbytes + self.prefetch_reads.nbytes)
