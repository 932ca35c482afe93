"""The slot table: which expert lives in which arena slot, and in what state.

One writer: the I/O worker owns the table and is the only caller (pure Python, no I/O, no
asyncio; the worker's event loop drives it). The same code drives the offline simulator.

States of a slot
----------------

    FREE --assign--> LOADING --finish_load(ok), no waiter---> READY <--release (last lease)--+
                        |    --finish_load(ok), n waiters--> LEASED(n) <--acquire (hit)-------+
                        +----finish_load(failed)----------> FREE           (READY -> LEASED(1))
    READY (unleased, unpinned) --evict--> FREE, assigned again at once to the new expert
    LOADING --quarantine (the read hangs)--> QUARANTINED --lift_quarantine (the kernel ended it)--> FREE

Legal transitions and who causes them (every call comes from the I/O worker):

- FREE -> LOADING: `acquire(expert, token)` on a miss (result MISS_ASSIGNED) or
  `assign_prefetch(expert, token)`. The slot's generation is incremented and its expert set; the
  I/O worker then writes the arena slot header and starts the read into the slot.
- READY -> LOADING (eviction and assignment in one step): as above when no slot is FREE; the victim
  is chosen by the policy among the evictable slots. Foreground: READY, unleased, expert unpinned.
  Prefetch: additionally not used in the current (or a later) token, except, with `past_layers` (a
  prefill pass) on a table told its `experts_per_layer`, an expert the current token used at a layer
  before the prefetched one's.
- LOADING -> LOADING: `acquire` of an expert whose read is in flight (JOIN_LOADING): the request
  shares that read and gets a pending lease.
- LOADING -> LEASED(n) or READY: `finish_load(slot, generation, ok=True)` when the read completed;
  each pending request (the miss that started the read and every join) now holds one lease.
- LOADING -> FREE: `finish_load(slot, generation, ok=False)`: the read failed; the pending requests
  hold no lease and the I/O worker answers them with the error.
- LOADING -> QUARANTINED: `quarantine(slot, generation)`: the read went past its deadline and the
  kernel may still write the slot (O_DIRECT into shared memory), so it must not be handed out. The
  pending requests hold no lease (the I/O worker answers them with the error) and the expert is
  forgotten (its next acquire starts a read into another slot). A QUARANTINED slot is never
  assigned, evicted or leased.
- QUARANTINED -> FREE: `lift_quarantine(slot)` once the kernel has ended the read (never, if the
  device never answers).
- READY -> LEASED(1), LEASED(n) -> LEASED(n+1): `acquire` of a resident expert (HIT).
- LEASED(n) -> LEASED(n-1), LEASED(1) -> READY: `release(slot, generation)`.

A LEASED or LOADING slot is never evicted; a pinned expert's slot is never evicted. Every
`acquire` that does not return NO_SLOT yields exactly one lease (at once on a hit, when the read
finishes otherwise) that the router gives back with exactly one `release`.

NO_SLOT and why waiting cannot deadlock
---------------------------------------
`acquire` returns NO_SLOT when no slot is FREE and none is evictable (all leased, loading or
pinned); it changes nothing but the `no_slot` counter, and counts no lookup. The I/O worker queues the request and calls
`acquire` again after the next `release` or `finish_load`. Progress is guaranteed when
`num_slots >= max_pinned + (leases the router can hold at once)`: the router holds the leases of
one `Acquire` at a time, and an `Acquire` names at most `lease_limit(num_slots, max_pinned)` =
`num_slots - max_pinned` experts (the router splits larger batches, e.g. a prefill's, into chunks of
that size, and the I/O worker refuses a larger `Acquire`); it releases its leases after computing,
reads always finish (ok or failed), and pinned experts occupy at most `max_pinned` slots. So the
slots that block a queued request are freed by work that does not wait for it. Quarantined slots
take slots out of that count: the I/O worker refuses (or fails, if it waits) an `Acquire` of more
than `lease_limit(num_in_service, max_pinned)` experts. (An `Acquire` of
`cache_slots` experts with `max_pinned` slots pinned by experts it does not name would wait forever
whenever `max_pinned` exceeds the prefetch reserve: `tests/e2e/test_generate_cli.py`
`test_a_prefill_with_pinned_slots_never_waits_forever`.)

Counters (`CacheCounters`): a hit is an acquire whose expert was READY or LEASED; every
other non-NO_SLOT acquire is a miss (a JOIN_LOADING also counts in `joins`), so
hits + misses = lookups. A slot loaded by a prefetch remembers it: its first acquire (hit, or join
of the in-flight read) counts `prefetch_used`; its eviction before any use counts `prefetch_wasted`.

Outcomes: every call says what it did, so no caller diffs counters. `acquire` returns an
`AcquireResult` (kind, slot, generation, the evicted expert, whether that eviction wasted an unused
prefetch, whether this acquire was the first use of a prefetched slot); `assign_prefetch` returns an
`Assignment` with the same eviction facts.

Ties are deterministic: a FREE slot is taken lowest index first; among evictable slots the policy
decides (LRU: least recently inserted or used).
"""

from __future__ import annotations

import heapq
from dataclasses import astuple, dataclass
from functools import partial
from enum import Enum
from typing import Callable

from mer.cache.policy import EvictionPolicy, LruPolicy
from mer.errors import ConfigError, SlotStateError, StaleSlotError


def lease_limit(num_slots: int, max_pinned: int) -> int:
    """The most experts one `Acquire` may name and still be sure to complete: the slots no pin can hold."""
    return num_slots - max_pinned


class SlotState(Enum):
    FREE = "free"
    LOADING = "loading"
    READY = "ready"
    LEASED = "leased"
    QUARANTINED = "quarantined"


class AcquireKind(Enum):
    HIT = "hit"  # resident and READY/LEASED: leased at once
    JOIN_LOADING = "join_loading"  # its read is in flight: leased when it finishes
    MISS_ASSIGNED = "miss_assigned"  # a slot was assigned: the caller starts the read
    NO_SLOT = "no_slot"  # nothing evictable now: queue and retry after a release or finished read


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """What `acquire` did. `slot`/`generation` are None only for NO_SLOT; `evicted_expert` only on MISS_ASSIGNED.

    `wasted_prefetch`: the evicted slot held a prefetch never used (counted in `prefetch_wasted`);
    `used_prefetch`: this acquire was the first use of a prefetched slot (counted in `prefetch_used`).
    """

    kind: AcquireKind
    slot: int | None = None
    generation: int | None = None
    evicted_expert: int | None = None
    wasted_prefetch: bool = False
    used_prefetch: bool = False


@dataclass(frozen=True, slots=True)
class Assignment:
    """A slot assigned to an expert for a prefetch read (generation already bumped); `wasted_prefetch`:
    the evicted slot held a prefetch never used."""

    slot: int
    generation: int
    expert_id: int
    evicted_expert: int | None
    wasted_prefetch: bool = False


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """A snapshot of one slot, for stats and tests."""

    slot: int
    state: SlotState
    expert_id: int | None
    generation: int
    lease_count: int
    pending_leases: int
    is_prefetched_unused: bool
    last_token: int | None


@dataclass(slots=True)
class CacheCounters:
    hits: int = 0
    misses: int = 0
    joins: int = 0
    evictions: int = 0
    no_slot: int = 0
    prefetches_assigned: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    load_failures: int = 0
    quarantines: int = 0


@dataclass(slots=True)
class _Slot:
    state: SlotState = SlotState.FREE
    expert_id: int | None = None
    generation: int = 0
    lease_count: int = 0
    pending_leases: int = 0
    is_prefetched_unused: bool = False
    last_token: int | None = None


class SlotTable:
    """Slot states, the expert -> slot map, pins and counters; victims chosen by an `EvictionPolicy`."""

    def __init__(self, num_slots: int, policy: EvictionPolicy | None = None, *, max_pinned: int = 0,
                 experts_per_layer: int | None = None):
        if num_slots < 1:
            raise ConfigError(f"cache slots must be >= 1, got {num_slots}")
        if not 0 <= max_pinned < num_slots:
            raise ConfigError(f"max_pinned must be in [0, {num_slots - 1}] for {num_slots} slots, got {max_pinned}")
        self.num_slots = num_slots
        self.max_pinned = max_pinned
        self.policy = policy if policy is not None else LruPolicy()
        self.counters = CacheCounters()
        self._slots = [_Slot() for _ in range(num_slots)]
        self._free_slots = list(range(num_slots))  # a min-heap: lowest free index first
        self._slot_of_expert: dict[int, int] = {}
        self._pinned_experts: set[int] = set()
        self._quarantined: set[int] = set()
        # Global expert ids are layer-major: with `experts_per_layer` (requests per MoE layer, in layer
        # order within a token) a prefetch with `past_layers` may also evict what the current token
        # used at an earlier layer.
        self.experts_per_layer = experts_per_layer

    # ---- queries -------------------------------------------------------------------------------

    def lookup(self, expert_id: int) -> int | None:
        """The slot holding `expert_id` (LOADING, READY or LEASED), or None. Changes nothing."""
        return self._slot_of_expert.get(expert_id)

    def slot_info(self, slot: int) -> SlotInfo:
        return SlotInfo(slot, *astuple(self._slots[self._check_index(slot)]))

    def slot_infos(self) -> list[SlotInfo]:
        return [self.slot_info(slot) for slot in range(self.num_slots)]

    @property
    def num_free(self) -> int:
        return len(self._free_slots)

    @property
    def num_quarantined(self) -> int:
        return len(self._quarantined)

    @property
    def num_in_service(self) -> int:
        """Slots that can be assigned, now or once their leases and loads end: all but the quarantined."""
        return self.num_slots - len(self._quarantined)

    def continue_generations(self, generations: list[int]) -> None:
        """Start every slot's generation at `generations[slot]` (a restarted I/O worker: those its dead
        predecessor last wrote to the arena plus one), so that no (slot, generation) of a new lease equals
        one of the dead worker's. Only on a table whose slots are all FREE, and never backwards."""
        if len(generations) != self.num_slots:
            raise SlotStateError(f"{len(generations)} generations for {self.num_slots} slots")
        for slot, (record, generation) in enumerate(zip(self._slots, generations)):
            if record.state is not SlotState.FREE or generation < record.generation:
                raise SlotStateError(f"slot {slot} is {record.state.value} at generation {record.generation}: "
                                     f"cannot continue at generation {generation}")
            record.generation = generation

    # ---- foreground ----------------------------------------------------------------------------

    def acquire(self, expert_id: int, token: int) -> AcquireResult:
        """Look up `expert_id` for a request of `token` and lease it (see the module docstring)."""
        slot = self._slot_of_expert.get(expert_id)
        if slot is not None:
            return self._acquire_resident(slot, token)
        taken = self._take_slot(self._is_evictable)
        if taken is None:
            self.counters.no_slot += 1
            return AcquireResult(AcquireKind.NO_SLOT)
        slot, evicted_expert, wasted = taken
        record = self._assign(slot, expert_id, token)
        record.pending_leases = 1
        self.counters.misses += 1
        return AcquireResult(AcquireKind.MISS_ASSIGNED, slot, record.generation, evicted_expert, wasted)

    def finish_load(self, slot: int, generation: int, ok: bool) -> int:
        """The read into `slot` ended. Returns the number of pending requests (leased if ok, to fail if not)."""
        record = self._checked_slot(slot, generation, SlotState.LOADING, "finish_load")
        waiters, record.pending_leases = record.pending_leases, 0
        if ok:
            record.lease_count = waiters
            record.state = SlotState.LEASED if waiters else SlotState.READY
            return waiters
        self.counters.load_failures += 1
        self._vacate(slot)
        heapq.heappush(self._free_slots, slot)
        return waiters

    def quarantine(self, slot: int, generation: int) -> int:
        """The read into `slot` hangs: keep the slot out of service, forget its expert. Returns the number
        of pending requests (to fail)."""
        record = self._checked_slot(slot, generation, SlotState.LOADING, "quarantine")
        waiters = record.pending_leases
        self.counters.quarantines += 1
        self._vacate(slot)
        self._slots[slot].state = SlotState.QUARANTINED
        self._quarantined.add(slot)
        return waiters

    def lift_quarantine(self, slot: int) -> None:
        """The hung read into `slot` has ended in the kernel: the slot is FREE again."""
        record = self._slots[self._check_index(slot)]
        if record.state is not SlotState.QUARANTINED:
            raise SlotStateError(f"lift_quarantine of slot {slot}: slot is {record.state.value}, expected quarantined")
        record.state = SlotState.FREE
        self._quarantined.remove(slot)
        heapq.heappush(self._free_slots, slot)

    def release(self, slot: int, generation: int) -> None:
        """Give back one lease of `slot`; raises StaleSlotError for another generation, SlotStateError if not leased."""
        record = self._checked_slot(slot, generation, SlotState.LEASED, "release")
        record.lease_count -= 1
        if record.lease_count == 0:
            record.state = SlotState.READY

    # ---- prefetch ------------------------------------------------------------------------------

    def can_admit_prefetch(self, expert_id: int, token: int, *, past_layers: bool = False) -> bool:
        """Whether `assign_prefetch(expert_id, token, past_layers=...)` would assign a slot."""
        if expert_id in self._slot_of_expert:
            return False
        evictable = self._prefetch_evictable(expert_id, token, past_layers)
        return bool(self._free_slots) or self.policy.choose_victim(evictable) is not None

    def assign_prefetch(self, expert_id: int, token: int, *, past_layers: bool = False) -> Assignment | None:
        """Assign a FREE slot, or evict a READY one not used in `token`, for a prefetch read; None if not
        admitted. With `past_layers` (a prefill pass: all its layers are one token) and `experts_per_layer`,
        an expert used in `token` at a layer before `expert_id`'s may be evicted too."""
        if expert_id in self._slot_of_expert:
            return None
        taken = self._take_slot(self._prefetch_evictable(expert_id, token, past_layers))
        if taken is None:
            return None
        slot, evicted_expert, wasted = taken
        record = self._assign(slot, expert_id, token)
        record.is_prefetched_unused = True
        self.counters.prefetches_assigned += 1
        return Assignment(slot, record.generation, expert_id, evicted_expert, wasted)

    # ---- pins ----------------------------------------------------------------------------------

    def can_pin(self, expert_id: int) -> bool:
        return expert_id in self._pinned_experts or len(self._pinned_experts) < self.max_pinned

    def pin(self, expert_id: int) -> bool:
        """Protect `expert_id`'s slot (now or once loaded) from eviction; False when `max_pinned` is reached."""
        if not self.can_pin(expert_id):
            return False
        self._pinned_experts.add(expert_id)
        return True

    def unpin(self, expert_id: int) -> bool:
        """Make `expert_id` evictable again; False if it was not pinned."""
        if expert_id not in self._pinned_experts:
            return False
        self._pinned_experts.remove(expert_id)
        return True

    def is_pinned(self, expert_id: int) -> bool:
        return expert_id in self._pinned_experts

    # ---- internals -----------------------------------------------------------------------------

    def _acquire_resident(self, slot: int, token: int) -> AcquireResult:
        record = self._slots[slot]
        if record.state is SlotState.LOADING:
            record.pending_leases += 1
            kind = AcquireKind.JOIN_LOADING
            self.counters.misses += 1
            self.counters.joins += 1
        else:
            record.lease_count += 1
            record.state = SlotState.LEASED
            kind = AcquireKind.HIT
            self.counters.hits += 1
        used_prefetch, record.is_prefetched_unused = record.is_prefetched_unused, False
        self.counters.prefetch_used += used_prefetch
        record.last_token = token if record.last_token is None else max(record.last_token, token)
        self.policy.record_access(slot, record.expert_id)
        return AcquireResult(kind, slot, record.generation, used_prefetch=used_prefetch)

    def _prefetch_evictable(self, expert_id: int, token: int, past_layers: bool) -> Callable[[int], bool]:
        layer = expert_id // self.experts_per_layer if past_layers and self.experts_per_layer else None
        return partial(self._is_evictable, token=token, before_layer=layer)

    def _is_evictable(self, slot: int, token: int | None = None, before_layer: int | None = None) -> bool:
        """READY, unleased, unpinned; with `token` (prefetch) also not used in that or a later token,
        unless used in `token` itself at a layer before `before_layer` (the pass has gone past it: a
        prefill pass is one token, and without this a full cache admitted no prefetch during it)."""
        record = self._slots[slot]
        if record.state is not SlotState.READY or record.expert_id in self._pinned_experts:
            return False
        if token is None or record.last_token is None or record.last_token < token:
            return True
        return (before_layer is not None and record.last_token == token
                and record.expert_id // self.experts_per_layer < before_layer)

    def _take_slot(self, is_evictable: Callable[[int], bool]) -> tuple[int, int | None, bool] | None:
        """A FREE slot (lowest first), else an evicted victim: (slot, evicted expert or None, whether the
        victim held an unused prefetch), or None."""
        if self._free_slots:
            return heapq.heappop(self._free_slots), None, False
        victim = self.policy.choose_victim(is_evictable)
        if victim is None:
            return None
        if not is_evictable(victim):
            raise SlotStateError(f"policy {self.policy.name!r} chose slot {victim}, which is not evictable")
        record = self._slots[victim]
        evicted_expert, wasted = record.expert_id, record.is_prefetched_unused
        self.counters.evictions += 1
        self.counters.prefetch_wasted += wasted
        self._vacate(victim)
        return victim, evicted_expert, wasted

    def _assign(self, slot: int, expert_id: int, token: int) -> _Slot:
        record = self._slots[slot]
        record.state = SlotState.LOADING
        record.expert_id = expert_id
        record.generation += 1
        record.last_token = token
        self._slot_of_expert[expert_id] = slot
        self.policy.record_insert(slot, expert_id)
        return record

    def _vacate(self, slot: int) -> None:
        """Forget the slot's expert: FREE, no leases; the generation is kept (it bumps on the next assign)."""
        record = self._slots[slot]
        self.policy.record_removal(slot, record.expert_id)
        del self._slot_of_expert[record.expert_id]
        self._slots[slot] = _Slot(generation=record.generation)

    def _check_index(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise SlotStateError(f"slot {slot} out of range [0, {self.num_slots})")
        return slot

    def _checked_slot(self, slot: int, generation: int, state: SlotState, action: str) -> _Slot:
        record = self._slots[self._check_index(slot)]
        if record.generation != generation:
            raise StaleSlotError(
                f"{action} of slot {slot} generation {generation}: the slot is at generation {record.generation}"
            )
        if record.state is not state:
            raise SlotStateError(f"{action} of slot {slot}: slot is {record.state.value}, expected {state.value}")
        return record
