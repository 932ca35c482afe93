"""The prefetch governor (`mer.cache.governor`): recent accuracy, admission against the disk's load,
staleness; and on an i.i.d. uniform stream vs a fixed cycle with the real Markov predictor."""

from __future__ import annotations

import random

import pytest

from mer.cache.governor import PrefetchGovernor
from mer.errors import ConfigError
from mer.predict.accuracy import AccuracyTracker
from mer.predict.markov import MarkovPredictor


def test_recent_accuracy_is_smoothed_over_the_last_reports():
    governor = PrefetchGovernor(0.1, window=2)
    assert governor.recent_accuracy("markov") == 0.5  # no report yet
    governor.reported("markov", {"topk_found": 2, "topk_observed": 2})
    assert governor.recent_accuracy("markov") == 3 / 4  # (2 + 1) / (2 + 2)
    governor.reported("markov", {"topk_found": 2, "topk_observed": 4})
    governor.reported("markov", {"topk_found": 2, "topk_observed": 6})  # window 2: from the first report on
    assert governor.recent_accuracy("markov") == 1 / 6  # (0 + 1) / (4 + 2)
    governor.reported("markov", {"predictions": 3})  # no top-k counters: ignored
    assert governor.recent_accuracy("markov") == 1 / 6


def test_admission_weighs_usefulness_against_reads_pending():
    governor = PrefetchGovernor(0.1)
    governor.reported("markov", {"topk_found": 8, "topk_observed": 8})  # accuracy 0.9
    assert governor.usefulness("markov", 0.5) == pytest.approx(0.45)
    assert governor.admits("markov", 0.5, reads_pending=0)
    assert governor.admits("markov", 0.5, reads_pending=3)  # 0.45 >= 0.4
    assert not governor.admits("markov", 0.5, reads_pending=4)  # 0.45 < 0.5
    assert PrefetchGovernor(0.0).admits("other", 0.0, reads_pending=100)  # threshold 0: everything
    with pytest.raises(ConfigError, match="governor_threshold"):
        PrefetchGovernor(-1.0)


def test_staleness_follows_the_pipeline_depth():
    assert not PrefetchGovernor.is_stale(4, 4, 1)
    assert PrefetchGovernor.is_stale(4, 5, 1)
    assert not PrefetchGovernor.is_stale(4, 5, 2) and PrefetchGovernor.is_stale(4, 6, 2)


def admitted_share(decisions: list[list[int]], num_experts: int) -> float:
    """Share of the Markov predictor's hints the governor (threshold 0.05, idle disk) admits."""
    model, tracker, governor = MarkovPredictor(num_experts, 2), AccuracyTracker(), PrefetchGovernor(0.05)
    hints_seen = admitted = 0
    for decision in decisions:
        if tracker.observe(decision):
            governor.reported("markov", tracker.as_dict("markov"))
        model.observe(decision)
        hints = model.predict(2)
        tracker.hinted("markov", [expert for expert, _ in hints])
        hints_seen += len(hints)
        admitted += sum(governor.admits("markov", score, reads_pending=0) for _, score in hints)
    return admitted / hints_seen


def test_uniform_routing_is_dropped_and_a_cycle_is_admitted():
    rng = random.Random(7)
    uniform = [rng.sample(range(16), 2) for _ in range(400)]
    assert admitted_share(uniform, 16) <= 0.05  # nearly every hint of an unpredictable stream dropped
    cycle = [[0, 1], [2, 3], [4, 5], [6, 7]] * 100
    assert admitted_share(cycle, 16) >= 0.95


class QueuedReader:
    """A reader stand-in: every future it was given is still queued, so `cancel` succeeds once."""

    def __init__(self):
        self.cancelled = []

    def cancel(self, future) -> bool:
        if future in self.cancelled:
            return False
        self.cancelled.append(future)
        return True


def test_io_worker_cancels_only_stale_unjoined_prefetches():
    from types import SimpleNamespace

    from mer.cache.prefetch_ledger import PrefetchLedger
    from mer.cache.slot_table import SlotTable
    from mer.protocol import Acquire
    from workers.io_worker import IoWorker, Load

    worker = object.__new__(IoWorker)
    worker.context = SimpleNamespace(config=SimpleNamespace(pipeline_depth=1))
    worker.governor = PrefetchGovernor(0.05)
    worker.table, worker.ledger, worker.reader = SlotTable(4), PrefetchLedger(), QueuedReader()
    worker.prefetch = {"issued": 0, "completed": 0, "dropped": 0, "cancelled": 0}
    worker.loads = {}
    for expert, hint_token in ((10, 3), (11, 4), (12, 3)):  # 12 is requested by the acquire below
        assignment = worker.table.assign_prefetch(expert, hint_token)
        worker.ledger.issued("markov", assignment.slot)
        worker.loads[assignment.slot] = Load(None, f"read-{expert}", "prefetch", hint_token)
    worker._cancel_stale_prefetches(Acquire(1, 4, [12, 13], True))
    assert worker.reader.cancelled == ["read-10"]  # 11 was hinted at token 4 (not stale), 12 is joined
    assert worker.prefetch["cancelled"] == 1 and worker.ledger.as_dict()["markov"]["cancelled"] == 1
    worker.governor = PrefetchGovernor(0.0)  # governor off: nothing is cancelled
    worker._cancel_stale_prefetches(Acquire(2, 9, [13], True))
    assert worker.reader.cancelled == ["read-10"]
