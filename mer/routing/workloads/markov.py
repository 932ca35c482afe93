"""The seed's clustered Markov workload.

Experts fall into `num_clusters` clusters by `id % num_clusters` (4 in the seed). Each decision
stream (the flat pool, or each layer when layered) remembers the last expert it drew; the next
decision draws k distinct experts from P(. | last): a total probability `stay_probability` (0.9)
spread evenly over the experts in last's cluster and the rest spread evenly over all other experts
(successive sampling without replacement, so each later draw renormalises over what is left). The
stream's last expert is then the last one drawn. The first `last` of each stream is drawn
uniformly. When last's cluster is the whole pool (a pool of one expert, or one cluster), the draw
is uniform.
"""

from __future__ import annotations

import numpy as np

from mer.errors import ConfigError
from mer.routing.space import RoutingSpace
from mer.routing.workloads.base import Workload, draw_distinct

SEED_NUM_CLUSTERS = 4
SEED_STAY_PROBABILITY = 0.9


def transition_weights(last: int, pool_size: int, num_clusters: int, stay_probability: float) -> np.ndarray:
    """P(next expert | last) over the pool: stay_probability shared by last's cluster, the rest by others."""
    in_cluster = (np.arange(pool_size) % num_clusters) == (last % num_clusters)
    num_inside = int(in_cluster.sum())
    num_outside = pool_size - num_inside
    if num_outside == 0:
        return np.full(pool_size, 1.0 / pool_size)
    return np.where(in_cluster, stay_probability / num_inside, (1.0 - stay_probability) / num_outside)


class MarkovWorkload(Workload):
    """Clustered Markov routing as in the seed (cluster = id % 4, stay with probability 0.9)."""

    name = "markov"

    def __init__(self, space: RoutingSpace, seed: int, *, num_clusters: int = SEED_NUM_CLUSTERS,
                 stay_probability: float = SEED_STAY_PROBABILITY):
        super().__init__(space)
        if num_clusters < 1:
            raise ConfigError(f"num_clusters must be at least 1, got {num_clusters}")
        if not 0.0 < stay_probability < 1.0:
            raise ConfigError(f"stay_probability must be in (0, 1), got {stay_probability}")
        self.num_clusters = num_clusters
        self.stay_probability = stay_probability
        self._rng = np.random.default_rng(seed)
        self._weights_by_cluster: dict[int, np.ndarray] = {}  # P(. | last) depends on last's cluster only
        self._last = [int(self._rng.integers(space.experts_per_decision)) for _ in range(space.decision_layers)]

    def last_expert(self, layer: int) -> int:
        """The expert the next decision of `layer` is conditioned on."""
        return self._last[layer]

    def _draw(self, layer: int) -> tuple[int, ...]:
        cluster = self._last[layer] % self.num_clusters
        weights = self._weights_by_cluster.get(cluster)
        if weights is None:
            weights = transition_weights(cluster, self.space.experts_per_decision,
                                         self.num_clusters, self.stay_probability)
            self._weights_by_cluster[cluster] = weights
        experts = draw_distinct(self._rng, weights, self.space.top_k)
        self._last[layer] = experts[-1]
        return experts
