"""Workloads: decisions well formed, deterministic, and with the statistics each one promises.

Statistical checks use tolerances of 4 binomial standard deviations (a false failure about once in
16,000 runs for each check); the seeds are fixed and printed in the assertion messages.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mer.errors import ConfigError, TraceError
from mer.routing.space import RoutingDecision, RoutingSpace
from mer.routing.trace import TraceHeader, TraceWriter
from mer.routing.workloads.base import draw_distinct
from mer.routing.workloads.factory import make_workload
from mer.routing.workloads.markov import MarkovWorkload
from mer.routing.workloads.replay import ReplayWorkload
from mer.routing.workloads.skewed import SkewedWorkload
from mer.routing.workloads.uniform import UniformWorkload

FLAT = RoutingSpace(num_layers=32, experts_per_layer=8, top_k=2)
LAYERED = RoutingSpace(num_layers=4, experts_per_layer=8, top_k=2, layered=True)
SYNTHETIC = ("markov", "uniform", "skewed")


def binomial_tolerance(p: float, n: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("name", SYNTHETIC)
@pytest.mark.parametrize("space", [FLAT, LAYERED], ids=["flat", "layered"])
def test_decisions_are_well_formed(name, space):
    workload = make_workload(name, space, seed=3, correlation=0.5)
    for token in range(200):
        for layer in range(space.decision_layers):
            decision = workload.next_decision()
            assert (decision.token, decision.layer) == (token, layer)
            assert len(decision.experts) == space.top_k
            assert len(set(decision.experts)) == space.top_k, decision
            assert all(type(e) is int and 0 <= e < space.experts_per_decision for e in decision.experts)
            assert decision.weights == (0.5, 0.5)
    assert workload.num_tokens is None


@pytest.mark.parametrize("name", SYNTHETIC)
def test_same_seed_same_decisions_and_other_seed_differs(name):
    first = [make_workload(name, FLAT, seed=11).next_decision() for _ in range(1)]
    a, b, c = (make_workload(name, FLAT, seed=s) for s in (11, 11, 12))
    run_a = [a.next_decision() for _ in range(300)]
    run_b = [b.next_decision() for _ in range(300)]
    run_c = [c.next_decision() for _ in range(300)]
    assert run_a == run_b
    assert run_a[0] == first[0]
    assert run_a != run_c


def test_next_token_gives_every_layer_in_order():
    workload = make_workload("uniform", LAYERED, seed=1)
    assert [d.layer for d in workload.next_token()] == [0, 1, 2, 3]
    assert {d.token for d in workload.next_token()} == {1}


def test_global_ids():
    decision = RoutingDecision(token=0, layer=3, experts=(1, 7), weights=(0.5, 0.5))
    assert LAYERED.global_ids(decision) == (25, 31)
    assert FLAT.global_ids(RoutingDecision(0, 0, (200, 3), (0.5, 0.5))) == (200, 3)
    assert (FLAT.decision_layers, FLAT.experts_per_decision, FLAT.lookups_per_token) == (1, 256, 2)
    assert (LAYERED.decision_layers, LAYERED.experts_per_decision, LAYERED.lookups_per_token) == (4, 8, 8)


def test_k_larger_than_the_pool_is_an_error():
    with pytest.raises(ConfigError, match="top_k 9 exceeds the 8 experts per layer"):
        RoutingSpace(32, 8, 9, layered=True)
    RoutingSpace(32, 8, 9)  # the flat pool has 256 experts
    with pytest.raises(ConfigError, match="top_k 257 exceeds the 256 experts in the flat pool"):
        RoutingSpace(32, 8, 257)
    with pytest.raises(ConfigError, match="num_layers"):
        RoutingSpace(0, 8, 2)


def test_make_workload_errors():
    with pytest.raises(ConfigError, match="unknown workload 'zipf'"):
        make_workload("zipf", FLAT)
    with pytest.raises(ConfigError, match="--trace"):
        make_workload("replay", FLAT)
    with pytest.raises(ConfigError, match="workload_correlation"):
        make_workload("skewed", FLAT, correlation=1.5)
    with pytest.raises(ConfigError, match="zipf_s"):
        make_workload("skewed", FLAT, zipf_s=-1.0)


def test_draw_distinct_never_picks_a_zero_weight():
    rng = np.random.default_rng(5)
    weights = np.array([0.0, 1.0, 0.0, 2.0, 0.0, 1e-12])
    for _ in range(500):
        assert set(draw_distinct(rng, weights, 2)) <= {1, 3, 5}
    assert sorted(draw_distinct(rng, weights, 3)) == [1, 3, 5]


def in_cluster_probability_of_second_draw(pool_size: int, clusters: int, stay: float) -> float:
    """Exact P(second draw is in last's cluster) for successive sampling without replacement."""
    inside = pool_size // clusters
    outside = pool_size - inside
    after_inside = stay * (inside - 1) / inside / (stay * (inside - 1) / inside + (1 - stay))
    after_outside = stay / (stay + (1 - stay) * (outside - 1) / outside)
    return stay * after_inside + (1 - stay) * after_outside


@pytest.mark.parametrize("space", [FLAT, LAYERED], ids=["flat", "layered"])
def test_markov_stays_in_the_cluster_ninety_percent_of_the_time(space):
    seed, num_tokens = 21, 4000
    workload = MarkovWorkload(space, seed)
    first_stays = second_stays = draws = 0
    for _ in range(num_tokens):
        for layer in range(space.decision_layers):
            last = workload.last_expert(layer)
            decision = workload.next_decision()
            first_stays += decision.experts[0] % 4 == last % 4
            second_stays += decision.experts[1] % 4 == last % 4
            assert workload.last_expert(layer) == decision.experts[-1]
            draws += 1
    second_expected = in_cluster_probability_of_second_draw(space.experts_per_decision, 4, 0.9)
    assert abs(first_stays / draws - 0.9) < binomial_tolerance(0.9, draws), (seed, first_stays / draws)
    assert abs(second_stays / draws - second_expected) < binomial_tolerance(second_expected, draws), (
        seed, second_stays / draws, second_expected)


def test_markov_spreads_evenly_inside_a_cluster():
    workload = MarkovWorkload(FLAT, seed=4)
    counts = np.zeros(256)
    for _ in range(6000):
        for expert in workload.next_decision().experts:
            counts[expert] += 1
    assert counts.min() > 0  # every expert of every cluster is reachable
    # within a cluster every expert is equally likely (the cluster totals wander with the chain)
    for cluster in range(4):
        assert chi_square(counts[cluster::4]) < chi_square_bound(64), cluster


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_bound(num_cells: int) -> float:
    """Mean + 5 standard deviations of a chi-square with num_cells - 1 degrees of freedom."""
    freedom = num_cells - 1
    return freedom + 5 * math.sqrt(2 * freedom)


def test_markov_chi_square_is_not_trivially_satisfied():
    counts = np.full(64, 40.0)
    counts[:16] = 80.0  # a quarter of the cluster twice as popular as the rest: must be flagged
    assert chi_square(counts) > chi_square_bound(64)


@pytest.mark.parametrize("space", [FLAT, LAYERED], ids=["flat", "layered"])
def test_uniform_counts_pass_a_chi_square_bound(space):
    workload = UniformWorkload(space, seed=8)
    counts = np.zeros((space.decision_layers, space.experts_per_decision))
    for _ in range(3000):
        for decision in workload.next_token():
            for expert in decision.experts:
                counts[decision.layer, expert] += 1
    for layer_counts in counts:
        assert chi_square(layer_counts) < chi_square_bound(len(layer_counts))


def test_skewed_top_ranks_follow_zipf_with_k_1():
    seed, draws, s = 13, 20000, 1.1
    space = RoutingSpace(8, 8, 1)
    workload = SkewedWorkload(space, seed, zipf_s=s)
    counts = np.zeros(64)
    for _ in range(draws):
        counts[workload.next_decision().experts[0]] += 1
    by_rank = workload.experts_by_rank(0)
    harmonic = sum(r ** -s for r in range(1, 65))
    for rank in range(1, 9):
        expected = rank ** -s / harmonic
        observed = counts[by_rank[rank - 1]] / draws
        assert abs(observed - expected) < binomial_tolerance(expected, draws), (seed, rank, observed, expected)
    assert tuple(np.argsort(-counts, kind="stable")[:3]) == by_rank[:3]


def test_skewed_order_is_shuffled_per_seed_and_per_layer():
    orders = [SkewedWorkload(FLAT, seed).experts_by_rank(0) for seed in (1, 2)]
    assert orders[0] != orders[1]
    assert orders[0] != tuple(range(256))
    assert sorted(orders[0]) == list(range(256))
    layered = SkewedWorkload(RoutingSpace(4, 64, 2, layered=True), 1)
    assert len({layered.experts_by_rank(layer) for layer in range(4)}) == 4


def test_skewed_with_k_2_ranks_experts_by_popularity():
    workload = SkewedWorkload(FLAT, seed=9, zipf_s=1.1)
    counts = np.zeros(256)
    for _ in range(10000):
        for expert in workload.next_decision().experts:
            counts[expert] += 1
    assert tuple(np.argsort(-counts, kind="stable")[:3]) == workload.experts_by_rank(0)[:3]


def repeat_fraction(workload, num_tokens: int) -> float:
    previous = workload.next_decision().experts
    repeats = 0
    for _ in range(num_tokens - 1):
        experts = workload.next_decision().experts
        repeats += experts == previous
        previous = experts
    return repeats / (num_tokens - 1)


def test_skewed_correlation_repeats_the_previous_decision():
    num_tokens, p = 6000, 0.7
    # chance of a fresh draw equal to the previous one, measured with correlation 0 (another seed)
    chance = repeat_fraction(SkewedWorkload(FLAT, 31, zipf_s=1.2), num_tokens)
    expected = p + (1 - p) * chance
    observed = repeat_fraction(SkewedWorkload(FLAT, 32, zipf_s=1.2, correlation=p), num_tokens)
    tolerance = binomial_tolerance(expected, num_tokens) + (1 - p) * binomial_tolerance(max(chance, 1e-3), num_tokens)
    assert abs(observed - expected) < tolerance, (observed, expected, chance)


def test_skewed_full_correlation_repeats_forever_and_zero_s_is_uniform():
    workload = SkewedWorkload(FLAT, 2, correlation=1.0)
    first = workload.next_decision().experts
    assert all(workload.next_decision().experts == first for _ in range(50))
    flat = SkewedWorkload(RoutingSpace(4, 8, 2, layered=True), 2, zipf_s=0.0)
    counts = np.zeros(8)
    for _ in range(3000):
        for expert in flat.next_decision().experts:
            counts[expert] += 1
    assert chi_square(counts) < chi_square_bound(8)


def record(workload, path, num_tokens):
    with TraceWriter(path, TraceHeader.for_space(workload.space)) as writer:
        decisions = [workload.next_decision() for _ in range(num_tokens * workload.space.decision_layers)]
        for decision in decisions:
            writer.write(decision)
    return decisions


@pytest.mark.parametrize("space", [FLAT, LAYERED], ids=["flat", "layered"])
def test_replay_gives_back_the_recorded_decisions(tmp_path, space):
    path = tmp_path / "trace.jsonl"
    recorded = record(MarkovWorkload(space, 5), path, 50)
    replay = make_workload("replay", space, trace_path=path)
    assert isinstance(replay, ReplayWorkload)
    assert replay.num_tokens == 50
    assert list(replay) == recorded


def test_replay_keeps_the_trace_weights_and_stops_at_the_end(tmp_path):
    path = tmp_path / "trace.jsonl"
    space = RoutingSpace(1, 4, 2, layered=True)
    with TraceWriter(path, TraceHeader(1, 4, 2)) as writer:
        writer.write(RoutingDecision(0, 0, (3, 1), (0.75, 0.25)))
    replay = ReplayWorkload(space, path)
    assert replay.next_decision() == RoutingDecision(0, 0, (3, 1), (0.75, 0.25))
    with pytest.raises(StopIteration):
        replay.next_decision()


def test_replay_geometry_must_fit(tmp_path):
    layered_trace, flat_trace = tmp_path / "layered.jsonl", tmp_path / "flat.jsonl"
    record(MarkovWorkload(LAYERED, 1), layered_trace, 3)
    record(MarkovWorkload(RoutingSpace(4, 8, 2), 1), flat_trace, 3)
    with pytest.raises(TraceError, match=r"layered\.jsonl.*4 layer\(s\) x 8 experts.*run with --layered"):
        ReplayWorkload(RoutingSpace(4, 8, 2), layered_trace)
    with pytest.raises(TraceError, match="flat-pool trace: run without --layered"):
        ReplayWorkload(LAYERED, flat_trace)
    with pytest.raises(TraceError, match="run with --top-k 2"):
        ReplayWorkload(RoutingSpace(4, 8, 3, layered=True), layered_trace)
    with pytest.raises(TraceError, match="does not fit this run"):
        ReplayWorkload(RoutingSpace(4, 16, 2, layered=True), layered_trace)


def test_replay_of_a_bad_trace_fails_when_made(tmp_path):
    path = tmp_path / "bad.jsonl"
    record(MarkovWorkload(LAYERED, 1), path, 3)
    lines = path.read_text().splitlines()
    lines[7] = lines[7].replace('"experts":[', '"experts":[99,')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"bad\.jsonl:8: 3 experts"):
        ReplayWorkload(LAYERED, path)
