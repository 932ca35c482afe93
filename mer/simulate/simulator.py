"""Replay a routing trace through the live cache code: the same SlotTable, policies and step order.

One cache serves every layer, as in the live I/O worker: requests are global store ids
(`layer * experts_per_layer + expert`; a flat-pool trace already holds global ids in layer 0).
Each step (one routing decision) goes as the router and the I/O worker do it:

1. prefetch reads issued during the previous step complete (`finish_load`): the simulator assumes
   compute hides a prefetch read issued one step ahead (the optimistic bound on prefetch timing);
2. the policy hears the step's requests (`record_step`), then the k experts are acquired together
   in the live order (`mer.cache.step.acquire_order`: resident first, so they cannot evict each
   other); every miss's read completes at once (its step waits for it: a stall);
3. with a predictor, it observes the decision and its hints are admitted like the live I/O worker's
   `_admit_prefetches`: skip a hint already in a slot; drop it when `predict_fanout x
   pipeline_depth` prefetch reads are in flight or `assign_prefetch` finds no slot;
4. the step's leases are released.

Ties are deterministic (lowest FREE slot first, then the policy's order), so the same trace, cache
size and policy always give the same result. With `predictor="none"` and `lru`, the replay gives
exactly the hits and misses of a live `run --no-prefetch` that recorded the trace.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from mer.cache.policy import make_replay_policy
from mer.cache.slot_table import AcquireKind, AcquireResult, Assignment, SlotTable
from mer.cache.step import acquire_order
from mer.errors import ConfigError
from mer.simulate.predictors import HintSource, make_hint_source
from mer.routing.trace import TraceHeader, read_trace
from mer.metrics.stats import percent


@dataclass(frozen=True)
class ReplayTrace:
    """A whole trace in memory: every step's global expert ids and token."""

    path: Path
    header: TraceHeader
    steps: tuple[tuple[int, ...], ...]
    step_tokens: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.steps) // self.header.layers

    @property
    def num_experts(self) -> int:
        """Experts the trace can name: layers x experts per layer (the store's experts)."""
        return self.header.layers * self.header.experts_per_layer

    @property
    def lookups(self) -> int:
        return len(self.steps) * self.header.top_k

    def step_layer(self, index: int) -> int:
        """The layer of step `index` (every token holds its layers 0..L-1 in order)."""
        return index % self.header.layers


def load_trace(path: str | Path) -> ReplayTrace:
    """Read and check a whole trace (TraceError naming the file and line on a bad one)."""
    header, decisions = read_trace(path)
    steps, tokens = [], []
    for decision in decisions:
        offset = decision.layer * header.experts_per_layer
        steps.append(tuple(offset + expert for expert in decision.experts))
        tokens.append(decision.token)
    return ReplayTrace(Path(path), header, tuple(steps), tuple(tokens))


@dataclass
class SimulationResult:
    """What one replay did. `demand_reads` / `prefetch_reads` count reads per expert id."""

    policy: str
    predictor: str
    cache_slots: int
    pool_slots: int
    tokens: int
    hits: int = 0
    misses: int = 0
    stalls: int = 0  # foreground lookups that waited for a read (a miss not covered by a prefetch)
    prefetches_issued: int = 0
    prefetches_dropped: int = 0
    prefetches_used: int = 0
    prefetches_wasted: int = 0
    demand_reads: Counter = field(default_factory=Counter)
    prefetch_reads: Counter = field(default_factory=Counter)
    token_hits: dict[int, int] = field(default_factory=dict)
    token_misses: dict[int, int] = field(default_factory=dict)

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate_pct(self) -> float:
        return percent(self.hits, self.lookups)

    @property
    def reads(self) -> int:
        return sum(self.demand_reads.values()) + sum(self.prefetch_reads.values())


def simulate(trace: ReplayTrace, cache_slots: int, policy: str = "lru", *, predictor: str = "none",
             predict_fanout: int = 2, pipeline_depth: int = 1) -> SimulationResult:
    """Replay `trace` on a cache of `cache_slots` slots with `policy` and optional prefetch from `predictor`."""
    top_k = trace.header.top_k
    if isinstance(cache_slots, bool) or not isinstance(cache_slots, int) or cache_slots < top_k:
        raise ConfigError(f"cache slots {cache_slots!r} is below the trace's top_k {top_k}: a step needs k slots")
    for name, value in (("predict_fanout", predict_fanout), ("pipeline_depth", pipeline_depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    hint_source = make_hint_source(predictor, trace.num_experts, top_k, predict_fanout, pipeline_depth)
    pool_slots = cache_slots + (predict_fanout if predictor != "none" else 0)  # as the live run's arena
    table = SlotTable(pool_slots, make_replay_policy(policy, pool_slots, trace.steps,
                                                     experts_per_layer=trace.header.experts_per_layer,
                                                     num_layers=trace.header.layers))
    result = SimulationResult(policy, predictor, cache_slots, pool_slots, trace.num_tokens)
    replay = _Replay(table, result, hint_source, predict_fanout * pipeline_depth)
    for index, (expert_ids, token) in enumerate(zip(trace.steps, trace.step_tokens)):
        replay.step(expert_ids, token, trace.step_layer(index))
    counters = table.counters
    result.hits, result.misses = counters.hits, counters.misses
    result.prefetches_used, result.prefetches_wasted = counters.prefetch_used, counters.prefetch_wasted
    return result


class _Replay:
    """The step loop: the router's acquire/release around the I/O worker's table, plus prefetch admission."""

    def __init__(self, table: SlotTable, result: SimulationResult, hint_source: HintSource | None,
                 prefetch_limit: int):
        self.table = table
        self.result = result
        self.hint_source = hint_source
        self.prefetch_limit = prefetch_limit
        self.prefetches_in_flight: list[Assignment] = []

    def step(self, expert_ids: Sequence[int], token: int, layer: int = 0) -> None:
        self._complete_prefetches()
        self.table.policy.record_step(expert_ids)
        before_hits, before_misses = self.table.counters.hits, self.table.counters.misses
        leases = [self._acquire(expert_ids[index], token) for index in acquire_order(self.table, expert_ids)]
        for lease in leases:
            if lease.kind is AcquireKind.MISS_ASSIGNED:
                self.table.finish_load(lease.slot, lease.generation, ok=True)
        if self.hint_source is not None:
            self.hint_source.observe(layer, expert_ids)
            self._admit_prefetches(self.hint_source.hints(), token)
        for lease in leases:
            self.table.release(lease.slot, lease.generation)
        counters = self.table.counters
        tokens_hits, tokens_misses = self.result.token_hits, self.result.token_misses
        tokens_hits[token] = tokens_hits.get(token, 0) + counters.hits - before_hits
        tokens_misses[token] = tokens_misses.get(token, 0) + counters.misses - before_misses

    def _acquire(self, expert_id: int, token: int) -> AcquireResult:
        lease = self.table.acquire(expert_id, token)
        if lease.kind is AcquireKind.NO_SLOT:  # cannot happen: cache_slots >= k and every lease is released
            raise AssertionError(f"no slot for expert {expert_id} at token {token}")
        if lease.kind is AcquireKind.MISS_ASSIGNED:
            self.result.demand_reads[expert_id] += 1
        if lease.kind is not AcquireKind.HIT:
            self.result.stalls += 1
        return lease

    def _admit_prefetches(self, hints: Sequence[int], token: int) -> None:
        for expert_id in hints:
            if self.table.lookup(expert_id) is not None:
                continue  # resident or already loading: nothing to do
            assignment = None
            if len(self.prefetches_in_flight) < self.prefetch_limit:
                assignment = self.table.assign_prefetch(expert_id, token)
            if assignment is None:
                self.result.prefetches_dropped += 1
                continue
            self.result.prefetches_issued += 1
            self.result.prefetch_reads[expert_id] += 1
            self.prefetches_in_flight.append(assignment)

    def _complete_prefetches(self) -> None:
        for assignment in self.prefetches_in_flight:
            self.table.finish_load(assignment.slot, assignment.generation, ok=True)
        self.prefetches_in_flight.clear()
