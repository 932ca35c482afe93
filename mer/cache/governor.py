"""The prefetch governor: admit a hint only when its expected usefulness outweighs the disk's load.

Expected usefulness of a hint = its score x the recent accuracy of the predictor that sent it.
Recent accuracy is the predictor's own top-k accuracy (`PredictorStats`, cumulative counters
`topk_found` / `topk_observed`) over its last `window` reports: the difference between the newest
and the oldest report kept, Laplace-smoothed, (found + 1) / (observed + 2) (0.5 before any report).
It does not depend on which prefetches were admitted, so a predictor refused for a while can earn
its way back.

Cost: each read already in flight or queued (foreground or prefetch) delays the next foreground
miss, so a hint must be worth more the busier the disk is:
admit iff usefulness >= threshold x (1 + reads in flight or queued). threshold 0 admits every hint
(the other limits of the I/O worker still apply: a free or evictable slot, fewer than
`predict_fanout x pipeline_depth` prefetch reads in flight).

Staleness: a hint from token t targets at most the next `pipeline_depth` decisions, so once the
foreground acquires for token T >= t + pipeline_depth a still-queued prefetch read from t that the
acquire did not join is useless; `is_stale` says so and the I/O worker cancels such reads when the
foreground needs the disk (a miss).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from mer.errors import ConfigError


class PrefetchGovernor:
    def __init__(self, threshold: float, *, window: int = 32):
        if not threshold >= 0.0:
            raise ConfigError(f"governor_threshold must not be negative, got {threshold}")
        if window < 1:
            raise ConfigError(f"governor window must be at least 1 report, got {window}")
        self.threshold = threshold
        self.window = window
        self._reports: dict[str, deque[tuple[int, int]]] = {}

    def reported(self, source: str, stats: Mapping[str, Any]) -> None:
        """Note a predictor's cumulative accuracy counters (`PredictorStats.stats`)."""
        found, observed = stats.get("topk_found"), stats.get("topk_observed")
        if not isinstance(found, int) or not isinstance(observed, int):
            return
        reports = self._reports.setdefault(source, deque([(0, 0)], maxlen=self.window + 1))
        reports.append((found, observed))

    def recent_accuracy(self, source: str) -> float:
        """Top-k accuracy of `source` over its last `window` reports, Laplace-smoothed (0..1)."""
        reports = self._reports.get(source)
        if not reports:
            return 0.5
        found = reports[-1][0] - reports[0][0]
        observed = reports[-1][1] - reports[0][1]
        return (found + 1) / (observed + 2)

    def usefulness(self, source: str, score: float) -> float:
        return score * self.recent_accuracy(source)

    def admits(self, source: str, score: float, reads_pending: int) -> bool:
        """Whether a hint of `source` with `score` is worth a read with `reads_pending` reads in flight or queued."""
        return self.usefulness(source, score) >= self.threshold * (1 + reads_pending)

    @staticmethod
    def is_stale(hint_token: int, current_token: int, pipeline_depth: int) -> bool:
        """Whether a prefetch hinted at `hint_token` can no longer serve a decision after `current_token` starts."""
        return current_token >= hint_token + pipeline_depth
