"""The prefetch governor (`mer.cache.governor`): shadow precision, admission against the disk's load,
staleness; and on an i.i.d. uniform stream vs a fixed cycle with the real Markov predictor."""

from __future__ import annotations

import random

import pytest

from mer.cache.governor import PrefetchGovernor
from mer.errors import ConfigError
from mer.predict.markov import MarkovPredictor


def test_shadow_precision_resolves_hints_against_the_foreground():
    governor = PrefetchGovernor(0.1, window=4, horizon=1)
    assert governor.precision("markov", 0) == 0.5  # nothing resolved yet
    governor.noted("markov", 0, expert_id=7, token=3)
    governor.noted("markov", 1, expert_id=8, token=3)
    governor.noted("markov", 0, expert_id=9, token=3)
    governor.demanded([7, 1], token=4)  # within the horizon: 7 was useful; 8 and 9 still open
    assert governor.precision("markov", 0) == 2 / 3  # (1 + 1) / (1 + 2)
    governor.demanded([9], token=5)  # 9 came too late: token 5 > 3 + 1, so both open hints expire useless
    assert governor.precision("markov", 0) == 2 / 4  # outcomes [True, False]
    assert governor.precision("markov", 1) == 1 / 3  # outcomes [False]
    assert governor.resolved == {"useful": 1, "useless": 2}
    for token in range(6, 12):  # window 4: only the last four outcomes of a bucket count
        governor.noted("markov", 0, expert_id=20 + token, token=token)
        governor.demanded([20 + token], token=token)
    assert governor.precision("markov", 0) == 5 / 6
    assert governor.precision("affinity", 0) == 0.5  # buckets are per predictor ...
    governor.noted("markov", 9, expert_id=1, token=12)
    governor.demanded([1], token=12)
    assert governor.precision("markov", 3) == governor.precision("markov", 7) == 2 / 3  # ... ranks >= 3 share one


def test_admission_weighs_precision_against_reads_pending():
    governor = PrefetchGovernor(0.2, horizon=0)
    for token in range(8):  # rank 0 always comes true, rank 1 never
        governor.noted("markov", 0, expert_id=token, token=token)
        governor.noted("markov", 1, expert_id=100 + token, token=token)
        governor.demanded([token], token=token)
    governor.expire(9)
    assert governor.precision("markov", 0) == 0.9 and governor.precision("markov", 1) == 0.1
    assert governor.admits("markov", 0, reads_pending=3)  # 0.9 >= 0.2 x 4
    assert not governor.admits("markov", 0, reads_pending=4)  # 0.9 < 0.2 x 5
    assert not governor.admits("markov", 1, reads_pending=0)  # 0.1 < 0.2
    assert PrefetchGovernor(0.0).admits("other", 5, reads_pending=100)  # threshold 0: everything
    with pytest.raises(ConfigError, match="governor_threshold"):
        PrefetchGovernor(-1.0)


def test_staleness_follows_the_pipeline_depth():
    assert not PrefetchGovernor.is_stale(4, 4, 1)
    assert PrefetchGovernor.is_stale(4, 5, 1)
    assert not PrefetchGovernor.is_stale(4, 5, 2) and PrefetchGovernor.is_stale(4, 6, 2)


def admitted_share(decisions: list[list[int]], num_experts: int) -> float:
    """Share of the Markov predictor's hints the governor (threshold 0.3, idle disk) admits, on a
    cache that holds only the current decision (so every hint is for an expert that is not resident)."""
    model, governor = MarkovPredictor(num_experts, 2), PrefetchGovernor(0.3, horizon=1)
    hints_seen = admitted = 0
    for token, decision in enumerate(decisions):
        governor.demanded(decision, token)
        model.observe(decision)
        for rank, (expert, _) in enumerate(model.predict(2)):
            governor.noted("markov", rank, expert, token)
            hints_seen += 1
            admitted += governor.admits("markov", rank, reads_pending=0)
    return admitted / hints_seen


def test_uniform_routing_is_dropped_and_a_cycle_is_admitted():
    rng = random.Random(7)
    uniform = [rng.sample(range(16), 2) for _ in range(400)]
    assert admitted_share(uniform, 16) <= 0.05  # nearly every hint of an unpredictable stream dropped
    cycle = [[0, 1], [2, 3], [4, 5], [6, 7]] * 100
    assert admitted_share(cycle, 16) >= 0.95


def test_admission_finds_only_stale_unjoined_prefetches():
    from mer.cache.admission import PrefetchAdmission
    from mer.cache.slot_table import SlotTable

    admission = PrefetchAdmission(SlotTable(4), PrefetchGovernor(0.05), limit=8, depth=1)
    queued = []
    for expert, hint_token in ((10, 3), (11, 4), (12, 3)):  # 12 is requested by the acquire below
        assignment = admission.admit("markov", 0, expert, hint_token, hint_token, 0, 0)
        queued.append((assignment.slot, hint_token))
    stale = admission.stale_slots(4, [12, 13], queued)
    assert stale == [queued[0][0]]  # 10; 11 was hinted at token 4 (not stale), 12 is joined
    admission.cancelled_read(stale[0])
    markov = admission.ledger.reports()[0]
    assert admission.counts().cancelled == 1 and (markov.name, markov.counters.cancelled) == ("markov", 1)
    admission.governor = PrefetchGovernor(0.0)  # governor off: nothing is stale
    assert admission.stale_slots(9, [13], queued) == []
