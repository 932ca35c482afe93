"""The uniform workload: every decision draws k distinct experts uniformly from its pool."""

from __future__ import annotations

import numpy as np

from mer.routing.space import RoutingSpace
from mer.routing.workloads.base import Workload


class UniformWorkload(Workload):
    """k distinct experts per decision, every k-subset of the pool equally likely."""

    name = "uniform"

    def __init__(self, space: RoutingSpace, seed: int):
        super().__init__(space)
        self._rng = np.random.default_rng(seed)

    def _draw(self, layer: int) -> tuple[int, ...]:
        chosen = self._rng.choice(self.space.experts_per_decision, size=self.space.top_k, replace=False)
        return tuple(int(expert) for expert in chosen)
