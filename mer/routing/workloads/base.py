"""The workload interface: routing decisions revealed one at a time, deterministic from a seed.

A workload yields decisions token by token and, within a token, layer by layer
(`space.decision_layers` decisions per token: one over the flat pool, or one per MoE layer in order).
The next decision is computed only when asked for (`next_decision()`), as the benchmark reveals a
token's routing only after the previous token completes. Synthetic workloads draw from one
`numpy.random.Generator` seeded once, keep their state per layer, and give uniform gate weights 1/k.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterator

import numpy as np

from mer.routing.space import RoutingDecision, RoutingSpace


class Workload(ABC):
    """A source of routing decisions: `next_decision()` (or iteration) gives them in order."""

    name: ClassVar[str]

    def __init__(self, space: RoutingSpace):
        self.space = space
        self._token = 0
        self._layer = 0

    @property
    def num_tokens(self) -> int | None:
        """Tokens this workload can give; None when unbounded (synthetic workloads)."""
        return None

    def next_decision(self) -> RoutingDecision:
        """The next decision (token by token, layers in order); StopIteration when exhausted."""
        decision = self._make_decision(self._token, self._layer)
        self._layer += 1
        if self._layer == self.space.decision_layers:
            self._layer = 0
            self._token += 1
        return decision

    def next_token(self) -> tuple[RoutingDecision, ...]:
        """All decisions of the next token (one per decision layer), drawn in layer order."""
        return tuple(self.next_decision() for _ in range(self.space.decision_layers))

    def _make_decision(self, token: int, layer: int) -> RoutingDecision:
        experts = tuple(int(expert) for expert in self._draw(layer))
        k = self.space.top_k
        return RoutingDecision(token, layer, experts, (1.0 / k,) * k)

    @abstractmethod
    def _draw(self, layer: int) -> tuple[int, ...]:
        """The k distinct experts of the next decision in `layer` (synthetic workloads)."""

    def __iter__(self) -> Iterator[RoutingDecision]:
        return self

    def __next__(self) -> RoutingDecision:
        return self.next_decision()


def draw_distinct(rng: np.random.Generator, weights: np.ndarray, k: int) -> tuple[int, ...]:
    """Draw k distinct indices, one after another, each with probability proportional to the weight
    left among the indices not yet drawn (successive sampling without replacement).

    Needs at least k positive weights.
    """
    remaining = np.array(weights, dtype=np.float64)
    chosen: list[int] = []
    for _ in range(k):
        cumulative = np.cumsum(remaining)
        target = rng.random() * cumulative[-1]
        index = int(np.searchsorted(cumulative, target, side="right"))
        if index >= len(remaining) or remaining[index] <= 0.0:
            index = int(np.flatnonzero(remaining > 0.0)[-1])  # rounding at the very top of the range
        chosen.append(index)
        remaining[index] = 0.0
    return tuple(chosen)
