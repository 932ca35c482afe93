"""A locality / frequency predictor: the experts most active in a sliding window, per layer.

Per layer (the `layer` of each observed decision; the flat pool is layer 0) the predictor keeps the
last `window` decisions and how many of them used each expert; an expert's frequency is that count
over the decisions in the window (0..1). Prediction of the next `depth` decisions: the layers that
follow the current one in the order observed (cyclically; the same layer for the flat pool), each
ranked by frequency (ties by expert id), the current decision's experts left out, `fanout` per
step, later steps weighted 1/(step+1). `pinned()` names the experts worth protecting from eviction:
frequency >= `hot_fraction` in their layer, hottest first, at most `max_pinned` (0: none).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable

from mer.errors import ConfigError


def next_layer_hints(current: tuple[int, tuple[int, ...]] | None, layers: Iterable[int],
                     scores_of: Callable[[int], dict[int, float]], fanout: int, depth: int) -> list[tuple[int, float]]:
    """Hints for the `depth` layers after the current decision's (layer, experts) in the order of `layers`
    (cyclically): each layer's `scores_of` ranked (ties by expert id), the current experts left out, `fanout`
    per step, step s weighted 1/(s+1); best first."""
    if current is None:
        return []
    layers = sorted(layers)
    position = layers.index(current[0])
    excluded = set(current[1])
    hints: dict[int, float] = {}
    for step in range(depth):
        ranked = sorted(scores_of(layers[(position + step + 1) % len(layers)]).items(),
                        key=lambda item: (-item[1], item[0]))
        for expert, score in [(e, s) for e, s in ranked if e not in excluded and e not in hints][:fanout]:
            hints[expert] = score / (step + 1)
    return sorted(hints.items(), key=lambda item: (-item[1], item[0]))


class LocalityPredictor:
    def __init__(self, *, window: int = 32, hot_fraction: float = 0.5, max_pinned: int = 0):
        if window < 1:
            raise ConfigError(f"locality window must be at least 1 decision, got {window}")
        if not 0.0 < hot_fraction <= 1.0:
            raise ConfigError(f"locality hot_fraction must be in (0, 1], got {hot_fraction}")
        if max_pinned < 0:
            raise ConfigError(f"max_pinned must not be negative, got {max_pinned}")
        self.window = window
        self.hot_fraction = hot_fraction
        self.max_pinned = max_pinned
        self.recent: dict[int, deque[tuple[int, ...]]] = {}
        self.counts: dict[int, Counter[int]] = {}
        self.current: tuple[int, tuple[int, ...]] | None = None  # (layer, experts) of the last decision

    def observe(self, layer: int, experts: list[int]) -> None:
        """Add the next decision of `layer` to its window (the oldest one leaves a full window)."""
        recent = self.recent.setdefault(layer, deque())
        counts = self.counts.setdefault(layer, Counter())
        decision = tuple(dict.fromkeys(experts))
        if len(recent) == self.window:
            counts.subtract(recent.popleft())
        recent.append(decision)
        counts.update(decision)
        self.current = (layer, decision)

    def frequencies(self, layer: int) -> dict[int, float]:
        """Each expert's share of the window's decisions in `layer` (experts with count 0 left out)."""
        recent = self.recent.get(layer)
        if not recent:
            return {}
        return {expert: count / len(recent) for expert, count in self.counts[layer].items() if count > 0}

    def predict(self, fanout: int, depth: int = 1) -> list[tuple[int, float]]:
        """Up to `fanout` (expert, score) hints per step for the next `depth` decisions, best first."""
        return next_layer_hints(self.current, self.recent, self.frequencies, fanout, depth)

    def pinned(self) -> list[int]:
        """The experts to pin: frequency >= hot_fraction in their layer, hottest first, at most max_pinned."""
        hot = [(frequency, expert) for layer in sorted(self.recent)
               for expert, frequency in self.frequencies(layer).items() if frequency >= self.hot_fraction]
        hot.sort(key=lambda item: (-item[0], item[1]))
        return [expert for _, expert in hot[: self.max_pinned]]
