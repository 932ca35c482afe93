"""The typed, versioned message protocol of the process graph (docs/pipeline.md, "Messages").

Every message is declared in `mer.protocol.messages`; `encode` / `decode` turn them into ZeroMQ
frames and back (`mer.protocol.codec`); errors cross processes via `mer.protocol.remote_errors`.
"""

from mer.protocol.codec import ARRAY_KEY, decode, encode
from mer.protocol.messages import (
    MESSAGE_TYPES, Acquire, Activations, ArraySpec, BatchPartials, ChildFailed, ComputeItem, ErrorReply,
    ExpertBatchJob, ExpertBatchResult, Hello, HiddenObserved, HiddenState, IoStats, JobDone, JsonMap, MessageKind,
    PinSet, PredictorReport, PredictorStats, PrefetchCounts, PrefetchHint, PrefetchHints, ReadCounts, Ready, Release,
    RoutingObserved, ScalarMap, Shutdown, SliceRange, SlotGrant, SlotRef, SlotsReady, SplitReads, StartBenchmark,
    StartGeneration, StatsRequest, TokenGenerated,
)
from mer.protocol.remote_errors import ErrorFields, error_fields, error_reply, raise_remote
