"""The typed, versioned message protocol of the process graph (docs/pipeline.md, "Messages").

Every message is declared once, in the module of its socket and concern: `control_messages` (a child's
handshake, heartbeat, failure, shutdown), `job_messages` (the jobs' start messages and reports),
`serving_messages` (the serving job), `io_messages` (the I/O worker's slot leases and counters),
`predictor_messages` (observations in; hints, pins, accuracy and progress out), `compute_messages` (expert batch
jobs), `shard_messages` (remote shard groups: one request per layer per shard) and `remote_errors` (`ErrorReply`); `kinds` numbers them. Import them from here.

A message is a frozen dataclass registered with `@message(kind)` (`mer.protocol.schema`): it gets a `KIND` (a
`MessageKind`) and a `VERSION`. On the wire its fields travel in declaration order, so a field is
only ever added at the end (and the version bumped). Field annotations are the wire schema that
`mer.protocol.codec` checks on receipt:

- `int`, `float`, `str`, `bool`; `T | None`; `list[T]`; a record (`NamedTuple`) travels as a list of its fields;
- `ScalarMap` (str -> int | float | str | bool | None) and `JsonMap` (str -> JSON-like values);
- `Annotated[np.ndarray, ArraySpec(...)]`: a numpy array sent as its own zero-copy frame.

`encode` / `decode` turn messages into ZeroMQ frames and back (`mer.protocol.codec`); errors cross
processes via `mer.protocol.remote_errors`.
"""

from mer.protocol.codec import ARRAY_KEY, check_expert_ids, decode, encode
from mer.protocol.compute_messages import (
    Activations, BatchPartials, ComputeItem, ExpertBatchJob, ExpertBatchResult, JobProgress, SliceRange,
)
from mer.protocol.control_messages import ChildFailed, ChildStuck, Heartbeat, Hello, IoWorkerRestarted, Ready, Shutdown
from mer.protocol.io_messages import (
    Acquire, IoProgress, IoStats, LeasesDropped, PredictorReport, PrefetchCounts, ReadCounts, Release, SlotGrant,
    SlotRef, SlotsReady, SplitReads, StatsRequest,
)
from mer.protocol.job_messages import (
    JobDone, PerplexityChunk, StartBenchmark, StartGeneration, StartPerplexity, TokenGenerated,
)
from mer.protocol.kinds import MessageKind
from mer.protocol.predictor_messages import (
    HiddenObserved, HiddenState, PinSet, PredictorProgress, PredictorStats, PrefetchHint, PrefetchHints, RoutingObserved,
)
from mer.protocol.serving_messages import (
    CancelSequence, SequenceDone, SequenceToken, ServeStep, ShardLinkCounts, StartServing, SubmitSequence,
)
from mer.protocol.shard_messages import (
    RemoteShardsSpec, ShardLayerRequest, ShardLayerResult, StartShardGroup, StopShardGroup,
)
from mer.protocol.schema import MESSAGE_TYPES, ArraySpec, JsonMap, ScalarMap
from mer.protocol.remote_errors import (
    UNKNOWN_REQUEST_ID, ErrorFields, ErrorReply, error_fields, error_reply, raise_remote,
)
