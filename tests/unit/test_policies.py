"""Eviction policies (LRU, LFU, LRU+pin, Belady's MIN) driven through the real slot table by the simulator."""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.cache import SlotTable
from mer.cache.next_use import NextUseIndex
from mer.cache.policy import (POLICIES, BeladyPolicy, LfuPolicy, LruPinPolicy, LruPolicy, make_policy,
                              make_replay_policy)
from mer.cache.step import acquire_order
from mer.errors import ConfigError
from mer.simulate.simulator import ReplayTrace, simulate
from mer.routing.trace import TraceHeader


def make_trace(steps, num_experts: int | None = None) -> ReplayTrace:
    """A one-layer trace of `steps` (lists of distinct expert ids), one step per token."""
    steps = tuple(tuple(step) for step in steps)
    num_experts = num_experts or max(max(step) for step in steps) + 1
    return ReplayTrace(Path("<test>"), TraceHeader(1, num_experts, len(steps[0])), steps, tuple(range(len(steps))))


def misses(references, frames: int, policy: str) -> int:
    return simulate(make_trace([[page] for page in references]), frames, policy).misses


# Silberschatz, Galvin & Gagne, Operating System Concepts, ch. 9 (page replacement), 3 frames.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
# Belady's anomaly string (FIFO gets worse with 4 frames); stack algorithms like OPT and LRU do not.
ANOMALY = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("references, frames, optimal, lru", [
    (TEXTBOOK, 3, 9, 12),
    (ANOMALY, 3, 7, 10),
    (ANOMALY, 4, 6, 8),
])
def test_textbook_reference_strings(references, frames, optimal, lru):
    assert misses(references, frames, "belady") == optimal
    assert misses(references, frames, "lru") == lru


def brute_force_min_misses(steps: list[tuple[int, ...]], num_slots: int) -> int:
    """The fewest misses of any demand-fetch cache (every choice of victims tried), steps requested together."""

    @lru_cache(maxsize=None)
    def best(position: int, resident: frozenset) -> int:
        if position == len(steps):
            return 0
        step = frozenset(steps[position])
        missing = step - resident
        keep = resident & step
        others = sorted(resident - step)
        room = num_slots - len(resident)
        to_evict = max(0, len(missing) - room)
        results = []
        for victims in _combinations(others, to_evict):
            results.append(best(position + 1, (resident - frozenset(victims)) | missing | keep))
        return len(missing) + min(results)

    return best(0, frozenset())


def _combinations(items, count):
    from itertools import combinations

    return combinations(items, count)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_experts=st.integers(2, 7), top_k=st.integers(1, 2),
       extra_slots=st.integers(0, 3), num_steps=st.integers(1, 14))
def test_belady_equals_the_brute_force_optimum(seed, num_experts, top_k, extra_slots, num_steps):
    rng = random.Random(seed)
    steps = [tuple(rng.sample(range(num_experts), top_k)) for _ in range(num_steps)]
    slots = top_k + extra_slots
    assert simulate(make_trace(steps, num_experts), slots, "belady").misses == brute_force_min_misses(steps, slots)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_experts=st.integers(2, 24), top_k=st.integers(1, 3),
       extra_slots=st.integers(0, 10), num_steps=st.integers(1, 80), skew=st.booleans())
def test_belady_never_misses_more_than_any_other_policy(seed, num_experts, top_k, extra_slots, num_steps, skew):
    top_k = min(top_k, num_experts)
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** 1.2 if skew else 1.0 for rank in range(num_experts)]
    steps = []
    for _ in range(num_steps):
        step: list[int] = []
        while len(step) < top_k:
            expert = rng.choices(range(num_experts), weights)[0]
            if expert not in step:
                step.append(expert)
        steps.append(step)
    trace = make_trace(steps, num_experts)
    slots = top_k + extra_slots
    optimum = simulate(trace, slots, "belady").misses
    for policy in POLICIES:
        assert optimum <= simulate(trace, slots, policy).misses, policy


def test_belady_evicts_the_expert_used_furthest_ahead_and_breaks_ties_by_lowest_slot():
    steps = [[0], [1], [2], [3], [1], [0]]  # at step 3 (expert 3): next uses 0 -> 5, 1 -> 4, 2 -> never
    policy = make_replay_policy("belady", 3, steps)
    table = SlotTable(3, policy)
    for step in steps[:3]:
        policy.record_step(step)
        result = table.acquire(step[0], token=0)
        table.finish_load(result.slot, result.generation, ok=True)
        table.release(result.slot, result.generation)
    policy.record_step([3])
    assert table.acquire(3, token=0).evicted_expert == 2
    tied = make_replay_policy("belady", 2, [[5], [6], [7]])  # neither 5 nor 6 is used again: lowest slot
    table = SlotTable(2, tied)
    for expert in (5, 6):
        tied.record_step([expert])
        result = table.acquire(expert, token=0)
        table.finish_load(result.slot, result.generation, ok=True)
        table.release(result.slot, result.generation)
    tied.record_step([7])
    assert table.acquire(7, token=0).evicted_expert == 5 and table.lookup(7) == 0


def test_next_use_index_walks_the_known_steps_and_rejects_another_request():
    index = NextUseIndex([[1, 2], [3, 1], [2, 4]])
    assert index.never == 3 and index.next_use(1) == 0
    index.advance([2, 1])
    assert (index.next_use(1), index.next_use(2), index.next_use(4), index.next_use(9)) == (1, 2, 2, 3)
    with pytest.raises(ValueError, match=r"step 1 requests \[1, 5\], the known sequence has \[1, 3\]"):
        index.advance([5, 1])
    index.advance([1, 3])
    index.advance([4, 2])
    assert index.next_use(2) == index.never
    with pytest.raises(ValueError, match="after the last of the 3 known steps"):
        index.advance([1, 2])


def test_lfu_keeps_the_most_requested_expert_where_lru_drops_it():
    references = [0, 0, 0, 1, 2, 0]  # with 2 slots, request 2 evicts 1 under LFU (count 1 < 3), 0 under LRU
    assert misses(references, 2, "lfu") == 3
    assert misses(references, 2, "lru") == 4


def test_lfu_counts_outlive_eviction_and_ties_go_to_the_least_recently_used():
    # With 2 slots: request 3 evicts 2 (count 1) and keeps 1 (count 2); request 4 evicts 3 (count 1
    # against 1's 3). LRU evicts 1 at request 3 (least recently used) and misses it again.
    references = [1, 1, 2, 3, 1, 4, 1]
    assert misses(references, 2, "lfu") == 4
    assert misses(references, 2, "lru") == 5
    # 5 (count 2) is evicted by 7, comes back with count 3 and so outlasts 6 (3, less recently used)
    # when 8 returns; with counts reset at eviction it would have count 1 and be evicted by 8 instead.
    lfu = simulate(make_trace([[5], [5], [6], [6], [6], [7], [8], [5], [8], [5]]), 2, "lfu")
    assert lfu.misses == 6 and lfu.token_hits[9] == 1
    policy = LfuPolicy()
    table = SlotTable(2, policy)
    for expert in (7, 8):  # equal counts: the least recently used (7) goes first
        policy.record_step([expert])
        result = table.acquire(expert, token=0)
        table.finish_load(result.slot, result.generation, ok=True)
        table.release(result.slot, result.generation)
    policy.record_step([9])
    assert table.acquire(9, token=0).evicted_expert == 7
    assert policy.request_counts == {7: 1, 8: 1, 9: 1}


def scan_with_hot_expert(rounds: int, scan: int) -> list[int]:
    """Hot expert 0 between runs of `scan` experts never seen before: a reuse distance above the cache."""
    references, fresh = [], 1
    for _ in range(rounds):
        references.append(0)
        references.extend(range(fresh, fresh + scan))
        fresh += scan
    return references


def test_lru_plus_pin_keeps_a_hot_expert_through_a_scan_that_flushes_lru():
    references = scan_with_hot_expert(rounds=20, scan=4)  # 4 fresh experts between uses of 0, 4 slots
    trace = make_trace([[r] for r in references])
    lru = simulate(trace, 4, "lru")
    pinned = simulate(trace, 4, "lru+pin")  # for_replay: 1 pin, window 16 requests, hot at >= 3
    assert lru.hits == 0
    # 0 misses its first 3 requests (it becomes hot at the 3rd: 3 of its uses in the 16-request
    # window) and, pinned from then on, hits all 17 later ones; every scan expert misses.
    assert pinned.hits == 20 - 3
    assert pinned.misses == len(references) - pinned.hits


def test_lru_plus_pin_is_bounded_and_never_blocks():
    policy = LruPinPolicy(max_pinned=1, window=8, min_count=2)
    policy.record_step([3, 4])
    policy.record_step([3, 4])
    policy.record_step([5])
    assert policy.pinned_experts() == {3}  # 3 and 4 are tied at 2: the lower id wins the single pin
    table = SlotTable(2, policy)
    for expert in (3, 4):
        result = table.acquire(expert, token=0)
        table.finish_load(result.slot, result.generation, ok=True)
        table.release(result.slot, result.generation)
    assert table.acquire(9, token=1).evicted_expert == 4  # 3 is pinned although least recently used
    for expert in range(6, 12):  # 8-request window: 3's two requests slide out, nothing is hot any more
        policy.record_step([expert])
    assert policy.pinned_experts() == set()
    lonely = SlotTable(1, LruPinPolicy(max_pinned=1, window=4, min_count=1))
    lonely.policy.record_step([1])
    result = lonely.acquire(1, token=0)
    lonely.finish_load(result.slot, result.generation, ok=True)
    lonely.release(result.slot, result.generation)
    assert lonely.policy.pinned_experts() == {1}
    assert lonely.acquire(2, token=1).evicted_expert == 1  # only pinned slots are evictable: still a victim


def test_acquire_order_puts_resident_experts_first():
    table = SlotTable(4)
    for expert in (5, 6):
        result = table.acquire(expert, token=0)
        table.finish_load(result.slot, result.generation, ok=True)
        table.release(result.slot, result.generation)
    loading = table.acquire(7, token=0)  # LOADING counts as resident (a join, not a miss)
    assert acquire_order(table, [1, 6, 2, 7, 5]) == [1, 3, 4, 0, 2]
    table.finish_load(loading.slot, loading.generation, ok=True)


def test_policy_construction_errors():
    assert list(POLICIES) == ["lru", "lfu", "lru+pin", "layer", "belady"]
    assert isinstance(make_policy("lru"), LruPolicy) and isinstance(make_policy("lfu"), LfuPolicy)
    with pytest.raises(ConfigError, match="unknown cache policy 'mru'; known: lru, lfu, lru\\+pin, layer, belady"):
        make_policy("mru")
    with pytest.raises(ConfigError, match="'belady' is offline"):
        make_policy("belady")
    assert isinstance(make_policy("belady", future=NextUseIndex([[1]])), BeladyPolicy)
    with pytest.raises(ConfigError, match="lru\\+pin option window must be an integer >= 1, got 0"):
        LruPinPolicy(window=0)
    replay = make_replay_policy("lru+pin", 16, [[1]])
    assert isinstance(replay, LruPinPolicy) and replay.max_pinned == 4


def test_layer_policy_evicts_the_layer_that_comes_back_last():
    from mer.cache.policy import LayerCyclicPolicy

    policy = LayerCyclicPolicy(experts_per_layer=4, num_layers=3)  # global ids: layer = id // 4
    for slot, expert in enumerate((0, 5, 9, 1, 6)):  # layers 0, 1, 2, 0, 1 (slot 0 least recently used)
        policy.record_insert(slot, expert)
    policy.record_step([4, 7])  # the router is at layer 1: layer 1 comes back last, then 0, then 2
    assert [policy.steps_until_needed(e) for e in (0, 5, 9)] == [2, 3, 1]
    assert policy.choose_victim(lambda slot: True) == 1  # expert 5 (layer 1), the LRU of its layer
    assert policy.choose_victim(lambda slot: slot != 1) == 4  # expert 6: layer 1 again
    assert policy.choose_victim(lambda slot: slot not in (1, 4)) == 0  # then layer 0, LRU first
    assert policy.choose_victim(lambda slot: slot == 2) == 2  # layer 2 only when nothing else may go
    assert policy.choose_victim(lambda slot: False) is None
    policy.record_step([9, 10])  # layer 2: layer 2 now comes back last
    assert policy.choose_victim(lambda slot: True) == 2
    flat = LayerCyclicPolicy(experts_per_layer=12, num_layers=1)  # the flat pool: plain LRU
    lru = LruPolicy()
    for slot, expert in enumerate((3, 11, 0)):
        flat.record_insert(slot, expert)
        lru.record_insert(slot, expert)
    flat.record_step([11])
    lru.record_access(1, 11)
    flat.record_access(1, 11)
    assert flat.choose_victim(lambda slot: True) == lru.choose_victim(lambda slot: True) == 0
    with pytest.raises(ConfigError, match="layer policy"):
        LayerCyclicPolicy(0, 2)
