"""The typed, versioned message protocol of the process graph (docs/pipeline.md, "Messages").

Every message is declared in `mer.protocol.messages`; `encode` / `decode` turn them into ZeroMQ
frames and back (`mer.protocol.codec`); errors cross processes via `mer.protocol.remote_errors`.
"""

from mer.protocol.codec import ARRAY_KEY, check_expert_ids, decode, encode
from mer.protocol.messages import (
    Acquire, Activations, BatchPartials, ChildFailed, ChildStuck, JobProgress, IoProgress, ComputeItem, ErrorReply,
    ExpertBatchJob, ExpertBatchResult, Heartbeat, Hello, HiddenObserved, HiddenState, IoStats, IoWorkerRestarted, JobDone,
    LeasesDropped, MessageKind,
    PinSet, PredictorProgress, PredictorReport, PredictorStats, PrefetchCounts, PrefetchHint, PrefetchHints, ReadCounts, Ready, Release,
    RoutingObserved, Shutdown, SliceRange, SlotGrant, SlotRef, SlotsReady, SplitReads, StartBenchmark,
    StartGeneration, StatsRequest, TokenGenerated, UNKNOWN_REQUEST_ID,
    CancelSequence, SequenceDone, SequenceToken, ServeStep, StartServing, SubmitSequence,
    PerplexityChunk, StartPerplexity,
)
from mer.protocol.schema import MESSAGE_TYPES, ArraySpec, JsonMap, ScalarMap
from mer.protocol.remote_errors import ErrorFields, error_fields, error_reply, raise_remote
