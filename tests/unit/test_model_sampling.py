"""Greedy and sampled token choice: determinism per seed, and the top-k / top-p cuts."""

from __future__ import annotations

import numpy as np
import pytest

from mer.errors import ConfigError
from mer.model.sampling import Sampler

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.5, 3.0, 2.0, 0.0], dtype=np.float32)


def test_temperature_zero_is_greedy_with_ties_to_the_lowest_id():
    sampler = Sampler(temperature=0.0, top_k=3, top_p=0.5, seed=1)
    assert sampler.is_greedy and [sampler.sample(LOGITS) for _ in range(5)] == [1] * 5


def test_same_seed_same_tokens_and_another_seed_differs():
    first = Sampler(temperature=1.5, seed=42)
    again = Sampler(temperature=1.5, seed=42)
    other = Sampler(temperature=1.5, seed=43)
    sequence = [first.sample(LOGITS) for _ in range(50)]
    assert sequence == [again.sample(LOGITS) for _ in range(50)]
    assert sequence != [other.sample(LOGITS) for _ in range(50)]


def test_frequencies_follow_the_tempered_softmax():
    sampler = Sampler(temperature=2.0, seed=7)
    counts = np.bincount([sampler.sample(LOGITS) for _ in range(20000)], minlength=LOGITS.size)
    expected = np.exp(LOGITS / 2.0) / np.exp(LOGITS / 2.0).sum()
    assert np.allclose(counts / counts.sum(), expected, atol=0.015)
    assert np.allclose(sampler.probabilities(LOGITS), expected, rtol=1e-6)


def test_top_k_and_top_p_cut_the_support():
    top_k = Sampler(temperature=1.0, top_k=3, seed=0)
    assert set(np.nonzero(top_k.probabilities(LOGITS))[0]) == {1, 2, 5}
    assert {top_k.sample(LOGITS) for _ in range(300)} == {1, 2, 5}
    top_p = Sampler(temperature=1.0, top_p=0.5, seed=0)
    probabilities = np.exp(LOGITS - LOGITS.max()) / np.exp(LOGITS - LOGITS.max()).sum()
    kept = np.nonzero(top_p.probabilities(LOGITS))[0]
    assert set(kept) == {1, 5}  # 0.27 + 0.27 >= 0.5: the two most likely tokens
    assert probabilities[[1, 5]].sum() >= 0.5 and probabilities[1] < 0.5
    assert np.isclose(top_p.probabilities(LOGITS).sum(), 1.0)


@pytest.mark.parametrize("options, message", [
    ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
])
def test_bad_settings_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        Sampler(**options)
