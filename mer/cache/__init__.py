"""The expert cache: slot states (`slot_table`) and eviction policies (`policy`), owned by the I/O worker."""

from mer.cache.policy import POLICIES, EvictionPolicy, LruPolicy, make_policy
from mer.cache.slot_table import (
    AcquireKind,
    AcquireResult,
    Assignment,
    CacheCounters,
    SlotInfo,
    SlotState,
    SlotTable,
)

__all__ = [
    "POLICIES",
    "AcquireKind",
    "AcquireResult",
    "Assignment",
    "CacheCounters",
    "EvictionPolicy",
    "LruPolicy",
    "SlotInfo",
    "SlotState",
    "SlotTable",
    "make_policy",
]
