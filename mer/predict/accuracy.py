"""How well a predictor's hints match the routing decision that follows them (top-1 / top-k accuracy).

A predictor scores its own previous hints against the next decision it observes: after hints
H = (h_1, h_2, ...) (best first) and the next observed decision D (a set of k experts),
- top-1: a hit when h_1 is in D;
- top-k: |{h_1..h_k} ∩ D| experts found, out of |D| (k = the decision's size).
A prediction with no hints is not scored. Accuracies are percentages of the scored predictions
(top-1) and of the observed experts of the scored predictions (top-k); 0.0 before any score.

`AccuracyTracker` scores each predictor's latest hints against the next decision observed;
`LayerAccuracy` scores hints that name their target decision (the gate predictor's: token t, MoE
layer L+s) against exactly that decision, per target layer and distance s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields

from mer.protocol import PredictorStats
from mer.metrics.events import LayerHintCounts
from mer.metrics.stats import percent


@dataclass
class HintAccuracy:
    """Cumulative top-1 / top-k scores of one predictor's hints."""

    predictions: int = 0  # scored predictions (hints followed by an observed decision)
    top1_hits: int = 0
    topk_found: int = 0  # observed experts that were among the k best hints
    topk_observed: int = 0  # observed experts of the scored predictions (the top-k denominator)

    def score(self, hints: Sequence[int], observed: Iterable[int]) -> None:
        """Score `hints` (expert ids, best first) against the decision `observed` that followed them."""
        if not hints:
            return
        decision = set(observed)
        k = len(decision)
        self.predictions += 1
        self.top1_hits += hints[0] in decision
        self.topk_found += len(decision.intersection(hints[:k]))
        self.topk_observed += k

    @property
    def top1_accuracy_pct(self) -> float:
        return percent(self.top1_hits, self.predictions)

    @property
    def topk_accuracy_pct(self) -> float:
        return percent(self.topk_found, self.topk_observed)

    def weight(self) -> float:
        """The top-k accuracy so far, Laplace-smoothed: (found + 1) / (observed + 2), 0.5 at first."""
        return (self.topk_found + 1) / (self.topk_observed + 2)

    def report(self, source: str, per_layer: list[LayerHintCounts] | None = None) -> PredictorStats:
        """The counters as the `PredictorStats` message of predictor `source`."""
        return PredictorStats(source, self.predictions, self.top1_hits, self.topk_found, self.topk_observed,
                              per_layer or [])


class AccuracyTracker:
    """Top-1 / top-k accuracy per predictor name: remembers each one's last hints until the next decision."""

    def __init__(self) -> None:
        self.scores: dict[str, HintAccuracy] = {}
        self._pending: dict[str, list[int]] = {}

    def observe(self, observed: Iterable[int]) -> list[str]:
        """Score every predictor's pending hints against `observed`; returns the names scored."""
        decision = list(observed)
        scored = []
        for name, hints in self._pending.items():
            self.scores.setdefault(name, HintAccuracy()).score(hints, decision)
            scored.append(name)
        self._pending.clear()
        return scored

    def hinted(self, name: str, hints: Sequence[int]) -> None:
        """`name` just hinted `hints` (best first) for the next decision."""
        self.scores.setdefault(name, HintAccuracy())
        self._pending[name] = list(hints)

    def report(self, name: str) -> PredictorStats:
        """`name`'s counters as its `PredictorStats` message."""
        return self.scores.setdefault(name, HintAccuracy()).report(name)

    def weight(self, name: str) -> float:
        """`name`'s `HintAccuracy.weight`."""
        return self.scores.get(name, HintAccuracy()).weight()


@dataclass
class LayerHintAccuracy(HintAccuracy):
    """`HintAccuracy` of the hints for one target layer, plus the decision's experts found among all of
    them (`hinted_found`: a prefetch of any hinted expert serves, not only of the k best). Every
    prediction made for a decision is scored, also one that hinted nothing (all its experts below the
    gate's probability floor): it finds nothing."""

    hinted_found: int = 0

    def score(self, hints: Sequence[int], observed: Iterable[int]) -> None:
        decision = set(observed)
        self.hinted_found += len(decision.intersection(hints))
        if hints:
            super().score(hints, decision)
        else:
            self.predictions += 1
            self.topk_observed += len(decision)


class LayerAccuracy:
    """Hints scored against the very decision they were made for, per target layer and distance.

    For predictors whose hints name their target (the gate: hints for token t's MoE layer L+s made at
    layer L). `hinted(token, layer, ahead, hints)` remembers them until the decision of (token, layer)
    is observed; each (layer, ahead) is scored on its own. The totals (`report`, `weight`) are those
    of the next-layer hints (ahead = 1), the ones `AccuracyTracker` would score for the others.
    """

    def __init__(self) -> None:
        self.scores: dict[tuple[int, int], LayerHintAccuracy] = {}  # (target layer, ahead) -> scores
        self._pending: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}  # (token, layer) -> [(ahead, hints)]

    def hinted(self, token: int, layer: int, ahead: int, hints: Sequence[int]) -> None:
        self.scores.setdefault((layer, ahead), LayerHintAccuracy())
        self._pending.setdefault((token, layer), []).append((ahead, list(hints)))

    def observe(self, token: int, layer: int, observed: Iterable[int]) -> bool:
        """Score the hints made for the decision of (`token`, `layer`); True if there were any."""
        pending = self._pending.pop((token, layer), None)
        if not pending:
            return False
        decision = list(observed)
        for ahead, hints in pending:
            self.scores[(layer, ahead)].score(hints, decision)
        return True

    def totals(self) -> HintAccuracy:
        next_layer = [scores for (_, ahead), scores in self.scores.items() if ahead == 1]
        return HintAccuracy(*(sum(getattr(scores, counter.name) for scores in next_layer)
                              for counter in fields(HintAccuracy)))

    def report(self, source: str) -> PredictorStats:
        """The next-layer totals and the per-layer counters, as the `PredictorStats` of `source`."""
        per_layer = [LayerHintCounts(layer, ahead, *astuple(self.scores[(layer, ahead)]))
                     for ahead, layer in sorted((ahead, layer) for layer, ahead in self.scores)]
        return self.totals().report(source, per_layer)

    def weight(self) -> float:
        """The next-layer totals' `HintAccuracy.weight`."""
        return self.totals().weight()
