"""The typed, versioned message protocol of the process graph (docs/pipeline.md, "Messages").

Every message is declared in `mer.protocol.messages`; `encode` / `decode` turn them into ZeroMQ
frames and back (`mer.protocol.codec`); errors cross processes via `mer.protocol.remote_errors`.
"""

from mer.protocol.codec import ARRAY_KEY, decode, encode
from mer.protocol.messages import (
    MESSAGE_TYPES,
    Acquire,
    Activations,
    ArraySpec,
    BatchPartials,
    ChildFailed,
    ComputeItem,
    ErrorReply,
    ExpertBatchJob,
    ExpertBatchResult,
    Hello,
    HiddenObserved,
    HiddenState,
    IoStats,
    JobDone,
    JsonMap,
    Message,
    MessageKind,
    PrefetchHint,
    PinSet,
    PrefetchHints,
    PredictorReport,
    PredictorStats,
    PrefetchCounts,
    ReadCounts,
    Ready,
    Release,
    RoutingObserved,
    ScalarMap,
    Shutdown,
    SliceRange,
    SlotGrant,
    SlotRef,
    SlotsReady,
    SplitReads,
    StartBenchmark,
    StartGeneration,
    StatsRequest,
    TokenGenerated,
)
from mer.protocol.remote_errors import ErrorFields, error_fields, error_reply, error_type_name, raise_remote

__all__ = [
    "ARRAY_KEY", "MESSAGE_TYPES", "Acquire", "Activations", "ArraySpec", "ChildFailed", "ComputeItem",
    "ErrorFields", "ErrorReply", "Hello", "IoStats", "JobDone", "JsonMap",
    "Message", "MessageKind", "PrefetchHint", "PinSet", "PrefetchHints", "PredictorStats", "Ready", "Release",
    "RoutingObserved", "ScalarMap", "Shutdown", "SliceRange", "SlotGrant", "SlotRef", "SlotsReady", "StartBenchmark",
    "StartGeneration",
    "StatsRequest", "decode", "encode", "error_fields", "error_reply", "error_type_name", "raise_remote",
    "TokenGenerated", "ExpertBatchJob", "ExpertBatchResult", "BatchPartials", "HiddenObserved", "HiddenState",
    "PredictorReport", "PrefetchCounts", "ReadCounts", "SplitReads",
]
