"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

`temperature == 0` is greedy (the highest logit; ties go to the lowest id). Otherwise the logits
are divided by the temperature, cut to the `top_k` highest (0: no cut), turned into
probabilities (float64 softmax), cut to the smallest set of most likely tokens whose probability
reaches `top_p` (1.0: no cut), renormalised, and one token is drawn with a numpy generator seeded
by `seed`: the same seed and logits give the same tokens.
"""

from __future__ import annotations

import numpy as np

from mer.errors import ConfigError


class Sampler:
    """A token chooser with its own random state (see the module docstring)."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if not (temperature >= 0 and np.isfinite(temperature)):
            raise ConfigError(f"temperature must be a finite number >= 0, got {temperature}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0: no cut), got {top_k!r}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p, self.seed = float(temperature), top_k, float(top_p), seed
        self.rng = np.random.default_rng(seed)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a sampled token is drawn from (float64, zero outside the cuts)."""
        scaled = np.asarray(logits, dtype=np.float64).reshape(-1) / self.temperature
        if 0 < self.top_k < scaled.size:
            threshold = np.partition(scaled, -self.top_k)[-self.top_k]
            scaled = np.where(scaled >= threshold, scaled, -np.inf)
        probabilities = np.exp(scaled - scaled.max())
        probabilities /= probabilities.sum()
        if self.top_p < 1.0:
            order = np.argsort(-probabilities, kind="stable")
            cumulative = np.cumsum(probabilities[order])
            keep = order[: int(np.searchsorted(cumulative, self.top_p)) + 1]
            kept = np.zeros_like(probabilities)
            kept[keep] = probabilities[keep]
            probabilities = kept / kept.sum()
        return probabilities

    def sample(self, logits: np.ndarray) -> int:
        """The next token id for one position's logits `[vocab]`."""
        if self.is_greedy:
            return int(np.argmax(np.asarray(logits).reshape(-1)))
        probabilities = self.probabilities(logits)
        cumulative = np.cumsum(probabilities)
        drawn = self.rng.random() * cumulative[-1]
        return int(min(np.searchsorted(cumulative, drawn, side="right"), probabilities.size - 1))
