"""The prefetch governor: admit a hint only when its expected usefulness outweighs the disk's load.

Expected usefulness of a hint is its measured precision: the share of the recent hints of the same
predictor at the same rank (0 = the best hint of a `PrefetchHints` message, ranks past
`MAX_RANK` share one bucket) whose expert the foreground then asked for in time. The governor
keeps this score itself, in the shadow of admission ("shadow precision"): every hint for an expert
that is neither resident nor loading is noted, admitted or not, and resolves as

- useful, when a foreground acquire of a token T <= hint token + `horizon` requests its expert;
- useless, when the foreground reaches a token past that without requesting it.

Precision over the last `window` resolved hints of a (predictor, rank) is Laplace-smoothed,
(useful + 1) / (resolved + 2), 0.5 before any. Because a refused hint is scored like an admitted
one, a predictor refused for a while earns its way back as soon as its hints come true; and the
predictor's raw scores (probabilities, frequencies, co-activation shares: not calibrated against
each other) only rank hints, they are not trusted as probabilities. Resident experts are not
noted: a hint that costs no read needs no admission.

Cost: each read already in flight or queued (foreground or prefetch) delays the next foreground
miss, and a wasted prefetch costs a whole expert read, so a hint must be surer the busier the disk
is: admit iff precision >= threshold x (1 + reads in flight or queued). threshold 0 turns the
governor off (the other limits of the I/O worker still apply: a free or evictable slot, fewer than
`predict_fanout x pipeline_depth` prefetch reads in flight).

Staleness: a hint from token t targets at most the next `pipeline_depth` decisions, so once the
foreground acquires for token T >= t + pipeline_depth a still-queued prefetch read from t that the
acquire did not join is useless; `is_stale` says so and the I/O worker cancels such reads when the
foreground needs the disk (a miss).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from mer.errors import ConfigError

MAX_RANK = 3  # hints ranked 3 and worse share one precision bucket


class PrefetchGovernor:
    def __init__(self, threshold: float, *, window: int = 64, horizon: int = 1):
        if not threshold >= 0.0:
            raise ConfigError(f"governor_threshold must not be negative, got {threshold}")
        if window < 1:
            raise ConfigError(f"governor window must be at least 1 hint, got {window}")
        if horizon < 0:
            raise ConfigError(f"governor horizon must not be negative, got {horizon}")
        self.threshold = threshold
        self.window = window
        self.horizon = horizon
        self._open: dict[int, list[tuple[str, int, int]]] = {}  # expert -> [(source, rank, token)] unresolved
        self._outcomes: dict[tuple[str, int], deque[bool]] = {}
        self.resolved = {"useful": 0, "useless": 0}

    @property
    def enabled(self) -> bool:
        return self.threshold > 0.0

    # ---- shadow scoring -------------------------------------------------------------------------

    def noted(self, source: str, rank: int, expert_id: int, token: int) -> None:
        """A hint of `source` at `rank` (hinted at `token`) for an expert that is not resident."""
        self._open.setdefault(expert_id, []).append((source, min(rank, MAX_RANK), token))

    def demanded(self, expert_ids: Iterable[int], token: int) -> None:
        """A foreground acquire of `token` requested `expert_ids`: resolve the open hints (useful ones first)."""
        self.expire(token)
        for expert_id in expert_ids:
            for source, rank, _ in self._open.pop(expert_id, ()):
                self._resolve(source, rank, True)

    def expire(self, token: int) -> None:
        """Resolve as useless every open hint whose horizon ends before `token`."""
        for expert_id, hints in list(self._open.items()):
            for source, rank, _ in (hint for hint in hints if hint[2] + self.horizon < token):
                self._resolve(source, rank, False)
            self._open[expert_id] = [hint for hint in hints if hint[2] + self.horizon >= token]
            if not self._open[expert_id]:
                del self._open[expert_id]

    def _resolve(self, source: str, rank: int, useful: bool) -> None:
        outcomes = self._outcomes.setdefault((source, rank), deque(maxlen=self.window))
        outcomes.append(useful)
        self.resolved["useful" if useful else "useless"] += 1

    def precision(self, source: str, rank: int) -> float:
        """Recent shadow precision of `source`'s hints at `rank`, Laplace-smoothed (0..1)."""
        outcomes = self._outcomes.get((source, min(rank, MAX_RANK)), ())
        return (sum(outcomes) + 1) / (len(outcomes) + 2)

    # ---- admission ------------------------------------------------------------------------------

    def admits(self, source: str, rank: int, reads_pending: int) -> bool:
        """Whether a hint of `source` at `rank` is worth a read with `reads_pending` reads in flight or queued."""
        if not self.enabled:
            return True
        return self.precision(source, rank) >= self.threshold * (1 + reads_pending)

    @staticmethod
    def is_stale(hint_token: int, current_token: int, pipeline_depth: int) -> bool:
        """Whether a prefetch hinted at `hint_token` can no longer serve a decision after `current_token` starts."""
        return current_token >= hint_token + pipeline_depth
