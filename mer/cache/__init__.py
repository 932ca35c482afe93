"""The expert cache: slot states (`slot_table`) and eviction policies (`policy`), owned by the I/O worker."""

from mer.cache.policy import EvictionPolicy, LruPolicy, make_policy
from mer.cache.slot_table import AcquireKind, SlotState, SlotTable

__all__ = ["AcquireKind", "EvictionPolicy", "LruPolicy", "SlotState", "SlotTable", "make_policy"]
