"""The kind of every message of the process graph: the one-byte tag in frame 0 (`mer.protocol.codec`).

Each number is assigned here once and names one message type (declared in `mer.protocol`'s message
modules, registered with `@message(kind)`); a number is part of the wire format and never changes.
"""

from enum import IntEnum


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
    SHARD_LAYER_REQUEST = 70
    SHARD_LAYER_RESULT = 71
    START_SHARD_GROUP = 72
    STOP_SHARD_GROUP = 73
