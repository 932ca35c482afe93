"""A co-activation affinity predictor: experts that fire together, per layer, with decayed counts.

Per layer, every observed decision adds 1 to the count of each ordered pair (a, b), a != b, of its
experts, after every count of that layer was multiplied by `decay` (0 < decay <= 1; recent
decisions weigh more). Prediction for a layer: the context is that layer's most recent decision;
candidate b scores sum over a in the context of count(a, b) / total(a) (total(a) = the sum of a's
row), divided by the context size, so scores lie in 0..1. The next `depth` layers follow the current
one in the order observed (cyclically; the flat pool is layer 0), `fanout` hints per step, the
current decision's experts left out, later steps weighted 1/(step+1), ties by expert id.
Decay is applied lazily: increments grow by 1/decay per observation and reads divide by the same
scale, so an observation costs O(k^2), not O(experts^2).
"""

from __future__ import annotations

from collections import defaultdict
from itertools import permutations

from mer.errors import ConfigError
from mer.predict.locality import next_layer_hints

_RESCALE_ABOVE = 1e150


class _LayerAffinity:
    def __init__(self) -> None:
        self.scale = 1.0  # the current weight of one co-activation (grows by 1/decay per decision)
        self.pairs: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.totals: dict[int, float] = defaultdict(float)
        self.last: tuple[int, ...] = ()

    def add(self, experts: tuple[int, ...], decay: float) -> None:
        self.scale /= decay
        for a, b in permutations(experts, 2):
            self.pairs[a][b] += self.scale
            self.totals[a] += self.scale
        self.last = experts
        if self.scale > _RESCALE_ABOVE:
            self._rescale()

    def _rescale(self) -> None:
        for row in self.pairs.values():
            for b in row:
                row[b] /= self.scale
        for a in self.totals:
            self.totals[a] /= self.scale
        self.scale = 1.0

    def scores(self) -> dict[int, float]:
        scores: dict[int, float] = defaultdict(float)
        context = [a for a in self.last if self.totals.get(a, 0.0) > 0]
        for a in context:
            for b, count in self.pairs[a].items():
                scores[b] += count / self.totals[a] / len(self.last)
        return scores


class AffinityPredictor:
    def __init__(self, *, decay: float = 0.95):
        if not 0.0 < decay <= 1.0:
            raise ConfigError(f"affinity decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.layers: dict[int, _LayerAffinity] = {}
        self.current: tuple[int, tuple[int, ...]] | None = None

    def observe(self, layer: int, experts: list[int]) -> None:
        decision = tuple(dict.fromkeys(experts))
        self.layers.setdefault(layer, _LayerAffinity()).add(decision, self.decay)
        self.current = (layer, decision)

    def affinity(self, layer: int, a: int, b: int) -> float:
        """The decayed co-activation count of (a, b) in `layer`, in units of the latest decision's weight."""
        state = self.layers.get(layer)
        return state.pairs[a][b] / state.scale if state and a in state.pairs else 0.0

    def predict(self, fanout: int, depth: int = 1) -> list[tuple[int, float]]:
        """Up to `fanout` (expert, score) hints per step for the next `depth` decisions, best first."""
        return next_layer_hints(self.current, self.layers, lambda layer: self.layers[layer].scores(), fanout, depth)
