"""Router gating, expert-major grouping and the gate-weighted sum, against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest

from mer.errors import ShapeError
from mer.model.moe import Routing, combine_experts, expert_batches, group_by_expert, route_tokens, softmax

RNG = np.random.default_rng(5)


def float64_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def test_renormalised_top_k_equals_softmax_over_the_top_k_logits():
    """Mixtral: softmax over all, top-k, renormalise == top-k of the logits, then softmax over k."""
    logits = RNG.standard_normal((50, 8)).astype(np.float32) * 3
    routing = route_tokens(logits, top_k=2, normalize=True)
    top = np.argsort(-logits.astype(np.float64), axis=1)[:, :2]
    assert np.array_equal(routing.experts, top)
    expected = float64_softmax(np.take_along_axis(logits.astype(np.float64), top, axis=1))
    assert np.allclose(routing.weights, expected, rtol=1e-6, atol=0)
    assert np.all(routing.weights[:, 0] >= routing.weights[:, 1])


def test_olmoe_gating_keeps_the_softmax_probabilities():
    logits = RNG.standard_normal((20, 16)).astype(np.float32)
    routing = route_tokens(logits, top_k=4, normalize=False)
    probabilities = float64_softmax(logits.astype(np.float64))
    expected = np.take_along_axis(probabilities, routing.experts, axis=1)
    assert np.allclose(routing.weights, expected, rtol=1e-6, atol=0)
    assert np.all(routing.weights.sum(axis=1) < 1)
    assert np.array_equal(routing.experts, np.argsort(-probabilities, axis=1)[:, :4])


def test_weight_scale_and_sum_floor():
    logits = np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    scaled = route_tokens(logits, top_k=2, normalize=True, scale=2.5)
    assert np.allclose(scaled.weights.sum(), 2.5, rtol=1e-6)
    assert np.array_equal(route_tokens(logits, 2, True, scale=1.0).weights, route_tokens(logits, 2, True).weights)
    tiny = route_tokens(np.array([[0.0, -200.0, -200.0]], dtype=np.float32), top_k=2, normalize=True)
    assert tiny.experts[0, 0] == 0 and np.all(np.isfinite(tiny.weights))
    with pytest.raises(ShapeError, match="top_k 5 must be in 1..4"):
        route_tokens(logits, top_k=5, normalize=True)


def test_softmax_matches_float64():
    logits = RNG.standard_normal((7, 33)).astype(np.float32) * 10
    assert np.allclose(softmax(logits), float64_softmax(logits.astype(np.float64)), rtol=1e-6, atol=1e-9)


def test_grouping_and_combination_equal_the_per_token_sum():
    experts = np.array([[2, 0], [0, 1], [2, 1], [3, 2]])
    weights = np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]], dtype=np.float32)
    routing = Routing(experts, weights)
    groups = group_by_expert(routing)
    assert list(groups) == [0, 1, 2, 3]
    assert {expert: tokens.tolist() for expert, tokens in groups.items()} == {0: [0, 1], 1: [1, 2], 2: [0, 2, 3], 3: [3]}
    hidden = RNG.standard_normal((4, 6)).astype(np.float32)
    batches = expert_batches(hidden, groups)
    assert np.array_equal(batches[2], hidden[[0, 2, 3]])
    matrices = {expert: RNG.standard_normal((6, 6)).astype(np.float32) for expert in groups}
    outputs = {expert: batch @ matrices[expert] for expert, batch in batches.items()}
    combined = combine_experts(routing, groups, outputs, d_model=6)
    expected = np.stack([sum(weights[t, j] * (hidden[t] @ matrices[experts[t, j]]) for j in range(2)) for t in range(4)])
    assert np.allclose(combined, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ShapeError, match="expert 3: output of shape"):
        combine_experts(routing, groups, {**outputs, 3: np.zeros((2, 6), np.float32)}, d_model=6)
