"""A Markov predictor over the stream of routing decisions (2nd order, 1st-order fallback).

The stream is the router's decisions in order: one per token over the flat pool, or one per layer
per token (`layered`); expert ids are global store ids, so transitions between layers are learnt
as transitions between their ids. After each decision D_t (a set of k experts) the model counts,
for every b in D_t, the 1st-order transitions a -> b for a in D_{t-1} and the 2nd-order ones
(a2, a1) -> b for a2 in D_{t-2}, a1 in D_{t-1} (k^2 and k^3 updates: the "observations").

Prediction of D_{t+1}: each candidate b scores the sum over the current context of the
Laplace-smoothed probability P(b | context), using the 2nd-order context when it has been seen at
least `min_second_order_count` times, else the 1st-order one. `predict(fanout, depth)` returns the
best `fanout` experts not in D_t for the next decision; with depth > 1 it chains: the predicted
top-k set becomes the context of the next step, and hints of later steps are scored lower.
"""

from __future__ import annotations

from collections import defaultdict, deque
from itertools import product


class MarkovPredictor:
    def __init__(self, num_experts: int, top_k: int, *, smoothing: float = 1.0, min_second_order_count: int = 2):
        self.num_experts = num_experts
        self.top_k = top_k
        self.smoothing = smoothing
        self.min_second_order_count = min_second_order_count
        self.first: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.first_totals: dict[int, int] = defaultdict(int)
        self.second: dict[tuple[int, int], dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.second_totals: dict[tuple[int, int], int] = defaultdict(int)
        self.history: deque[tuple[int, ...]] = deque(maxlen=2)
        self.observations = 0

    def observe(self, experts: list[int]) -> None:
        """Learn from the next decision of the stream."""
        current = tuple(experts)
        if self.history:
            for a, b in product(self.history[-1], current):
                self.first[a][b] += 1
                self.first_totals[a] += 1
                self.observations += 1
        if len(self.history) == 2:
            for a2, a1, b in product(self.history[0], self.history[1], current):
                self.second[(a2, a1)][b] += 1
                self.second_totals[(a2, a1)] += 1
        self.history.append(current)

    def _scores(self, before: tuple[int, ...] | None, last: tuple[int, ...]) -> dict[int, float]:
        scores: dict[int, float] = defaultdict(float)
        denominator_extra = self.smoothing * self.num_experts
        for a1 in last:
            contexts = []
            if before is not None:
                contexts = [(a2, a1) for a2 in before if self.second_totals.get((a2, a1), 0) >= self.min_second_order_count]
            if contexts:
                for context in contexts:
                    total = self.second_totals[context] + denominator_extra
                    for b, count in self.second[context].items():
                        scores[b] += (count + self.smoothing) / total / len(contexts)
            elif self.first_totals.get(a1, 0):
                total = self.first_totals[a1] + denominator_extra
                for b, count in self.first[a1].items():
                    scores[b] += (count + self.smoothing) / total
        return scores

    def predict(self, fanout: int, depth: int = 1) -> list[tuple[int, float]]:
        """Up to `fanout` (expert, score) hints per step for the next `depth` decisions, best first."""
        if not self.history:
            return []
        before = self.history[0] if len(self.history) == 2 else None
        last = self.history[-1]
        hints: dict[int, float] = {}
        for step in range(depth):
            scores = self._scores(before, last)
            ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
            weight = 1.0 / (step + 1)
            chosen = [(b, s) for b, s in ranked if b not in last and b not in hints][:fanout]
            for b, s in chosen:
                hints[b] = s * weight / max(len(last), 1)
            predicted = tuple(b for b, _ in ranked[: self.top_k])
            if not predicted:
                break
            before, last = last, predicted
        return sorted(hints.items(), key=lambda item: (-item[1], item[0]))
