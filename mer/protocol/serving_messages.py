"""The serving job's messages on `control.sock` (docs/serving.md): its start, the requests the supervisor
hands the router, and the tokens, ends and step figures the router sends back.
"""

from dataclasses import field as dataclass_field
from typing import NamedTuple

from mer.errors import ProtocolError
from mer.protocol.kinds import MessageKind
from mer.protocol.schema import message
from mer.protocol.shard_messages import RemoteShardsSpec


# --- control.sock: the serving job (docs/serving.md) -----------------------------------------------


@message(MessageKind.START_SERVING, 2)
class StartServing:
    """Every child is ready: serve requests for `model` until Shutdown (the serving job). At most
    `max_sequences` sequences decode together; their KV caches come from a pool of `kv_positions`
    positions; `end_ids` end a sequence unless its request says `ignore_eos`."""

    model: str
    max_sequences: int
    kv_positions: int
    end_ids: list[int] = dataclass_field(default_factory=list)
    remote_shards: RemoteShardsSpec | None = None  # the experts on remote shard groups (`serve --cluster`)

    def check(self) -> None:
        if self.remote_shards is not None:
            self.remote_shards.check()
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


class ShardLinkCounts(NamedTuple):
    """One remote shard group's cumulative counters (`serve --cluster`; `mer.cluster.shard_link_stats`)."""

    shard: int
    requests: int
    rows: int
    bytes_sent: int
    bytes_received: int
    round_trip_us_total: float
    failovers: int
    errors: int
    down: bool


@message(MessageKind.SERVE_STEP, 2)
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
    shard_links: list[ShardLinkCounts] = dataclass_field(default_factory=list)  # per shard, with --cluster
