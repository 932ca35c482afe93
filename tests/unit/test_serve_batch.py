"""The serving job's batch: admission (first come first served, max_sequences, the KV pool), the step plan
(prompt chunks within the step's prefill budget), generate's stop rules, and cancellation."""

from __future__ import annotations

import pytest

from mer.model.hparams import HParams
from mer.model.sampling import Sampler
from mer.router.serve_batch import KVPool, ServedSequence, ServingBatch
from mer.model.attention import KVCache


class FakeCache:
    """A KV cache's length and capacity (what the batch reads); the real one is numpy arrays."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0


def sequence(request_id: int, prompt_length: int, max_tokens: int, capacity: int | None = None) -> ServedSequence:
    return ServedSequence(request_id, list(range(1, prompt_length + 1)), max_tokens, Sampler(), frozenset({2}), False,
                          0, capacity or prompt_length + max_tokens)


def test_admission_is_first_come_first_served_within_the_limits():
    pool = KVPool(100)
    batch = ServingBatch(2, pool, FakeCache)
    for request_id, (prompt, max_tokens) in enumerate([(10, 20), (30, 30), (5, 5), (1, 1)]):
        batch.submit(sequence(request_id, prompt, max_tokens))
    assert [s.request_id for s in batch.admit()] == [0, 1]  # max_sequences 2
    assert pool.num_used == 90 and batch.num_waiting == 2
    batch.finish(batch.running[1])
    assert [s.request_id for s in batch.admit()] == [2]
    assert pool.num_used == 40
    big = ServingBatch(4, KVPool(50), FakeCache)
    big.submit(sequence(7, 40, 10))
    big.submit(sequence(8, 1, 1))
    assert [s.request_id for s in big.admit()] == [7]
    assert [s.request_id for s in big.admit()] == []  # the pool is full: 8 waits behind nobody, for positions


def test_prompt_chunks_fit_the_step_budget_and_decoding_sequences_always_run():
    batch = ServingBatch(8, KVPool(1000), FakeCache)
    batch.submit(sequence(0, 3, 4))
    batch.admit()
    plan = batch.plan_step(4)
    assert [(s.request_id, tokens) for s, tokens in plan] == [(0, [1, 2, 3])]
    assert plan[0][0].ran(3) and plan[0][0].accept(9) is None
    batch.submit(sequence(1, 10, 4))
    batch.submit(sequence(2, 2, 4))
    batch.admit()
    plan = [(s.request_id, tokens) for s, tokens in batch.plan_step(4)]
    assert plan == [(0, [9]), (1, [1, 2, 3, 4])]  # 2's prompt does not fit this step's budget of 4
    one = batch.running[1]
    assert not one.ran(4) and one.next_tokens(4) == [5, 6, 7, 8]
    plan = [(s.request_id, tokens) for s, tokens in batch.plan_step(4)]
    assert plan == [(0, [9]), (1, [5, 6, 7, 8])]
    assert not one.ran(4) and one.next_tokens(4) == [9, 10]
    plan = [(s.request_id, tokens) for s, tokens in batch.plan_step(4)]
    assert plan == [(0, [9]), (1, [9, 10]), (2, [1, 2])]


def test_stop_rules_are_generates():
    eos = sequence(0, 2, 5)
    eos.kv_cache = FakeCache(7)
    assert eos.accept(5) is None and eos.accept(2) == "end_of_generation"
    counted = sequence(1, 2, 2)
    counted.kv_cache = FakeCache(4)
    assert counted.accept(5) is None and counted.accept(6) == "max_tokens"
    full = sequence(2, 2, 10, capacity=3)
    full.kv_cache = FakeCache(3)
    full.kv_cache.length = 3
    assert full.accept(5) == "context"


def test_cancellation_frees_a_waiting_sequence_at_once_and_a_running_one_at_the_step():
    pool = KVPool(100)
    batch = ServingBatch(1, pool, FakeCache)
    batch.submit(sequence(0, 3, 3))
    batch.submit(sequence(1, 3, 3))
    batch.admit()
    assert batch.cancel(1, "client disconnected").request_id == 1 and batch.num_waiting == 0
    assert batch.cancel(0, "stop string") is None
    assert [s.request_id for s in batch.cancelled()] == [0]
    batch.finish(batch.running[0])
    assert pool.num_used == 0 and batch.is_idle


def test_a_real_kv_cache_is_sized_to_the_sequence():
    hparams = HParams("llama", None, 64, 32, 2, 4, 2, 8, 1e-5, 1e4, 8, 1.0, 8, 2, 0.0, 0)  # type: ignore[arg-type]
    batch = ServingBatch(2, KVPool(100), lambda capacity: KVCache(hparams, capacity))
    batch.submit(sequence(0, 5, 7))
    (admitted,) = batch.admit()
    assert admitted.kv_cache.capacity == 12 and admitted.kv_cache.keys.shape == (2, 12, 2, 8)
    with pytest.raises(RuntimeError):
        KVPool(3).allocate(4)
