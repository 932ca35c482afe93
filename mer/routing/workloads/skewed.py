"""The skewed workload: Zipf-distributed expert popularity with optional repetition.

Each decision stream (the flat pool, or each layer when layered) ranks its experts in an order
shuffled once from the seed; the expert of rank r (1-based) has weight r^-s (Zipf exponent s, 0
gives uniform). A decision draws k distinct experts by those weights (successive sampling without
replacement). With probability `correlation` (P) a decision instead repeats the stream's previous
decision exactly (the first decision of a stream is always drawn).
"""

from __future__ import annotations

import math

import numpy as np

from mer.errors import ConfigError
from mer.routing.space import RoutingSpace
from mer.routing.workloads.base import Workload, draw_distinct


class SkewedWorkload(Workload):
    """Zipf(s) over a shuffled expert order; repeats the previous decision with probability P."""

    name = "skewed"

    def __init__(self, space: RoutingSpace, seed: int, *, zipf_s: float = 1.1, correlation: float = 0.0):
        super().__init__(space)
        if not (math.isfinite(zipf_s) and zipf_s >= 0.0):
            raise ConfigError(f"zipf_s must be a finite number >= 0, got {zipf_s}")
        if not 0.0 <= correlation <= 1.0:
            raise ConfigError(f"workload_correlation must be in [0, 1], got {correlation}")
        self.zipf_s = zipf_s
        self.correlation = correlation
        self._rng = np.random.default_rng(seed)
        pool_size = space.experts_per_decision
        rank_weights = np.arange(1, pool_size + 1, dtype=np.float64) ** -zipf_s
        self._rank_orders = [self._rng.permutation(pool_size) for _ in range(space.decision_layers)]
        # the expert order[r] has rank r + 1: its weight is rank_weights[r]
        self._weights = [rank_weights[np.argsort(order)] for order in self._rank_orders]
        self._previous: list[tuple[int, ...] | None] = [None] * space.decision_layers

    def experts_by_rank(self, layer: int) -> tuple[int, ...]:
        """The experts of a stream from most to least popular."""
        return tuple(int(expert) for expert in self._rank_orders[layer])

    def _draw(self, layer: int) -> tuple[int, ...]:
        repeat = self._rng.random() < self.correlation
        previous = self._previous[layer]
        if repeat and previous is not None:
            return previous
        experts = draw_distinct(self._rng, self._weights[layer], self.space.top_k)
        self._previous[layer] = experts
        return experts
