"""Deterministic synthetic hidden states for the benchmark: one float32 vector per (token, layer)."""

from __future__ import annotations

import numpy as np


def synthetic_hidden_state(seed: int, token: int, layer: int, d_model: int) -> np.ndarray:
    """A standard-normal float32 vector of shape (1, d_model), the same for the same arguments."""
    rng = np.random.default_rng([seed, token, layer])
    return rng.standard_normal((1, d_model), dtype=np.float32)
