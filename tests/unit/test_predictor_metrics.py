"""Per-predictor metrics: hint accuracy (`mer.predict.accuracy`), the I/O worker's prefetch ledger
(`mer.cache.prefetch_ledger`) driven by a real `SlotTable`, and their way into the run summary."""

from __future__ import annotations

import json

import pytest

from mer.cache.admission import PrefetchAdmission
from mer.cache.governor import PrefetchGovernor
from mer.cache.prefetch_ledger import PrefetchLedger
from mer.cache.slot_table import AcquireKind, SlotTable
from mer.errors import EventLogError
from mer.predict.accuracy import AccuracyTracker, HintAccuracy
from mer.protocol import PredictorStats
from mer.metrics.events import PredictorCounters, PrefetchCounters, ReadRecord, RunInfo, TokenRecord
from mer.metrics.summary import RunSummary, format_seed_block, summarize_log_events

INFO = RunInfo(16, 2, 4, 6, 256, 512, 221184, "q4_0", 1, "uring")


def test_hint_accuracy_counts_top1_and_topk_exactly():
    accuracy = HintAccuracy()
    accuracy.score([3, 5, 7], [5, 3])  # top-1 hit; top-2 {3, 5} finds both
    accuracy.score([4, 1], [1, 2])  # top-1 miss; top-2 {4, 1} finds 1 of 2
    accuracy.score([], [1, 2])  # no hints: not scored
    accuracy.score([6, 7, 2], [2, 0])  # top-1 miss; top-2 {6, 7} finds none (2 is third)
    assert (accuracy.predictions, accuracy.top1_hits, accuracy.topk_found, accuracy.topk_observed) == (3, 1, 3, 6)
    assert accuracy.top1_accuracy_pct == pytest.approx(100 / 3)
    assert accuracy.topk_accuracy_pct == 50.0


def test_tracker_scores_previous_hints_against_the_next_decision_only():
    tracker = AccuracyTracker()
    assert tracker.observe([0, 1]) == []  # nothing hinted yet
    tracker.hinted("markov", [2, 3])
    tracker.hinted("other", [0, 9])
    assert sorted(tracker.observe([2, 3])) == ["markov", "other"]
    assert tracker.observe([2, 3]) == []  # hints are scored once
    assert tracker.report("markov") == PredictorStats("markov", 1, 1, 2, 2, [])  # top-1 and top-k 100%
    assert tracker.report("other") == PredictorStats("other", 1, 0, 0, 2, [])


def test_a_fixed_cycle_is_predicted_perfectly_after_warm_up():
    from mer.predict.markov import MarkovPredictor

    cycle = [[0, 1], [2, 3], [4, 5], [6, 7]]
    model, tracker = MarkovPredictor(8, 2), AccuracyTracker()
    for step in range(40):
        decision = cycle[step % 4]
        tracker.observe(decision)
        model.observe(decision)
        tracker.hinted("markov", [expert for expert, _ in model.predict(2)])
    scores = tracker.scores["markov"]
    # hints exist once a transition out of the current pair was seen: after the 5th decision (the
    # cycle's 1st pair again); every later one is right, so 35 scored predictions, all hits
    assert (scores.predictions, scores.top1_hits, scores.topk_found, scores.topk_observed) == (35, 35, 70, 70)


class Ledgered:
    """A SlotTable driven the way the I/O worker drives it: through `PrefetchAdmission`, governor off."""

    def __init__(self, slots: int):
        self.table = SlotTable(slots)
        self.admission = PrefetchAdmission(self.table, PrefetchGovernor(0.0), limit=100, depth=1)
        self.ledger = self.admission.ledger

    def prefetch(self, source: str, expert: int, token: int) -> int | None:
        self.ledger.hinted(source)
        assignment = self.admission.admit(source, 0, expert, token, token, prefetches_in_flight=0, reads_pending=0)
        return None if assignment is None else assignment.slot

    def finish(self, slot: int, ok: bool = True) -> None:
        info = self.table.slot_info(slot)
        self.table.finish_load(slot, info.generation, ok=ok)
        self.admission.finished(slot, ok)

    def use(self, expert: int, token: int) -> int:
        """Acquire + (finish if it started a read) + release; returns the slot."""
        result = self.table.acquire(expert, token)
        assert result.kind is not AcquireKind.NO_SLOT
        self.admission.acquired(result)
        if result.kind is AcquireKind.MISS_ASSIGNED:
            self.table.finish_load(result.slot, result.generation, ok=True)
        self.table.release(result.slot, result.generation)
        return result.slot

    def counts(self) -> dict[str, dict[str, int]]:
        """The prefetch counters of each predictor (its accuracy counters must still be 0)."""
        reports = self.ledger.reports()
        for report in reports:
            assert report.counters[7:] == (0, 0, 0, 0) and report.per_layer == []
        return {report.name: {key: report.counters._asdict()[key] for key in PREFETCH_FIELDS} for report in reports}


PREFETCH_FIELDS = ("hints", "issued", "completed", "used", "wasted", "dropped", "cancelled")


def test_ledger_attributes_use_waste_drop_and_failure_to_the_hinting_predictor():
    run = Ledgered(3)
    a = run.prefetch("markov", 10, token=0)
    b = run.prefetch("locality", 11, token=0)
    c = run.prefetch("markov", 12, token=0)
    assert None not in (a, b, c)
    assert run.prefetch("markov", 13, token=0) is None  # all three slots are loading: dropped
    run.finish(a)
    run.finish(b)
    run.finish(c, ok=False)  # a failed read: neither completed, used nor wasted
    run.use(10, token=1)  # markov's prefetch of 10 used
    run.use(14, token=2)  # evicts a free/ready slot: c's slot is free after the failure
    run.use(15, token=3)  # must evict: LRU victim is locality's unused 11 -> wasted
    counts = run.counts()
    assert counts["markov"] == {"hints": 3, "issued": 2, "completed": 1, "used": 1, "wasted": 0, "dropped": 1,
                                "cancelled": 0}
    assert counts["locality"] == {"hints": 1, "issued": 1, "completed": 1, "used": 0, "wasted": 1, "dropped": 0,
                                  "cancelled": 0}
    assert run.table.counters.prefetch_used == 1 and run.table.counters.prefetch_wasted == 1


def test_ledger_counts_a_cancelled_prefetch_for_its_predictor_only():
    run = Ledgered(2)
    slot = run.prefetch("affinity", 5, token=0)
    run.admission.cancelled_read(slot)
    run.finish(slot, ok=False)  # the reader cancels the future: the read ends as failed
    run.use(5, token=1)  # a plain foreground miss now: no prefetch use
    assert run.admission.counts().cancelled == 1
    assert run.counts()["affinity"] == {"hints": 1, "issued": 1, "completed": 0, "used": 0, "wasted": 0,
                                                "dropped": 0, "cancelled": 1}


def test_ledger_merges_reported_accuracy_and_sorts_names():
    ledger = PrefetchLedger()
    ledger.hinted("markov", 4)
    ledger.reported(PredictorStats("affinity", 2, 1, 0, 0, []))
    reports = {report.name: report for report in ledger.reports()}
    assert [report.name for report in ledger.reports()] == ["affinity", "markov"]
    assert reports["affinity"].counters.top1_hits == 1 and reports["affinity"].counters.predictions == 2
    assert reports["markov"].counters.hints == 4 and reports["markov"].counters.predictions == 0


def run_events(predictors: dict | None) -> list[dict]:
    events = [{"event": "run_started", **INFO.to_event_fields()}]
    for token in range(2):
        record = TokenRecord(token, float(token), float(token) + 0.5, 500_000.0, 0.0, 100_000.0, 1, 1, 2, 0)
        events.append({"event": "token_done", **record.to_event_fields()})
    events.append({"event": "expert_read", **ReadRecord(1, 0, 1000, 50.0, "prefetch").to_event_fields()})
    stats = {"event": "prefetch_stats", **PrefetchCounters(3, 2, 1, 1, 0, 2).to_event_fields()}
    if predictors is not None:
        stats["predictors"] = predictors
    events.append(stats)
    return events


def test_summary_carries_predictors_with_accuracies_and_round_trips():
    predictors = {"markov": {"hints": 5, "issued": 3, "completed": 2, "used": 1, "wasted": 1, "dropped": 2,
                             "predictions": 4, "top1_hits": 1, "topk_found": 3, "topk_observed": 8}}
    summary = summarize_log_events(run_events(predictors))
    entry = summary.predictors["markov"]
    assert entry["top1_accuracy_pct"] == 25.0 and entry["topk_accuracy_pct"] == 37.5
    assert entry["hints"] == 5 and entry["dropped"] == 2
    data = json.loads(json.dumps(summary.to_json_dict()))
    assert list(data)[-1] == "predictors"
    assert RunSummary.from_json_dict(data) == summary
    assert format_seed_block(summary).splitlines()[-1] == (
        "predictor markov: hints=5 issued=3 completed=2 used=1 wasted=1 dropped=2 top1=25.0% topk=37.5% "
        "(over 4 predictions)")


def test_summary_without_predictors_keeps_its_old_shape():
    summary = summarize_log_events(run_events(None))
    assert summary.predictors == {}
    assert len(format_seed_block(summary).splitlines()) == 12
    old = {key: value for key, value in summary.to_json_dict().items() if key != "predictors"}
    assert RunSummary.from_json_dict(old) == summary


def test_missing_counters_are_zero_and_bad_ones_are_named():
    assert PredictorCounters.from_mapping({"hints": 2}, "x") == PredictorCounters(hints=2)
    with pytest.raises(EventLogError, match="'used'"):
        summarize_log_events(run_events({"markov": {"used": -1}}))
    with pytest.raises(EventLogError, match="predictor .markov.: predictor counters must be a mapping"):
        summarize_log_events(run_events({"markov": 3}))
