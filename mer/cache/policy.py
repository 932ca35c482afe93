"""Eviction policies: which resident slot to give up when the slot table needs room.

A policy only ranks slots. The slot table (`mer.cache.slot_table`) owns the states and decides
which slots may be evicted at all (READY, unleased, unpinned, and for prefetches not used in the
current token); it tells the policy about every insert, access and removal, and asks it for a
victim among the evictable slots:

    record_insert(slot, expert_id)     the slot was assigned to expert_id (a read starts)
    record_access(slot, expert_id)     a foreground request used the expert in that slot
    record_removal(slot, expert_id)    the slot was evicted, or its read failed
    choose_victim(is_evictable)        the best slot to evict among those for which
                                       is_evictable(slot) is true, or None

Each call is deterministic: the same sequence of calls gives the same victims, so the live I/O
worker and the offline simulator (`mer-pipeline trace simulate`) agree exactly.

Adding a policy: subclass `EvictionPolicy` and register it in `POLICIES`. An LFU keeps per-expert
counts in `record_access` (they may outlive the slot); Belady's MIN gets the trace's future from
the simulator, which advances a cursor before each request, and in `choose_victim` returns the
evictable slot whose expert is next used furthest ahead (ties by lowest slot). Policies that need
more than the name to be built take keyword options in `make_policy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, ClassVar

from mer.errors import ConfigError


class EvictionPolicy(ABC):
    """Ranks resident slots for eviction; told about every insert, access and removal."""

    name: ClassVar[str]

    @abstractmethod
    def record_insert(self, slot: int, expert_id: int) -> None:
        """The slot was assigned to `expert_id` (it becomes resident)."""

    @abstractmethod
    def record_access(self, slot: int, expert_id: int) -> None:
        """A foreground request used `expert_id`, resident in `slot`."""

    @abstractmethod
    def record_removal(self, slot: int, expert_id: int) -> None:
        """`slot` no longer holds `expert_id` (evicted, or its read failed)."""

    @abstractmethod
    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None:
        """The slot to evict among resident slots with `is_evictable(slot)` true, or None if there is none."""


class LruPolicy(EvictionPolicy):
    """Least recently used first. Inserting counts as a use; ties cannot occur (a total order of calls)."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # least recently used first

    def record_insert(self, slot: int, expert_id: int) -> None:
        self._order[slot] = None
        self._order.move_to_end(slot)

    def record_access(self, slot: int, expert_id: int) -> None:
        self._order.move_to_end(slot)

    def record_removal(self, slot: int, expert_id: int) -> None:
        self._order.pop(slot, None)

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None:
        for slot in self._order:
            if is_evictable(slot):
                return slot
        return None


POLICIES: dict[str, type[EvictionPolicy]] = {LruPolicy.name: LruPolicy}


def make_policy(name: str, **options) -> EvictionPolicy:
    """Build the policy registered under `name` (`lru`), passing `options` to its constructor."""
    try:
        policy_class = POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown cache policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return policy_class(**options)
