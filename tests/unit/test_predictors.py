"""The locality and affinity predictors, the fusion of hints and the `predictors` / `max_pinned`
configuration keys, on constructed routing sequences with hand-computed answers."""

from __future__ import annotations

import pytest

from mer.config import PipelineConfig
from mer.errors import ConfigError
from mer.predict.accuracy import AccuracyTracker, HintAccuracy
from mer.predict.affinity import AffinityPredictor
from mer.predict.fusion import GATE, PREDICTOR_NAMES, fuse, make_predictors
from mer.predict.locality import LocalityPredictor


def test_locality_window_frequencies_hints_and_bounded_pins():
    locality = LocalityPredictor(window=4, hot_fraction=0.5, max_pinned=2)
    assert locality.predict(2) == [] and locality.pinned() == []
    for decision in ([1, 2], [1, 3], [1, 2], [4, 5]):
        locality.observe(0, decision)
    assert locality.frequencies(0) == {1: 0.75, 2: 0.5, 3: 0.25, 4: 0.25, 5: 0.25}
    assert locality.predict(2) == [(1, 0.75), (2, 0.5)]  # the current 4, 5 left out
    assert locality.pinned() == [1, 2]
    locality.observe(0, [6, 7])  # [1, 2] leaves the window
    assert locality.frequencies(0)[1] == 0.5 and locality.frequencies(0)[2] == 0.25
    assert locality.predict(2) == [(1, 0.5), (2, 0.25)]  # ties among 2..5 go to the lowest id
    assert locality.pinned() == [1]


def test_locality_pins_never_exceed_max_pinned():
    locality = LocalityPredictor(window=2, hot_fraction=0.5, max_pinned=1)
    for decision in ([1, 2], [1, 2]):
        locality.observe(0, decision)
    assert locality.pinned() == [1]  # 1 and 2 are both always hot: one pin, the lowest id first
    assert LocalityPredictor(window=2, max_pinned=0).pinned() == []


def test_locality_layered_looks_at_the_next_layers():
    locality = LocalityPredictor(window=8)
    for layer, decision in ((0, [0, 1]), (1, [8, 9]), (0, [0, 2]), (1, [8, 10])):
        locality.observe(layer, decision)
    # next layer 0: expert 0 in both of its decisions; then layer 1 at weight 1/2, 8 and 10 are current
    assert locality.predict(1, depth=2) == [(0, 1.0), (9, 0.25)]


def test_affinity_decayed_counts_and_hints():
    affinity = AffinityPredictor(decay=0.5)
    affinity.observe(0, [1, 2])
    affinity.observe(0, [1, 3])
    assert affinity.affinity(0, 1, 3) == 1.0  # the latest decision weighs 1
    assert affinity.affinity(0, 1, 2) == 0.5  # one decision older: halved
    assert affinity.affinity(0, 2, 3) == 0.0
    # context (1, 3): 2 scores count(1,2) / total(1) / 2 = 2 / 6 / 2 in scaled units
    assert affinity.predict(4) == [(2, pytest.approx(1 / 6))]


def test_affinity_rescaling_keeps_the_ratios():
    affinity = AffinityPredictor(decay=0.01)
    for _ in range(200):  # scale passes 1e150 and is rescaled
        affinity.observe(0, [1, 2])
    affinity.observe(0, [1, 3])
    assert affinity.affinity(0, 1, 3) == pytest.approx(1.0)
    assert affinity.affinity(0, 1, 2) == pytest.approx(0.01 / (1 - 0.01), rel=1e-9)


def test_fusion_keeps_each_experts_best_score_and_its_source():
    ranked = {"markov": [(5, 0.8), (6, 0.4)], "locality": [(6, 0.5), (7, 0.25)], "affinity": []}
    assert fuse(ranked, 3) == [(5, 0.8, "markov"), (6, 0.5, "locality"), (7, 0.25, "locality")]
    assert fuse(ranked, 2) == [(5, 0.8, "markov"), (6, 0.5, "locality")]
    assert fuse({"affinity": [(5, 0.5), (2, 0.5)], "markov": [(5, 0.5)]}, 4) == [(2, 0.5, "affinity"),
                                                                              (5, 0.5, "markov")]  # ties


def test_fusion_ranks_by_score_times_weight_and_keeps_raw_scores():
    ranked = {"markov": [(5, 0.4)], "locality": [(6, 0.9), (5, 0.5)]}
    weights = {"markov": 0.75, "locality": 0.25}  # usefulness: 5 -> max(0.3, 0.125), 6 -> 0.225
    assert fuse(ranked, 2, weights) == [(5, 0.4, "markov"), (6, 0.9, "locality")]
    assert fuse(ranked, 2) == [(6, 0.9, "locality"), (5, 0.5, "locality")]  # no weights: 1 each


def test_tracker_weight_is_smoothed_topk_accuracy():
    tracker = AccuracyTracker()
    assert tracker.weight("markov") == 0.5
    tracker.hinted("markov", [1, 2])
    tracker.observe([1, 3])
    assert tracker.weight("markov") == 2 / 4  # (1 found + 1) / (2 observed + 2)


def test_fusion_of_one_predictor_passes_its_hints_through():
    hints = [(3, 0.3), (9, 0.2), (4, 0.1)]
    assert fuse({"markov": hints}, 2) == [(3, 0.3, "markov"), (9, 0.2, "markov")]
    assert fuse({"markov": []}, 2) == []


def test_every_predictor_learns_a_fixed_cycle_perfectly():
    cycle = [[0, 1], [2, 3], [4, 5], [6, 7]]
    for predictor in make_predictors(tuple(name for name in PREDICTOR_NAMES if name != GATE), 8, 2):
        if predictor.name == "affinity":
            continue  # co-activation in a layer does not predict the next decision of the flat pool
        accuracy, hints = HintAccuracy(), []
        for step in range(60):
            decision = cycle[step % 4]
            if step >= 40:
                accuracy.score(hints, decision)
            predictor.observe(0, decision)
            hints = [expert for expert, _ in predictor.predict(2, 1)]
        # locality: every expert is equally hot (1/4), so it hints the lowest two ids not in use:
        # right after (6, 7) and after (0, 1), wrong after (2, 3) and (4, 5)
        expected = 100.0 if predictor.name == "markov" else 50.0
        assert accuracy.predictions == 20 and accuracy.topk_accuracy_pct == expected, predictor.name


def test_config_keys_predictors_and_max_pinned():
    config = PipelineConfig(predictors="locality,markov", max_pinned=4, cache_slots=6, top_k=2)
    assert config.predictors == ("markov", "locality") and config.max_pinned == 4
    assert PipelineConfig().predictors == ("markov",) and PipelineConfig().max_pinned == 0
    with pytest.raises(ConfigError, match="unknown predictor 'lru'"):
        PipelineConfig(predictors="lru")
    with pytest.raises(ConfigError, match="max_pinned 5 .* cache_slots 6: use at most 4"):
        PipelineConfig(max_pinned=5, cache_slots=6, top_k=2)
