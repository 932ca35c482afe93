"""The trace simulator: replay through the live slot table, prefetch hints, rows, bytes and the projection."""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.errors import ConfigError, EventLogError, TraceError
from mer.routing.space import RoutingDecision
from mer.simulate.predictors import evaluate_predictor
from mer.simulate.projection import (ExpertSizes, ProjectionInputs, project_seconds_per_token,
                                     resolve_projection_inputs)
from mer.simulate.report import format_table, simulation_rows
from mer.simulate.simulator import ReplayTrace, load_trace, simulate
from mer.store.synth import SynthSpec, synth_store
from mer.routing.trace import TraceHeader, TraceWriter

TINY_READ_NBYTES = 221_184  # q4_0, d_model 256, d_ff 512: 3 x 256 x 512 / 32 x 18 bytes, a multiple of 4096


def make_trace(steps, num_experts: int) -> ReplayTrace:
    steps = tuple(tuple(step) for step in steps)
    return ReplayTrace(Path("<test>"), TraceHeader(1, num_experts, len(steps[0])), steps, tuple(range(len(steps))))


def random_steps(seed: int, num_experts: int, top_k: int, num_steps: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [rng.sample(range(num_experts), top_k) for _ in range(num_steps)]


def reference_step_lru(steps, num_slots: int) -> tuple[int, int, list[int]]:
    """A plain LRU whose step members cannot evict each other: (hits, misses, hits per step)."""
    recency: OrderedDict[int, None] = OrderedDict()
    hits = misses = 0
    per_step = []
    for step in steps:
        step_hits = 0
        for expert in step:
            if expert in recency:
                recency.move_to_end(expert)
                step_hits += 1
        for expert in step:
            if expert in recency:
                continue
            if len(recency) == num_slots:
                recency.popitem(last=False)
            recency[expert] = None
            misses += 1
        hits += step_hits
        per_step.append(step_hits)
    return hits, misses, per_step


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_experts=st.integers(2, 20), top_k=st.integers(1, 4),
       extra_slots=st.integers(0, 8), num_steps=st.integers(1, 60))
def test_lru_replay_equals_a_plain_step_lru(seed, num_experts, top_k, extra_slots, num_steps):
    top_k = min(top_k, num_experts)
    steps = random_steps(seed, num_experts, top_k, num_steps)
    result = simulate(make_trace(steps, num_experts), top_k + extra_slots, "lru")
    hits, misses, per_step = reference_step_lru(steps, top_k + extra_slots)
    assert (result.hits, result.misses, result.stalls) == (hits, misses, misses)
    assert [result.token_hits[token] for token in range(num_steps)] == per_step
    assert sum(result.demand_reads.values()) == misses and not result.prefetch_reads


def test_the_k_experts_of_a_step_cannot_evict_each_other():
    # 2 slots; step [2, 1] leaves 2 least recently used. Step [3, 2] acquired in request order would
    # let 3's miss evict 2 and then miss 2 again; acquired together (resident first), 2 hits and 3 evicts 1.
    result = simulate(make_trace([[2, 1], [3, 2]], 4), 2, "lru")
    assert (result.hits, result.misses) == (1, 3)
    assert result.token_hits == {0: 0, 1: 1}


def write_trace(path: Path, header: TraceHeader, tokens: list[list[list[int]]]) -> Path:
    with TraceWriter(path, header) as writer:
        for token, layers in enumerate(tokens):
            for layer, experts in enumerate(layers):
                writer.write(RoutingDecision(token, layer, tuple(experts), (0.5,) * len(experts)))
    return path


def test_a_layered_trace_shares_one_cache_across_layers_with_global_ids(tmp_path):
    header = TraceHeader(layers=2, experts_per_layer=4, top_k=2)
    path = write_trace(tmp_path / "t.jsonl", header, [[[0, 1], [0, 1]], [[0, 1], [0, 1]], [[2, 3], [0, 1]]])
    trace = load_trace(path)
    assert trace.steps == ((0, 1), (4, 5), (0, 1), (4, 5), (2, 3), (4, 5))
    assert (trace.num_tokens, trace.num_experts, trace.lookups) == (3, 8, 12)
    result = simulate(trace, 4, "lru")  # 4 slots hold both layers' experts 0 and 1 (ids 0, 1, 4, 5)
    assert (result.token_hits, result.token_misses) == ({0: 0, 1: 4, 2: 2}, {0: 4, 1: 0, 2: 2})
    small = simulate(trace, 2, "lru")  # 2 slots: the layers evict each other every step
    assert small.hits == 0 and small.misses == 12


def cycle_steps(num_pairs: int, repeats: int) -> list[list[int]]:
    return [[2 * pair, 2 * pair + 1] for _ in range(repeats) for pair in range(num_pairs)]


def test_markov_prefetch_cuts_stalls_below_min_but_never_bytes():
    trace = make_trace(cycle_steps(num_pairs=6, repeats=20), 12)  # a fixed cycle through 12 experts
    demand = simulate(trace, 4, "lru")
    prefetch = simulate(trace, 4, "lru", predictor="markov")
    minimum = simulate(trace, prefetch.pool_slots, "belady")  # 6 slots: the prefetch run's table
    assert demand.misses == trace.lookups  # LRU on a cycle longer than the cache: every lookup misses
    assert prefetch.pool_slots == 6 and prefetch.prefetches_issued > 0
    assert prefetch.stalls < 0.1 * trace.lookups  # the cycle is predicted after warm-up
    assert prefetch.stalls < minimum.misses
    assert prefetch.reads >= minimum.misses
    assert prefetch.prefetches_used + prefetch.prefetches_wasted <= prefetch.prefetches_issued
    assert prefetch.hits + prefetch.misses == trace.lookups


def test_every_live_predictor_and_their_fusion_replay_offline():
    cycle = make_trace(cycle_steps(num_pairs=6, repeats=20), 12)
    assert simulate(cycle, 4, "lru", predictor="fused").stalls < 0.1 * cycle.lookups  # Markov's hints win the fusion
    assert simulate(cycle, 4, "lru", predictor="affinity").prefetches_issued == 0  # pairs never meet another pair
    rng = random.Random(3)  # expert 0 in every other step, the rest uniform: a hot expert, no sequence
    hot = make_trace([[0, rng.choice(range(1, 12))] if step % 2 == 0 else rng.sample(range(1, 12), 2)
                      for step in range(200)], 12)
    demand = simulate(hot, 4, "lru")
    locality = simulate(hot, 4, "lru", predictor="locality")
    assert locality.prefetches_issued > 0 and locality.stalls < 0.85 * demand.stalls  # it keeps 0 coming back
    for predictor in ("locality", "affinity", "fused"):
        result = simulate(hot, 4, "lru", predictor=predictor)
        assert result.predictor == predictor and result.hits + result.misses == hot.lookups
        assert result.reads >= simulate(hot, result.pool_slots, "belady").misses
        assert result == simulate(hot, 4, "lru", predictor=predictor)  # deterministic


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_experts=st.integers(3, 16), extra_slots=st.integers(0, 6),
       num_steps=st.integers(1, 60), policy=st.sampled_from(["lru", "lfu", "lru+pin", "layer", "belady"]))
def test_prefetch_never_reads_less_than_min(seed, num_experts, extra_slots, num_steps, policy):
    trace = make_trace(random_steps(seed, num_experts, 2, num_steps), num_experts)
    result = simulate(trace, 2 + extra_slots, policy, predictor="markov", predict_fanout=2)
    minimum = simulate(trace, result.pool_slots, "belady")
    assert result.reads >= minimum.misses
    assert result.hits + result.misses == trace.lookups and result.stalls == result.misses
    assert sum(result.prefetch_reads.values()) == result.prefetches_issued


def test_replays_are_deterministic():
    trace = make_trace(random_steps(7, 10, 2, 200), 10)
    for policy in ("lru", "lfu", "lru+pin", "layer", "belady"):
        first, second = (simulate(trace, 5, policy, predictor="markov") for _ in range(2))
        assert first == second


def test_predictor_evaluation_on_a_cycle_and_without_a_predictor():
    trace = make_trace(cycle_steps(num_pairs=4, repeats=30), 8)
    score = evaluate_predictor(trace, "markov", predict_fanout=2)
    assert score.steps_scored == 119 and score.lookups == 238
    assert score.precision_pct > 90 and score.coverage_pct > 90
    none = evaluate_predictor(trace, "none")
    assert (none.hints, none.hinted_used, none.precision_pct) == (0, 0, 0.0)


def test_simulate_argument_errors():
    trace = make_trace([[0, 1]], 4)
    with pytest.raises(ConfigError, match="cache slots 1 is below the trace's top_k 2"):
        simulate(trace, 1)
    with pytest.raises(ConfigError, match="unknown cache policy 'fifo'"):
        simulate(trace, 2, "fifo")
    with pytest.raises(ConfigError, match="unknown predictor 'oracle'; known: none, markov, locality, affinity, fused"):
        simulate(trace, 2, predictor="oracle")
    with pytest.raises(ConfigError, match="predict_fanout must be a positive integer, got 0"):
        simulate(trace, 2, predictor="markov", predict_fanout=0)


# ---- bytes and projection ----------------------------------------------------------------------


def test_projection_math():
    inputs = ProjectionInputs(disk_bytes_per_s=100e6, compute_s_per_token=0.010, disk_source="a", compute_source="b")
    # demand fetch: compute + bytes / bandwidth = 10 ms + 2 MB / 100 MB/s = 30 ms
    assert project_seconds_per_token(inputs, 2e6, 2e6) == pytest.approx(0.030)
    # prefetch hides 1 MB under compute: 10 ms + 1 MB / 100 MB/s = 20 ms (the disk needs 20 ms for 2 MB too)
    assert project_seconds_per_token(inputs, 1e6, 2e6) == pytest.approx(0.020)
    # the disk bounds it: 5 MB of reads take 50 ms whatever the overlap
    assert project_seconds_per_token(inputs, 0.0, 5e6) == pytest.approx(0.050)


def test_projection_inputs_from_flags():
    assert resolve_projection_inputs(None, None, None) is None
    inputs = resolve_projection_inputs(250.0, 12.5, None)
    assert (inputs.disk_bytes_per_s, inputs.compute_s_per_token) == (250e6, 0.0125)
    assert inputs.to_json_dict()["disk_mbps"] == 250.0
    with pytest.raises(ConfigError, match="needs a compute time"):
        resolve_projection_inputs(250.0, None, None)
    with pytest.raises(ConfigError, match="needs a disk bandwidth: give --disk-mbps"):
        resolve_projection_inputs(None, 12.5, None)
    with pytest.raises(ConfigError, match="--disk-mbps must be a positive number, got -1"):
        resolve_projection_inputs(-1.0, 12.5, None)


def write_log(path: Path, events: list[dict]) -> Path:
    """A JSON-lines log; every event gets the envelope fields every logged event carries."""
    path.write_text("".join(json.dumps({"schema": 1, "t_mono": 1.0, **event}) + "\n" for event in events))
    return path


def read_event(nbytes: int, latency_us: float) -> dict:
    return {"event": "expert_read", "expert_id": 0, "slot": 0, "nbytes": nbytes, "latency_us": latency_us,
            "kind": "foreground", "schema": 1}


def test_projection_inputs_measured_from_a_run_log(tmp_path):
    log = write_log(tmp_path / "run.jsonl", [
        {"event": "child_spawned", "child": "x"},
        read_event(1_000_000, 2_000.0), read_event(3_000_000, 6_000.0),  # 4 MB in 8 ms: 500 MB/s
        {"event": "run_summary", "compute_us_per_token": 7_500.0},
    ])
    inputs = resolve_projection_inputs(None, None, log)
    assert inputs.disk_bytes_per_s == pytest.approx(500e6)
    assert inputs.compute_s_per_token == pytest.approx(0.0075)
    assert "2 reads" in inputs.disk_source
    overridden = resolve_projection_inputs(100.0, None, log)  # the flag wins over the log's bandwidth
    assert overridden.disk_bytes_per_s == 100e6 and overridden.compute_s_per_token == pytest.approx(0.0075)


def test_projection_from_a_log_without_summary_or_reads(tmp_path):
    run_started = {"event": "run_started", "experts": 16, "top_k": 2, "cache_slots": 16, "pool_slots": 16,
                   "d_model": 256, "d_ff": 512, "bytes_per_expert": 1, "dtype": "q4_0", "compute_workers": 1,
                   "io_backend": "uring"}
    tokens = [{"event": "token_done", "token": t, "t_start_s": t * 1.0, "t_end_s": t + 0.5, "cycle_us": 500.0,
               "io_wait_us": 0.0, "compute_us": 1_000.0 * (t + 1), "hits": 2, "misses": 0, "lookups": 2,
               "prefetch_used": 0} for t in range(2)]
    log = write_log(tmp_path / "killed.jsonl", [run_started, *tokens])
    with pytest.raises(ConfigError, match="has no expert reads to measure it from"):
        resolve_projection_inputs(None, None, log)
    assert resolve_projection_inputs(80.0, None, log).compute_s_per_token == pytest.approx(0.0015)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event": "run_started", "schema": 1, "t_mono": 1.0}\nnot json\n')
    with pytest.raises(EventLogError, match="bad.jsonl:2: malformed line: not JSON"):
        resolve_projection_inputs(80.0, None, bad)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "tiny"
    synth_store(SynthSpec(2, 8, 2, 256, 512, ("q4_0",) * 3), out)
    return out


def test_expert_sizes_from_a_store_for_flat_and_layered_traces(tiny_store, tmp_path):
    for header in (TraceHeader(1, 16, 2), TraceHeader(2, 8, 2)):
        sizes = ExpertSizes.from_store(tiny_store, header, "t.jsonl")
        assert [sizes.bytes_of(expert) for expert in (0, 8, 15)] == [TINY_READ_NBYTES] * 3
    with pytest.raises(TraceError, match=r"t.jsonl: the trace's geometry \(2 layer\(s\) x 16 experts\) does not fit "
                                         r"the store .*2 MoE layers x 8 experts"):
        ExpertSizes.from_store(tiny_store, TraceHeader(2, 16, 2), "t.jsonl")
    with pytest.raises(ConfigError, match="--expert-bytes must be a positive integer, got 0"):
        ExpertSizes.uniform(0)


def test_rows_carry_bytes_min_and_projection_only_when_known():
    trace = make_trace(cycle_steps(num_pairs=3, repeats=10), 6)
    inputs = ProjectionInputs(1e6, 0.001, "flag", "flag")
    rows = simulation_rows(trace, [2, 4], ["lru", "belady"], ["none", "markov"], sizes=ExpertSizes.uniform(1000),
                           projection=inputs)
    assert [(r["predictor"], r["policy"], r["cache_slots"]) for r in rows] == [
        (predictor, policy, slots) for predictor in ("none", "markov") for policy in ("lru", "belady")
        for slots in (2, 4)]
    for row in rows:
        assert row["bytes_read"] == row["reads"] * 1000 and row["bytes_per_token"] == row["bytes_read"] / 30
        assert row["min_bytes_read"] == row["min_misses"] * 1000 <= row["bytes_read"]
        assert row["hit_rate_pct"] == pytest.approx(100 * row["hits"] / 60)
        stall_bytes = row["stalls"] * 1000 / 30
        assert row["projected_s_per_token"] == pytest.approx(max(0.001 + stall_bytes / 1e6, row["bytes_per_token"] / 1e6))
    belady_demand = [r for r in rows if r["policy"] == "belady" and r["predictor"] == "none"]
    assert all(r["misses"] == r["min_misses"] for r in belady_demand)
    bare = simulation_rows(trace, [2], ["lru"], ["none"])
    assert bare[0]["bytes_read"] is None and "projected_s_per_token" not in bare[0]
    table = format_table(bare)
    assert table.splitlines()[0].split()[:3] == ["predictor", "policy", "slots"] and "n/a" in table
