"""`mer.model.gating` against a plain float64 numpy reference written from llama.cpp's `build_moe_ffn` steps
(scores, selection bias, grouped top-k by the sum of each group's two best, top-k, weights from the
unbiased scores, normalisation, scale), for every routing function, on random logits."""

from __future__ import annotations

import numpy as np
import pytest

from mer.errors import ShapeError
from mer.model.gating import RoutingFunction, route, selection_scores

RNG = np.random.default_rng(7)


def reference_routing(function: RoutingFunction, logits: np.ndarray, top_k: int, bias: np.ndarray | None):
    experts, weights = [], []
    for row in logits.astype(np.float64):
        if function.score == "softmax":
            scores = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        elif function.score == "sigmoid":
            scores = 1 / (1 + np.exp(-row))
        else:
            scores = row
        selection = scores + (0 if bias is None else bias)
        eligible = set(range(len(row)))
        if function.groups > 1:
            size = len(row) // function.groups
            group_score = {g: sum(sorted(selection[g * size:(g + 1) * size])[-2:]) for g in range(function.groups)}
            kept = sorted(group_score, key=lambda g: -group_score[g])[:function.groups_used]
            eligible = {e for e in eligible if e // size in kept}
        chosen = sorted(eligible, key=lambda e: -selection[e])[:top_k]
        w = np.array([scores[e] for e in chosen])
        if function.score == "softmax_weight":
            w = np.exp(w - w.max()) / np.exp(w - w.max()).sum()
        if function.normalize:
            w = w / w.sum()
        if function.scale not in (0.0, 1.0):
            w = w * function.scale
        experts.append(chosen)
        weights.append(w)
    return np.array(experts), np.array(weights)


FUNCTIONS = {
    "mixtral": (RoutingFunction("softmax", True), False),
    "olmoe": (RoutingFunction("softmax", False), False),
    "v2-lite": (RoutingFunction("softmax", False, 1.5), False),
    "gpt-oss": (RoutingFunction("softmax_weight"), False),
    "v3": (RoutingFunction("sigmoid", True, 2.5, groups=4, groups_used=2), True),
    "v3-one-group-used": (RoutingFunction("sigmoid", True, 2.5, groups=8, groups_used=1), True),
    "sigmoid-ungrouped": (RoutingFunction("sigmoid", True, 1.0), True),
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_routing_equals_the_plain_numpy_reference(name):
    function, biased = FUNCTIONS[name]
    logits = RNG.standard_normal((50, 16)).astype(np.float32)
    bias = (RNG.standard_normal(16) * 0.3).astype(np.float32) if biased else None
    top_k = 2 if function.groups_used == 1 and function.groups > 1 else 4
    routing = route(function, logits, top_k, bias)
    experts, weights = reference_routing(function, logits, top_k, bias)
    assert np.array_equal(routing.experts, experts)
    np.testing.assert_allclose(routing.weights, weights, rtol=1e-6)


def test_the_selection_bias_chooses_but_never_weighs():
    function = RoutingFunction("sigmoid", False)
    logits = np.zeros((1, 4), np.float32)
    routing = route(function, logits, 1, np.array([0, 0, 1, 0], np.float32))
    assert routing.experts.tolist() == [[2]] and routing.weights.tolist() == [[0.5]]


def test_groups_left_out_are_minus_infinity_and_bad_groupings_are_refused():
    selection = selection_scores(RoutingFunction("sigmoid", groups=2, groups_used=1),
                                 np.array([[0.9, 0.1, 0.5, 0.6]], np.float32))
    # group scores 0.9 + 0.1 < 0.5 + 0.6: the group holding the best expert is left out
    assert selection[0, :2].tolist() == [-np.inf, -np.inf] and selection[0, 2:].tolist() == pytest.approx([0.5, 0.6])
    with pytest.raises(ShapeError, match="cannot be split into 3 groups"):
        selection_scores(RoutingFunction("sigmoid", groups=3, groups_used=1), np.zeros((1, 4), np.float32))
