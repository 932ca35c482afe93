"""Eviction policies: which resident slot to give up when the slot table needs room.

A policy only ranks slots. The slot table (`mer.cache.slot_table`) owns the states and decides
which slots may be evicted at all (READY, unleased, unpinned, and for prefetches not used in the
current token); it tells the policy about every insert, access and removal (`record_insert`,
`record_access`, `record_removal`), and asks it for a victim among the evictable slots
(`choose_victim`). Whoever drives the requests calls `record_step` with the experts of each step
(one routing decision) before any is acquired. It carries what a slot-level callback cannot: the request stream itself, independent of whether a
slot was inserted by a demand miss or a prefetch. LRU ignores it (so the live I/O worker, which
does not call it, runs LRU exactly as the simulator does); LFU and LRU+pin count requests with it;
Belady's MIN advances its cursor over the known future with it.

Policies (`POLICIES`, by name):

- `lru`: least recently inserted or used first.
- `lfu`: fewest requests so far first (counts outlive the slot: "perfect" LFU); ties by LRU.
- `lru+pin`: LRU, except that the experts hot in a sliding window of recent requests (at least
  `min_count` requests among the last `window`, at most `max_pinned` of them, most requested first,
  ties by lower id) are evicted only when nothing else is evictable; soft pins, so the cache never
  blocks on them.
- `layer`: for layered routing, where every token visits the MoE layers 0..L-1 in order: the
  evictable slot whose expert's layer comes back last, counting from the layer of the latest step
  (`record_step`): its own layer first (its next use is a whole token away), then the layers before
  it, and the next layer last; ties by LRU. An expert's layer is `expert_id // experts_per_layer`
  (global store ids); with one layer (the flat pool) it is LRU. It approximates MIN on the cyclic
  layer stream, where LRU evicts exactly the experts the next layers need.
- `belady`: Belady's MIN, the optimal demand-fetch policy: the evictable slot whose expert is next
  requested furthest ahead (ties by lowest slot). Offline: it needs the whole request sequence
  (`offline = True`; build it with `make_replay_policy`).

Each call is deterministic: the same sequence of calls gives the same victims, so the live I/O
worker and the offline simulator (`mer-pipeline trace simulate`) agree exactly.

Adding a policy: subclass `EvictionPolicy`, register it in `POLICIES`, and override `for_replay`
if it needs the cache size or the future to be built.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter, OrderedDict, deque
from typing import Callable, ClassVar, Sequence

from mer.cache.next_use import NextUseIndex
from mer.errors import ConfigError


class EvictionPolicy(ABC):
    """Ranks resident slots for eviction; told about every insert, access and removal."""

    name: ClassVar[str]
    offline: ClassVar[bool] = False  # True: needs the future request sequence (simulation only)

    @abstractmethod
    def record_insert(self, slot: int, expert_id: int) -> None:
        """The slot was assigned to `expert_id` (it becomes resident)."""

    @abstractmethod
    def record_access(self, slot: int, expert_id: int) -> None:
        """A request used `expert_id`, resident in `slot`."""

    @abstractmethod
    def record_removal(self, slot: int, expert_id: int) -> None:
        """`slot` no longer holds `expert_id` (evicted, or its read failed)."""

    @abstractmethod
    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None:
        """The slot to evict among resident slots with `is_evictable(slot)` true, or None if there is none."""

    def record_step(self, expert_ids: Sequence[int]) -> None:
        """The experts of the next step are about to be requested together. Default: ignored."""

    @classmethod
    def for_replay(cls, num_slots: int, steps: Sequence[Sequence[int]]) -> "EvictionPolicy":
        """The policy set up for replaying `steps` on `num_slots` slots. Default: `cls()`."""
        return cls()


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

    def slots_by_recency(self) -> list[int]:
        """Resident slots, least recently used first."""
        return list(self._order)


class _RecencyTracked(EvictionPolicy):
    """A policy that keeps LRU order and the expert of every resident slot (for ranking and ties)."""

    def __init__(self) -> None:
        self._recency = LruPolicy()
        self._expert_of_slot: dict[int, int] = {}

    def record_insert(self, slot: int, expert_id: int) -> None:
        self._recency.record_insert(slot, expert_id)
        self._expert_of_slot[slot] = expert_id

    def record_access(self, slot: int, expert_id: int) -> None:
        self._recency.record_access(slot, expert_id)

    def record_removal(self, slot: int, expert_id: int) -> None:
        self._recency.record_removal(slot, expert_id)
        self._expert_of_slot.pop(slot, None)

    def _evictable_by_recency(self, is_evictable: Callable[[int], bool]) -> list[int]:
        return [slot for slot in self._recency.slots_by_recency() if is_evictable(slot)]

    def _eviction_rank(self, expert_id: int) -> float:
        """Lower goes first; ties by LRU."""
        raise NotImplementedError

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None:
        candidates = self._evictable_by_recency(is_evictable)
        return min(candidates, key=lambda slot: self._eviction_rank(self._expert_of_slot[slot]), default=None)


class LfuPolicy(_RecencyTracked):
    """Fewest requests first (counted by `record_step`, kept after eviction); ties by least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.request_counts: Counter[int] = Counter()

    def record_step(self, expert_ids: Sequence[int]) -> None:
        self.request_counts.update(expert_ids)

    def _eviction_rank(self, expert_id: int) -> float:
        return self.request_counts[expert_id]


class LayerCyclicPolicy(_RecencyTracked):
    """Evict the expert whose layer comes back last in the token's layer cycle; ties by LRU."""

    name = "layer"

    def __init__(self, experts_per_layer: int = 1, num_layers: int = 1) -> None:
        if experts_per_layer < 1 or num_layers < 1:
            raise ConfigError(f"layer policy: experts_per_layer {experts_per_layer} and num_layers {num_layers} "
                              "must be positive")
        super().__init__()
        self.experts_per_layer = experts_per_layer
        self.num_layers = num_layers
        self.current_layer = 0

    @classmethod
    def for_replay(cls, num_slots: int, steps: Sequence[Sequence[int]], *, experts_per_layer: int = 1,
                   num_layers: int = 1) -> "LayerCyclicPolicy":
        return cls(experts_per_layer, num_layers)

    def record_step(self, expert_ids: Sequence[int]) -> None:
        if expert_ids:
            self.current_layer = (expert_ids[0] // self.experts_per_layer) % self.num_layers

    def steps_until_needed(self, expert_id: int) -> int:
        """Steps from the current one until the expert's layer comes again (1 = the next step)."""
        layer = (expert_id // self.experts_per_layer) % self.num_layers
        return (layer - self.current_layer - 1) % self.num_layers + 1

    def _eviction_rank(self, expert_id: int) -> float:
        return -self.steps_until_needed(expert_id)


class LruPinPolicy(_RecencyTracked):
    """LRU that spares the experts hot in a sliding window of recent requests (soft, bounded pins)."""

    name = "lru+pin"

    def __init__(self, max_pinned: int = 4, window: int = 64, min_count: int = 3) -> None:
        for option, value, low in (("max_pinned", max_pinned, 0), ("window", window, 1), ("min_count", min_count, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"lru+pin option {option} must be an integer >= {low}, got {value!r}")
        super().__init__()
        self.max_pinned = max_pinned
        self.min_count = min_count
        self._window: deque[int] = deque(maxlen=window)
        self._window_counts: Counter[int] = Counter()

    @classmethod
    def for_replay(cls, num_slots: int, steps: Sequence[Sequence[int]]) -> "LruPinPolicy":
        """A quarter of the slots may be pinned; hot means >= 3 requests among the last 4 x slots."""
        return cls(max_pinned=num_slots // 4, window=4 * num_slots, min_count=3)

    def record_step(self, expert_ids: Sequence[int]) -> None:
        for expert in expert_ids:
            if len(self._window) == self._window.maxlen:
                oldest = self._window[0]
                self._window_counts[oldest] -= 1
                if not self._window_counts[oldest]:
                    del self._window_counts[oldest]
            self._window.append(expert)
            self._window_counts[expert] += 1

    def pinned_experts(self) -> set[int]:
        """The experts now spared: the most requested in the window (>= min_count), at most max_pinned."""
        hot = [(count, expert) for expert, count in self._window_counts.items() if count >= self.min_count]
        hot.sort(key=lambda item: (-item[0], item[1]))
        return {expert for _, expert in hot[: self.max_pinned]}

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None:
        candidates = self._evictable_by_recency(is_evictable)
        pinned = self.pinned_experts()
        for slot in candidates:
            if self._expert_of_slot[slot] not in pinned:
                return slot
        return candidates[0] if candidates else None


class BeladyPolicy(EvictionPolicy):
    """Belady's MIN: evict the expert requested again furthest in the future (ties by lowest slot)."""

    name = "belady"
    offline = True

    def __init__(self, future: NextUseIndex):
        self.future = future
        self._expert_of_slot: dict[int, int] = {}

    @classmethod
    def for_replay(cls, num_slots: int, steps: Sequence[Sequence[int]]) -> "BeladyPolicy":
        return cls(NextUseIndex(steps))

    def record_insert(self, slot: int, expert_id: int) -> None:
        self._expert_of_slot[slot] = expert_id

    def record_access(self, slot: int, expert_id: int) -> None:
        pass

    def record_removal(self, slot: int, expert_id: int) -> None:
        self._expert_of_slot.pop(slot, None)

    def record_step(self, expert_ids: Sequence[int]) -> None:
        self.future.advance(expert_ids)

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int | None:
        best_slot, best_next_use = None, -1
        for slot in sorted(self._expert_of_slot):
            if not is_evictable(slot):
                continue
            next_use = self.future.next_use(self._expert_of_slot[slot])
            if next_use > best_next_use:
                best_slot, best_next_use = slot, next_use
        return best_slot


POLICIES: dict[str, type[EvictionPolicy]] = {
    policy.name: policy for policy in (LruPolicy, LfuPolicy, LruPinPolicy, LayerCyclicPolicy, BeladyPolicy)
}


def policy_class(name: str) -> type[EvictionPolicy]:
    """The policy class registered under `name`; ConfigError naming the known ones otherwise."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown cache policy {name!r}; known: {', '.join(POLICIES)}") from None


def make_policy(name: str, **options) -> EvictionPolicy:
    """Build the policy registered under `name`, passing `options` to its constructor (live use)."""
    cls = policy_class(name)
    if cls.offline and not options:
        raise ConfigError(f"cache policy {name!r} is offline: it needs the future requests (trace simulate only)")
    return cls(**options)


def make_replay_policy(name: str, num_slots: int, steps: Sequence[Sequence[int]], *, experts_per_layer: int = 1,
                       num_layers: int = 1) -> EvictionPolicy:
    """The policy `name` set up for replaying `steps` (sets of experts requested together) on `num_slots` slots
    of a store with `num_layers` x `experts_per_layer` experts (global ids)."""
    cls = policy_class(name)
    if cls is LayerCyclicPolicy:
        return cls.for_replay(num_slots, steps, experts_per_layer=experts_per_layer, num_layers=num_layers)
    return cls.for_replay(num_slots, steps)
