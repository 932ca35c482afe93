"""The slot table's state machine, counters, pins, prefetch admission and eviction policy (mer/cache)."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mer.cache import AcquireKind, EvictionPolicy, LruPolicy, SlotState, SlotTable, make_policy
from mer.errors import ConfigError, SlotStateError, StaleSlotError

HIT, JOIN, MISS, NO_SLOT = AcquireKind.HIT, AcquireKind.JOIN_LOADING, AcquireKind.MISS_ASSIGNED, AcquireKind.NO_SLOT


def load(table: SlotTable, expert_id: int, token: int = 0) -> tuple[int, int]:
    """Acquire `expert_id` (a miss), finish its read, release the lease: it is READY. Returns (slot, generation)."""
    result = table.acquire(expert_id, token)
    assert result.kind is MISS
    assert table.finish_load(result.slot, result.generation, ok=True) == 1
    table.release(result.slot, result.generation)
    return result.slot, result.generation


# ---- foreground -------------------------------------------------------------------------------


def test_miss_then_hit_leases_and_counts():
    table = SlotTable(4)
    miss = table.acquire(7, token=0)
    assert (miss.kind, miss.slot, miss.generation, miss.evicted_expert) == (MISS, 0, 1, None)
    assert table.slot_info(0).state is SlotState.LOADING
    assert table.lookup(7) == 0
    assert table.finish_load(0, 1, ok=True) == 1
    assert (table.slot_info(0).state, table.slot_info(0).lease_count) == (SlotState.LEASED, 1)
    hit = table.acquire(7, token=1)
    assert (hit.kind, hit.slot, hit.generation) == (HIT, 0, 1)
    assert table.slot_info(0).lease_count == 2
    table.release(0, 1)
    table.release(0, 1)
    assert (table.slot_info(0).state, table.slot_info(0).lease_count) == (SlotState.READY, 0)
    assert (table.counters.hits, table.counters.misses, table.counters.evictions) == (1, 1, 0)


def test_concurrent_misses_share_one_read():
    table = SlotTable(2)
    first = table.acquire(3, token=0)
    second = table.acquire(3, token=0)
    assert first.kind is MISS and second.kind is JOIN
    assert (second.slot, second.generation) == (first.slot, first.generation)
    assert table.slot_info(first.slot).pending_leases == 2
    assert table.num_free == 1  # one read, one slot
    assert table.finish_load(first.slot, first.generation, ok=True) == 2
    assert table.slot_info(first.slot).lease_count == 2
    assert (table.counters.misses, table.counters.joins, table.counters.hits) == (2, 1, 0)


def test_free_slots_are_taken_lowest_first_then_lru_is_evicted():
    table = SlotTable(3)
    assert [load(table, expert)[0] for expert in (10, 11, 12)] == [0, 1, 2]
    hit = table.acquire(10, token=1)  # 10 becomes the most recently used: 11 is now the LRU
    table.release(hit.slot, hit.generation)
    miss = table.acquire(13, token=1)
    assert (miss.kind, miss.slot, miss.generation, miss.evicted_expert) == (MISS, 1, 2, 11)
    assert table.lookup(11) is None and table.lookup(13) == 1
    table.finish_load(miss.slot, miss.generation, ok=True)
    table.release(miss.slot, miss.generation)
    assert table.acquire(14, token=2).evicted_expert == 12
    assert table.counters.evictions == 2


def test_leased_and_loading_slots_are_never_evicted_and_no_slot_counts_no_lookup():
    table = SlotTable(2)
    leased = table.acquire(1, token=0)
    table.finish_load(leased.slot, leased.generation, ok=True)
    loading = table.acquire(2, token=0)
    assert table.acquire(3, token=0).kind is NO_SLOT
    assert (table.counters.hits + table.counters.misses, table.counters.no_slot) == (2, 1)
    table.release(leased.slot, leased.generation)
    retry = table.acquire(3, token=0)
    assert (retry.kind, retry.slot, retry.evicted_expert) == (MISS, leased.slot, 1)
    assert table.lookup(2) == loading.slot


def test_stale_or_unleased_release_is_an_error_and_changes_nothing():
    table = SlotTable(1)
    slot, generation = load(table, 5)
    with pytest.raises(SlotStateError, match="slot 0: slot is ready"):
        table.release(slot, generation)  # not leased
    hit = table.acquire(5, token=1)
    with pytest.raises(StaleSlotError, match="generation 7"):
        table.release(slot, 7)
    assert table.slot_info(slot).lease_count == 1
    table.release(hit.slot, hit.generation)
    reassigned = table.acquire(6, token=2)
    assert reassigned.generation == generation + 1
    with pytest.raises(StaleSlotError):
        table.finish_load(slot, generation, ok=True)
    with pytest.raises(SlotStateError, match="out of range"):
        table.release(1, 1)


def test_failed_read_frees_the_slot_and_reports_its_waiters():
    table = SlotTable(2)
    miss = table.acquire(4, token=0)
    table.acquire(4, token=0)
    assert table.finish_load(miss.slot, miss.generation, ok=False) == 2
    info = table.slot_info(miss.slot)
    assert (info.state, info.expert_id, info.lease_count, info.pending_leases) == (SlotState.FREE, None, 0, 0)
    assert table.lookup(4) is None and table.num_free == 2
    assert table.counters.load_failures == 1
    with pytest.raises(SlotStateError):
        table.release(miss.slot, miss.generation)
    again = table.acquire(4, token=1)
    assert (again.kind, again.slot, again.generation) == (MISS, miss.slot, miss.generation + 1)


# ---- pins -------------------------------------------------------------------------------------


def test_a_quarantined_slot_is_never_assigned_evicted_or_leased_until_lifted():
    """A read that hangs: its slot leaves service (the kernel may still write it), the expert is forgotten."""
    table = SlotTable(3)
    hung = table.acquire(7, token=0)
    assert table.acquire(7, token=0).kind is JOIN
    assert table.quarantine(hung.slot, hung.generation) == 2  # both waiters are failed by the caller
    assert table.slot_info(hung.slot).state is SlotState.QUARANTINED and table.lookup(7) is None
    assert (table.num_quarantined, table.num_in_service, table.counters.quarantines) == (1, 2, 1)
    slots_used = set()
    for token, expert in enumerate([7, 1, 2, 3, 7, 4, 1, 5, 6, 2], start=1):  # misses that evict, and hits
        result = table.acquire(expert, token)
        assert result.kind in (HIT, MISS)
        if result.kind is MISS:
            table.finish_load(result.slot, result.generation, ok=True)
        table.release(result.slot, result.generation)
        slots_used.add(result.slot)
        prefetch = table.assign_prefetch(100 + token, token + 1)  # evicts this token's expert or the other
        assert prefetch is not None
        slots_used.add(prefetch.slot)
        table.finish_load(prefetch.slot, prefetch.generation, ok=True)
    assert hung.slot not in slots_used and table.slot_info(hung.slot).state is SlotState.QUARANTINED
    for other in range(3):  # the two slots in service leased: nothing left to give, never the quarantined one
        if other != hung.slot and table.slot_info(other).state is SlotState.READY:
            table.acquire(table.slot_info(other).expert_id, 99)
    assert table.acquire(50, 99).kind is NO_SLOT
    with pytest.raises(SlotStateError, match="finish_load of slot .*: slot is quarantined, expected loading"):
        table.finish_load(hung.slot, hung.generation, ok=True)
    table.lift_quarantine(hung.slot)  # the kernel ended the read
    assert table.slot_info(hung.slot).state is SlotState.FREE and table.num_in_service == 3
    assert table.acquire(50, 99).slot == hung.slot
    with pytest.raises(SlotStateError, match="lift_quarantine of slot .*: slot is loading, expected quarantined"):
        table.lift_quarantine(hung.slot)


def test_pinned_experts_are_not_evicted_and_pins_are_bounded():
    table = SlotTable(3, max_pinned=1)
    for expert in (0, 1, 2):
        load(table, expert)
    assert table.pin(0) and table.is_pinned(0)
    assert table.pin(0)  # pinning again is fine
    assert not table.can_pin(1) and not table.pin(1)
    assert table.acquire(3, token=1).evicted_expert == 1  # 0 is the LRU but pinned
    assert table.unpin(0) and not table.unpin(0)
    assert table.acquire(4, token=1).evicted_expert == 0


def test_pins_plus_leases_give_no_slot_until_a_release():
    table = SlotTable(2, max_pinned=1)
    load(table, 0)
    table.pin(0)
    held = table.acquire(1, token=0)
    table.finish_load(held.slot, held.generation, ok=True)
    assert table.acquire(2, token=0).kind is NO_SLOT
    table.release(held.slot, held.generation)
    assert table.acquire(2, token=0).evicted_expert == 1


def test_pin_of_a_non_resident_expert_protects_it_once_loaded():
    table = SlotTable(2, max_pinned=1)
    assert table.pin(9)
    load(table, 9)
    load(table, 8)
    assert table.acquire(7, token=1).evicted_expert == 8


# ---- prefetch ---------------------------------------------------------------------------------


def test_prefetch_goes_into_a_free_slot_and_counts_used_on_first_hit():
    table = SlotTable(2)
    assert table.can_admit_prefetch(5, token=0)
    assignment = table.assign_prefetch(5, token=0)
    assert (assignment.slot, assignment.generation, assignment.evicted_expert) == (0, 1, None)
    assert table.slot_info(0).is_prefetched_unused
    assert table.finish_load(0, 1, ok=True) == 0
    assert table.slot_info(0).state is SlotState.READY
    assert not table.can_admit_prefetch(5, token=0) and table.assign_prefetch(5, token=0) is None
    first, second = table.acquire(5, token=1), table.acquire(5, token=1)
    assert (first.kind, first.used_prefetch, second.kind, second.used_prefetch) == (HIT, True, HIT, False)
    assert (table.counters.prefetch_used, table.counters.prefetches_assigned, table.counters.hits) == (1, 1, 2)


def test_join_of_an_inflight_prefetch_is_a_miss_and_a_used_prefetch():
    table = SlotTable(2)
    assignment = table.assign_prefetch(5, token=0)
    join = table.acquire(5, token=1)
    assert (join.kind, join.slot, join.used_prefetch) == (JOIN, assignment.slot, True)
    assert table.finish_load(assignment.slot, assignment.generation, ok=True) == 1
    assert (table.counters.misses, table.counters.prefetch_used, table.counters.hits) == (1, 1, 0)


def test_prefetch_evicts_only_slots_not_used_in_the_current_token():
    table = SlotTable(2)
    load(table, 0, token=4)
    load(table, 1, token=4)
    assert not table.can_admit_prefetch(2, token=4)
    assert table.assign_prefetch(2, token=4) is None
    assert table.counters.prefetches_assigned == 0
    assert table.can_admit_prefetch(2, token=5)  # in the next token both are fair game: LRU first
    assert table.assign_prefetch(2, token=5).evicted_expert == 0
    table_used_now = SlotTable(2)
    load(table_used_now, 0, token=4)
    load(table_used_now, 1, token=4)
    assert table_used_now.acquire(2, token=4).evicted_expert == 0  # the foreground may evict it


def test_a_layered_table_lets_a_prefetch_evict_what_the_token_used_at_earlier_layers():
    """A prefill pass is one token: with `past_layers` on a table with `experts_per_layer` (ids
    layer-major, 4 per layer here) a prefetch for layer L may evict what the token used at layers before
    L, never at L or after; without `past_layers` (decode) or on a flat table the plain rule holds."""
    table = SlotTable(3, experts_per_layer=4)
    load(table, 9, token=7)   # layer 2
    load(table, 5, token=7)   # layer 1
    load(table, 1, token=7)   # layer 0
    assert table.assign_prefetch(13, token=7) is None  # decode: nothing used in token 7 is evicted
    assert not table.can_admit_prefetch(2, token=7, past_layers=True)  # layer 0: nothing is behind it
    assert table.assign_prefetch(2, token=7, past_layers=True) is None
    assert table.can_admit_prefetch(6, token=7, past_layers=True)
    assert table.assign_prefetch(6, token=7, past_layers=True).evicted_expert == 1  # layer 1: layer 0 is behind it
    assert table.assign_prefetch(7, token=7, past_layers=True) is None  # layer 1 again: layers 1 and 2 stay
    assert table.assign_prefetch(13, token=7, past_layers=True).evicted_expert == 9  # layer 3: 9 (LRU) or 5
    flat = SlotTable(2)
    load(flat, 1, token=7)
    load(flat, 5, token=7)
    assert flat.assign_prefetch(13, token=7, past_layers=True) is None


def test_prefetch_never_evicts_pinned_leased_or_loading_slots():
    table = SlotTable(3, max_pinned=1)
    load(table, 0, token=0)
    table.pin(0)
    leased = table.acquire(1, token=0)
    table.finish_load(leased.slot, leased.generation, ok=True)
    table.acquire(2, token=0)  # LOADING
    assert not table.can_admit_prefetch(3, token=5)
    assert table.assign_prefetch(3, token=5) is None
    table.unpin(0)
    assert table.assign_prefetch(3, token=5).evicted_expert == 0


def test_unused_prefetch_evicted_counts_wasted():
    table = SlotTable(1)
    assignment = table.assign_prefetch(5, token=0)
    table.finish_load(assignment.slot, assignment.generation, ok=True)
    miss = table.acquire(6, token=1)
    assert (miss.evicted_expert, miss.wasted_prefetch, miss.used_prefetch) == (5, True, False)
    assert (table.counters.prefetch_wasted, table.counters.prefetch_used) == (1, 0)
    table.finish_load(miss.slot, miss.generation, ok=True)
    table.release(miss.slot, miss.generation)
    again = table.assign_prefetch(7, token=2)  # evicts 6, loaded by a miss: no prefetch wasted
    assert (again.evicted_expert, again.wasted_prefetch) == (6, False)
    table.finish_load(again.slot, again.generation, ok=True)
    wasted = table.assign_prefetch(8, token=3)  # evicts the unused prefetch of 7
    assert (wasted.evicted_expert, wasted.wasted_prefetch) == (7, True)
    assert table.counters.prefetch_wasted == 2


# ---- policy -----------------------------------------------------------------------------------


class HighestSlotFirst(EvictionPolicy):
    """A test policy: evicts the highest-numbered evictable slot, and records what it was told."""

    name = "highest_slot_first"

    def __init__(self) -> None:
        self.resident: dict[int, int] = {}
        self.offered: list[list[int]] = []

    def record_insert(self, slot, expert_id):
        self.resident[slot] = expert_id

    def record_access(self, slot, expert_id):
        assert self.resident[slot] == expert_id

    def record_removal(self, slot, expert_id):
        assert self.resident.pop(slot) == expert_id

    def choose_victim(self, is_evictable):
        candidates = [slot for slot in sorted(self.resident) if is_evictable(slot)]
        self.offered.append(candidates)
        return candidates[-1] if candidates else None


def test_the_table_evicts_what_the_policy_chooses_among_evictable_slots():
    policy = HighestSlotFirst()
    table = SlotTable(3, policy)
    for expert in (0, 1, 2):
        load(table, expert)
    held = table.acquire(2, token=1)  # slot 2 leased: not offered
    assert table.acquire(3, token=1).evicted_expert == 1
    assert policy.offered[-1] == [0, 1]
    assert policy.resident == {0: 0, 1: 3, 2: 2}
    table.release(held.slot, held.generation)


class BrokenPolicy(LruPolicy):
    name = "broken"

    def choose_victim(self, is_evictable):
        return 0


def test_a_policy_choosing_a_non_evictable_slot_is_an_error():
    table = SlotTable(1, BrokenPolicy())
    table.acquire(0, token=0)  # LOADING
    with pytest.raises(SlotStateError, match="slot 0, which is not evictable"):
        table.acquire(1, token=0)


def test_a_table_continues_the_generations_it_is_given_and_never_goes_back():
    """A restarted I/O worker's table starts each slot above the dead worker's last generation."""
    table = SlotTable(3)
    table.continue_generations([5, 1, 9])
    first = table.acquire(7, token=0)
    assert (first.slot, first.generation) == (0, 6)
    with pytest.raises(SlotStateError, match="slot 0 is loading at generation 6"):
        table.continue_generations([10, 10, 10])  # only a table whose slots are all free
    fresh = SlotTable(2)
    fresh.continue_generations([4, 4])
    with pytest.raises(SlotStateError, match="slot 1 is free at generation 4: cannot continue at generation 3"):
        fresh.continue_generations([4, 3])
    with pytest.raises(SlotStateError, match="3 generations for 2 slots"):
        fresh.continue_generations([4, 4, 4])


def test_make_policy_and_constructor_validation():
    assert isinstance(make_policy("lru"), LruPolicy)
    with pytest.raises(ConfigError, match="unknown cache policy 'mru'"):
        make_policy("mru")
    with pytest.raises(ConfigError, match="cache slots"):
        SlotTable(0)
    with pytest.raises(ConfigError, match="max_pinned"):
        SlotTable(4, max_pinned=4)


# ---- properties -------------------------------------------------------------------------------


def reference_lru(steps: list[list[int]], num_slots: int) -> tuple[int, int, list[int]]:
    """A plain LRU over experts requested k at a time: (hits, misses, evicted experts in order)."""
    recency: OrderedDict[int, None] = OrderedDict()
    hits = misses = 0
    evicted = []
    for experts in steps:
        for expert in experts:
            if expert in recency:
                hits += 1
            else:
                misses += 1
                if len(recency) == num_slots:
                    evicted.append(recency.popitem(last=False)[0])
            recency[expert] = None
            recency.move_to_end(expert)
    return hits, misses, evicted


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_experts=st.integers(2, 12), top_k=st.integers(1, 3),
       extra_slots=st.integers(0, 6), num_steps=st.integers(1, 40))
def test_lru_with_k_leases_per_step_matches_a_plain_lru(seed, num_experts, top_k, extra_slots, num_steps):
    top_k = min(top_k, num_experts)
    rng = random.Random(seed)
    steps = [rng.sample(range(num_experts), top_k) for _ in range(num_steps)]
    table = SlotTable(top_k + extra_slots)
    evicted = []
    for token, experts in enumerate(steps):
        held = []
        for expert in experts:  # the k experts of a step are acquired together and leased together
            result = table.acquire(expert, token)
            assert result.kind in (HIT, MISS)
            if result.kind is MISS:
                table.finish_load(result.slot, result.generation, ok=True)
                if result.evicted_expert is not None:
                    evicted.append(result.evicted_expert)
            held.append(result)
        for result in held:
            table.release(result.slot, result.generation)
    hits, misses, reference_evicted = reference_lru(steps, top_k + extra_slots)
    assert (table.counters.hits, table.counters.misses, evicted) == (hits, misses, reference_evicted)


NUM_EXPERTS = 8


class SlotTableMachine(RuleBasedStateMachine):
    """Random interleavings of every call; the invariants of the module docstring checked after each step."""

    def __init__(self):
        super().__init__()
        self.table = SlotTable(4, max_pinned=2)
        self.token = 0
        self.held: list[tuple[int, int]] = []  # leases we hold: (slot, generation)
        self.pending: dict[tuple[int, int], int] = {}  # (slot, generation) of LOADING slots -> waiting requests
        self.lookups = 0
        self.observed_evictions = 0
        self.used_outcomes = 0  # acquires that said they were the first use of a prefetch
        self.wasted_outcomes = 0  # calls that said they evicted an unused prefetch
        self.failed_slot: int | None = None
        self.before = self.table.slot_infos()

    def _record_assignment(self, slot, generation, evicted_expert, waiters, token, prefetch, wasted_prefetch):
        before = self.before[slot]
        assert before.state in (SlotState.FREE, SlotState.READY), "evicted a LOADING or LEASED slot"
        assert before.expert_id is None or not self.table.is_pinned(before.expert_id)
        assert evicted_expert == before.expert_id
        assert wasted_prefetch == before.is_prefetched_unused, "the outcome misreports a wasted prefetch"
        self.wasted_outcomes += wasted_prefetch
        if prefetch and before.state is SlotState.READY:
            assert before.last_token < token, "a prefetch evicted a slot used in the current token"
        self.observed_evictions += evicted_expert is not None
        self.pending[(slot, generation)] = waiters

    @rule(expert=st.integers(0, NUM_EXPERTS - 1))
    def acquire(self, expert):
        slot = self.table.lookup(expert)
        was_unused_prefetch = slot is not None and self.table.slot_info(slot).is_prefetched_unused
        result = self.table.acquire(expert, self.token)
        if result.kind is NO_SLOT:
            return
        self.lookups += 1
        assert result.used_prefetch == was_unused_prefetch, "the outcome misreports a used prefetch"
        self.used_outcomes += result.used_prefetch
        key = (result.slot, result.generation)
        if result.kind is HIT:
            self.held.append(key)
        elif result.kind is JOIN:
            self.pending[key] += 1
        else:
            self._record_assignment(*key, result.evicted_expert, 1, self.token, prefetch=False,
                                    wasted_prefetch=result.wasted_prefetch)

    @rule(expert=st.integers(0, NUM_EXPERTS - 1))
    def assign_prefetch(self, expert):
        admissible = self.table.can_admit_prefetch(expert, self.token)
        assignment = self.table.assign_prefetch(expert, self.token)
        assert (assignment is not None) == admissible
        if assignment is not None:
            self._record_assignment(assignment.slot, assignment.generation, assignment.evicted_expert, 0,
                                    self.token, prefetch=True, wasted_prefetch=assignment.wasted_prefetch)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), ok=st.booleans())
    def finish_load(self, data, ok):
        key = data.draw(st.sampled_from(sorted(self.pending)))
        waiters = self.pending.pop(key)
        assert self.table.finish_load(*key, ok=ok) == waiters
        if ok:
            self.held += [key] * waiters
        else:
            self.failed_slot = key[0]

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        key = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.table.release(*key)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release_stale_generation(self, data):
        slot, generation = data.draw(st.sampled_from(self.held))
        with pytest.raises(StaleSlotError):
            self.table.release(slot, generation + 1)

    @rule(expert=st.integers(0, NUM_EXPERTS - 1))
    def pin(self, expert):
        self.table.pin(expert)

    @rule(expert=st.integers(0, NUM_EXPERTS - 1))
    def unpin(self, expert):
        self.table.unpin(expert)

    @rule()
    def next_token(self):
        self.token += 1

    @invariant()
    def states_are_consistent(self):
        infos = self.table.slot_infos()
        resident = [info.expert_id for info in infos if info.expert_id is not None]
        assert len(resident) == len(set(resident)), "an expert in two slots"
        for info in infos:
            assert info.lease_count >= 0 and info.pending_leases >= 0
            assert (info.state is SlotState.FREE) == (info.expert_id is None)
            assert (info.state is SlotState.LEASED) == (info.lease_count > 0)
            assert info.lease_count == self.held.count((info.slot, info.generation))
            assert info.pending_leases == self.pending.get((info.slot, info.generation), 0)
            if info.expert_id is not None:
                assert self.table.lookup(info.expert_id) == info.slot
        assert self.table.num_free == sum(info.state is SlotState.FREE for info in infos)
        assert sum(self.table.is_pinned(expert) for expert in range(NUM_EXPERTS)) <= self.table.max_pinned

    @invariant()
    def busy_slots_keep_their_expert_and_generations_only_grow(self):
        for before, after in zip(self.before, self.table.slot_infos()):
            assert after.generation >= before.generation
            if before.state in (SlotState.LOADING, SlotState.LEASED) and before.slot != self.failed_slot:
                assert (after.expert_id, after.generation) == (before.expert_id, before.generation)
            if after.generation == before.generation:  # no reassignment: same expert, or freed by a failed read
                assert after.expert_id in (before.expert_id, None)
        self.failed_slot = None
        self.before = self.table.slot_infos()

    @invariant()
    def counters_add_up(self):
        counters = self.table.counters
        assert counters.hits + counters.misses == self.lookups
        assert counters.evictions == self.observed_evictions
        assert (counters.prefetch_used, counters.prefetch_wasted) == (self.used_outcomes, self.wasted_outcomes)
        assert counters.prefetch_used + counters.prefetch_wasted <= counters.prefetches_assigned


SlotTableMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_slot_table_state_machine = SlotTableMachine.TestCase
