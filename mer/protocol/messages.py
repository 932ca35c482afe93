"""Every message of the process graph, declared once (docs/pipeline.md, "Messages").

A message is a frozen dataclass registered with `@message(kind)` (`mer.protocol.schema`): it gets a `KIND` (a
`MessageKind`) and a `VERSION`. On the wire its fields travel in declaration order, so a field is
only ever added at the end (and the version bumped). Field annotations are the wire schema that
`mer.protocol.codec` checks on receipt:

- `int`, `float`, `str`, `bool`; `T | None`; `list[T]`; a record (`NamedTuple`) travels as a list of its fields;
- `ScalarMap` (str -> int | float | str | bool | None) and `JsonMap` (str -> JSON-like values);
- `Annotated[np.ndarray, ArraySpec(...)]`: a numpy array sent as its own zero-copy frame.

Weights never travel in messages: compute work names slots by `(expert_id, slot, generation)`.
"""

from dataclasses import field as dataclass_field
from enum import IntEnum
from typing import Annotated, NamedTuple

import numpy as np

from mer.errors import ConfigError, ProtocolError
from mer.metrics.events import LayerHintCounts, PredictorCounters
from mer.metrics.stats import LatencyHistogram
from mer.protocol.schema import ArraySpec, JsonMap, ScalarMap, equal_with_arrays, message


class MessageKind(IntEnum):
    """The one-byte tag in frame 0 that names a message type."""

    HELLO = 1
    READY = 2
    CHILD_FAILED = 3
    SHUTDOWN = 4
    JOB_DONE = 5
    START_BENCHMARK = 6
    TOKEN_GENERATED = 7
    START_GENERATION = 8
    HEARTBEAT = 9
    START_SERVING = 19
    ACQUIRE = 10
    SLOTS_READY = 11
    RELEASE = 12
    PREFETCH_HINTS = 13
    STATS_REQUEST = 14
    IO_STATS = 15
    PREDICTOR_STATS = 16
    PIN_SET = 17
    SPLIT_READS = 18
    LEASES_DROPPED = 20
    IO_WORKER_RESTARTED = 21
    EXPERT_BATCH_JOB = 22
    EXPERT_BATCH_RESULT = 23
    JOB_PROGRESS = 24
    CHILD_STUCK = 25
    IO_PROGRESS = 26
    PREDICTOR_PROGRESS = 27
    ROUTING_OBSERVED = 30
    HIDDEN_OBSERVED = 31
    ERROR_REPLY = 40
    SUBMIT_SEQUENCE = 50
    CANCEL_SEQUENCE = 51
    SEQUENCE_TOKEN = 52
    SEQUENCE_DONE = 53
    SERVE_STEP = 54
    START_PERPLEXITY = 60
    PERPLEXITY_CHUNK = 61


Activations = Annotated[np.ndarray, ArraySpec("float32", ("batch", "d_model"))]
BatchPartials = Annotated[np.ndarray, ArraySpec("float32", ("slices", "rows", "d_model"))]
HiddenState = Annotated[np.ndarray, ArraySpec("float32", ("d_model",))]


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


class ComputeItem(NamedTuple):
    """One expert of a compute job: where its payload lies and which MoE layer it belongs to."""

    expert_id: int
    slot: int
    generation: int
    moe_layer: int


class SliceRange(NamedTuple):
    """A half-open range `[start, stop)` of d_ff rows."""

    start: int
    stop: int


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


class PrefetchHint(NamedTuple):
    """An expert the predictor expects soon; a higher score means more confident."""

    expert_id: int
    score: float


# --- control.sock: handshake and shutdown ---------------------------------------------------------


@message(MessageKind.HELLO)
class Hello:
    """A child's first word after it starts: who it is."""

    name: str
    pid: int


@message(MessageKind.READY)
class Ready:
    """A child finished initialising; `info` holds what the supervisor logs (backend, slots...)."""

    name: str
    pid: int
    info: ScalarMap


@message(MessageKind.CHILD_FAILED)
class ChildFailed:
    """A child hit a fatal error (in start-up or later) and is about to exit."""

    name: str
    error_type: str
    message: str
    traceback: str


@message(MessageKind.SHUTDOWN)
class Shutdown:
    """The supervisor asks a child to drain and exit."""

    reason: str


@message(MessageKind.HEARTBEAT)
class Heartbeat:
    """A ready child's event loop is alive: sent every `mer.runtime.stall_watch.heartbeat_interval_s`."""

    name: str


@message(MessageKind.JOB_DONE)
class JobDone:
    """The router finished its job; `summary` is the job's typed summary as JSON (`mer.metrics.summary`)."""

    summary: JsonMap


@message(MessageKind.IO_WORKER_RESTARTED)
class IoWorkerRestarted:
    """The supervisor to the router: the I/O worker `name` died and a new process (`pid`) is starting in
    its place. Every lease and request of the dead worker is void: the router fails its requests over
    to the new worker (`mer.router.clients.IoClient`)."""

    name: str
    pid: int


@message(MessageKind.CHILD_STUCK)
class ChildStuck:
    """The router to the supervisor: child `name` (process `pid`; 0 when the router does not know it, as
    for the first I/O worker before its first `IoProgress`) has had work in hand (`work`: `compute job 12`,
    `I/O request 40`) and shown no progress on it for `silent_s` seconds, more than `job_deadline_s`:
    it is stuck (a busy loop, a deadlock that still uses CPU); the supervisor kills it like a stall."""

    name: str
    pid: int
    work: str
    silent_s: float


@message(MessageKind.START_BENCHMARK)
class StartBenchmark:
    """Every child is ready: run the expert-streaming benchmark of the run's configuration."""


@message(MessageKind.START_GENERATION)
class StartGeneration:
    """Every child is ready: generate from `model` after the prompt's token ids (used exactly as given).

    Checked when built (in the CLI, before any process starts) and when decoded: a bad field is a
    `ConfigError` naming it."""

    model: str  # the GGUF whose dense weights the router maps (its experts are in the run's store)
    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # the sampler's top-k (0: no cut); the routing k comes from the model
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    end_ids: list[int] = dataclass_field(default_factory=list)  # ids that end generation (EOS, end of turn)
    dump_logits: str | None = None  # .npy file for the logits each generated token was chosen from

    def __post_init__(self) -> None:
        if not self.prompt_tokens:
            raise ConfigError("the prompt is empty: generation needs at least one token")
        for name in ("prompt_tokens", "end_ids"):
            values = getattr(self, name)
            if any(isinstance(value, bool) or not isinstance(value, int) or value < 0 for value in values):
                raise ConfigError(f"{name} must be token ids (integers >= 0), got {list(values)[:8]}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")


@message(MessageKind.TOKEN_GENERATED)
class TokenGenerated:
    """The router chose the `index`-th generated token (a generation job), sent as soon as it is known."""

    index: int
    token: int


# --- control.sock: the serving job (docs/serving.md) -----------------------------------------------


@message(MessageKind.START_SERVING)
class StartServing:
    """Every child is ready: serve requests for `model` until Shutdown (the serving job). At most
    `max_sequences` sequences decode together; their KV caches come from a pool of `kv_positions`
    positions; `end_ids` end a sequence unless its request says `ignore_eos`."""

    model: str
    max_sequences: int
    kv_positions: int
    end_ids: list[int] = dataclass_field(default_factory=list)

    def check(self) -> None:
        if self.max_sequences < 1 or self.kv_positions < 1:
            raise ProtocolError(f"StartServing: max_sequences {self.max_sequences} and kv_positions "
                                f"{self.kv_positions} must be >= 1")


@message(MessageKind.SUBMIT_SEQUENCE)
class SubmitSequence:
    """A request to serve (supervisor -> router): generate up to `max_tokens` after the prompt's ids;
    `logprobs` > 0 asks for that many most likely alternatives of each token (and its own logprob)."""

    request_id: int
    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int = 0

    def check(self) -> None:
        if not self.prompt_tokens or min(self.prompt_tokens) < 0:
            raise ProtocolError(f"SubmitSequence {self.request_id}: the prompt must be token ids, "
                                f"got {self.prompt_tokens[:8]}")
        if self.max_tokens < 1 or self.logprobs < 0:
            raise ProtocolError(f"SubmitSequence {self.request_id}: max_tokens {self.max_tokens} must be >= 1, "
                                f"logprobs {self.logprobs} >= 0")


@message(MessageKind.CANCEL_SEQUENCE)
class CancelSequence:
    """The client is gone or a stop string matched (supervisor -> router): free the sequence at the next step."""

    request_id: int
    reason: str


@message(MessageKind.SEQUENCE_TOKEN)
class SequenceToken:
    """The `index`-th generated token of a served sequence (router -> supervisor), sent as soon as it is
    chosen; with logprobs, its log probability and the most likely alternatives (ids and log probabilities)."""

    request_id: int
    index: int
    token: int
    logprob: float | None = None
    top_ids: list[int] = dataclass_field(default_factory=list)
    top_logprobs: list[float] = dataclass_field(default_factory=list)


@message(MessageKind.SEQUENCE_DONE)
class SequenceDone:
    """A served sequence ended (router -> supervisor): `stop_reason` is one of generation's stop reasons,
    `cancelled`, or `error` (with `error` saying why); its KV positions are free again."""

    request_id: int
    stop_reason: str
    prompt_tokens: int
    tokens: int
    error: str = ""


@message(MessageKind.SERVE_STEP)
class ServeStep:
    """The serving job's figures after a step (router -> supervisor; step 0: the model is loaded and
    requests are taken). `sequences`/`tokens`: this step's batch; the rest are cumulative counters of
    the job (expert lookups and times) and of the I/O worker (reads, bytes, prefetches)."""

    step: int
    sequences: int
    tokens: int
    prefill_tokens: int
    step_us: float
    active: int
    waiting: int
    kv_positions_used: int
    hits: int
    misses: int
    io_wait_us: float
    compute_us: float
    reads: int
    bytes_read: int
    prefetches_issued: int
    prefetches_used: int
    prefetches_wasted: int
    worker_busy_us: list[float]  # per compute worker: the kernels' time of its batch jobs
    resident_experts: list[int]  # per MoE layer: its experts in the cache (resident or loading) now
    slots_used: int
    slots_pinned: int
    io_queue_depth: int



# --- control.sock: the perplexity job (`mer-pipeline perplexity`) ---------------------------------


@message(MessageKind.START_PERPLEXITY)
class StartPerplexity:
    """Every child is ready: compute the perplexity of `tokens` (the text's ids, BOS first when the
    vocabulary adds one) with `model`, in `num_chunks` chunks of `context` tokens, each chunk's first
    token replaced by `bos_id` when it is not None (`mer.model.perplexity`). Checked when built (in the
    CLI, before any process starts) and when decoded."""

    model: str  # the GGUF whose dense weights the router maps (its experts are in the run's store)
    tokens: list[int]
    context: int
    num_chunks: int
    bos_id: int | None = None

    def __post_init__(self) -> None:
        if any(isinstance(value, bool) or not isinstance(value, int) or value < 0 for value in self.tokens):
            raise ConfigError(f"tokens must be token ids (integers >= 0), got {list(self.tokens)[:8]}")
        if self.context < 4 or self.num_chunks < 1 or self.num_chunks * self.context > len(self.tokens):
            raise ConfigError(f"StartPerplexity: {self.num_chunks} chunks of {self.context} tokens do not fit "
                              f"{len(self.tokens)} tokens (context >= 4, chunks >= 1)")


@message(MessageKind.PERPLEXITY_CHUNK)
class PerplexityChunk:
    """A chunk is scored (router -> supervisor): `chunk` (0-based) of `num_chunks`, its `count` scored
    tokens with the sums of their negative log-likelihoods `nll` and of their squares `nll2`, the
    perplexity over every chunk so far (`running_ppl`) and the chunk's seconds."""

    chunk: int
    num_chunks: int
    count: int
    nll: float
    nll2: float
    running_ppl: float
    seconds: float

# --- io.sock: slot leases and prefetch ------------------------------------------------------------


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


@message(MessageKind.PREFETCH_HINTS)
class PrefetchHints:
    """Experts worth loading ahead of `token`, from the named predictor `source`."""

    token: int
    hints: list[PrefetchHint]
    source: str


@message(MessageKind.PREDICTOR_STATS, version=2)
class PredictorStats:
    """The cumulative hint accuracy of the named predictor `source`, as it scores itself
    (`mer.predict.accuracy`); the gate adds its accuracy per target layer."""

    source: str
    predictions: int
    top1_hits: int
    topk_found: int
    topk_observed: int
    per_layer: list[LayerHintCounts]


@message(MessageKind.PIN_SET)
class PinSet:
    """The experts predictor `source` wants pinned now, most wanted first (replaces its previous set)."""

    source: str
    expert_ids: list[int]


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


# --- compute.sock: SwiGLU on slot payloads --------------------------------------------------------


@message(MessageKind.EXPERT_BATCH_JOB)
class ExpertBatchJob:
    """Compute the assigned d_ff slices of every item (an expert in a slot) on the item's own rows of `x`.

    The one compute message: a model's MoE block sends the tokens routed to each expert, the
    benchmark one synthetic hidden state per expert. Item `i` is computed on the rows
    `x[row_offsets[i]:row_offsets[i + 1]]` (expert-major); `row_offsets` has one entry more than
    `items`, starts at 0, grows strictly and ends at the number of rows of `x`."""

    job_id: int
    items: list[ComputeItem]
    slices: list[SliceRange]
    x: Activations
    row_offsets: list[int]

    __eq__ = equal_with_arrays

    def check(self) -> None:
        for index, (start, stop) in enumerate(self.slices):
            if not 0 <= start < stop:
                raise ProtocolError(f"ExpertBatchJob.slices[{index}]: [{start}, {stop}) is not a non-empty range")
        offsets, rows = self.row_offsets, self.x.shape[0]
        if len(offsets) != len(self.items) + 1 or offsets[0] != 0 or offsets[-1] != rows:
            raise ProtocolError(f"ExpertBatchJob.row_offsets {offsets[:8]}... must have {len(self.items) + 1} "
                                f"entries from 0 to the {rows} rows of x")
        if any(stop <= start for start, stop in zip(offsets, offsets[1:])):
            raise ProtocolError(f"ExpertBatchJob.row_offsets {offsets[:8]}... must grow strictly (each item has rows)")


@message(MessageKind.EXPERT_BATCH_RESULT)
class ExpertBatchResult:
    """The partial outputs of an `ExpertBatchJob`: one d_model vector per (assigned slice, row of x)."""

    job_id: int
    worker: int
    partials: BatchPartials
    compute_us: float

    __eq__ = equal_with_arrays


@message(MessageKind.JOB_PROGRESS)
class JobProgress:
    """A compute worker is still working on job `job_id`: `items_done` of its items are computed. Sent
    between items at most every `mer.router.work_deadlines.progress_interval_s` while a job runs (the
    router's per-job deadline, `job_deadline_s`, restarts at each)."""

    job_id: int
    worker: int
    items_done: int


# --- observe.sock: routing history for the predictor ----------------------------------------------


@message(MessageKind.ROUTING_OBSERVED)
class RoutingObserved:
    """The router's routing decision for one token and MoE layer."""

    token: int
    layer: int
    expert_ids: list[int]
    weights: list[float]

    def check(self) -> None:
        if len(self.expert_ids) != len(self.weights):
            raise ProtocolError(
                f"RoutingObserved: {len(self.expert_ids)} expert_ids but {len(self.weights)} weights"
            )


@message(MessageKind.HIDDEN_OBSERVED)
class HiddenObserved:
    """The residual stream of one token at a MoE layer, after its attention (the input of that layer's
    ffn_norm), for the next-layer gate predictor; sent just before that layer's `RoutingObserved`,
    and only when the `gate` predictor is on with prefetch."""

    token: int
    layer: int
    hidden: HiddenState

    __eq__ = equal_with_arrays


# --- predictor_progress.sock: the predictor's progress, for the router's deadline ------------------


@message(MessageKind.PREDICTOR_PROGRESS)
class PredictorProgress:
    """The predictor (process `pid`) has consumed `observations` messages of `observe.sock` in its lifetime
    and is working on them: sent by its event loop every `mer.router.work_deadlines.progress_interval_s`
    while it consumes observations (or awaits a send of its hints), so a predictor spinning in a busy
    loop sends none (the router's deadline on observations it sent, `job_deadline_s`)."""

    pid: int
    observations: int


# --- any request/reply socket ---------------------------------------------------------------------


UNKNOWN_REQUEST_ID = -1  # the request_id of an ErrorReply to a message too malformed to name its request


@message(MessageKind.ERROR_REPLY)
class ErrorReply:
    """A request failed on the other side; raise it locally with `raise_remote`. A malformed message
    is answered with `request_id` UNKNOWN_REQUEST_ID (the asker logs it and drops it)."""

    request_id: int
    error_type: str
    message: str
    traceback: str

