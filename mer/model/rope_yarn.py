"""YaRN RoPE as ggml computes it (`ggml_rope_yarn_corr_dims`, `rope_yarn`, llama.cpp's attention factor).

For pair i (element i0 = 2i) at position p, with `theta_extrap = p * base^(-2i/n)` (float32, by
repeated multiplication as in `mer.model.attention.rope_tables`) and `freq_scale = 1 / factor`:

    ramp   = (1 - clamp((i - low) / max(0.001, high - low), 0, 1)) * ext_factor
    angle  = (freq_scale * theta_extrap) * (1 - ramp) + theta_extrap * ramp
    mscale = attn_factor * (1 + 0.1 * ln(1 / freq_scale))
    cos, sin = cos(angle) * mscale, sin(angle) * mscale

`low, high` = `floor(d(beta_fast))`, `ceil(d(beta_slow))` clamped to [0, n - 1] with
`d(r) = n * ln(n_ctx_orig / (r * 2 pi)) / (2 ln base)`; beta_fast 32, beta_slow 1 (llama.cpp's
defaults) and ext_factor 1 (YaRN's default in llama.cpp). llama.cpp sets
`attn_factor = (1 + 0.1 ln factor) * (1 / (1 + 0.1 ln factor)) * rope.scaling.attn_factor` (it
cancels the factor `rope_yarn` applies again; a float32 round trip, kept here bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mer.errors import UnsupportedModelError

if TYPE_CHECKING:
    from mer.model.hparams import _Metadata

BETA_FAST = 32.0
BETA_SLOW = 1.0


@dataclass(frozen=True)
class YarnRope:
    """YaRN's parameters; `factor` 0 means no YaRN."""

    factor: float = 0.0
    original_context: int = 0
    attn_factor: float = 1.0  # rope.scaling.attn_factor
    log_multiplier: float = 0.0  # deepseek2: rope.scaling.yarn_log_multiplier / 0.1, as llama.cpp reads it

    @property
    def is_enabled(self) -> bool:
        return self.factor > 0


NO_YARN = YarnRope()


def read_yarn(keys: "_Metadata", context_length: int, log_multiplier: float = 0.0) -> YarnRope:
    """`rope.scaling.type` none (NO_YARN) or "yarn" with its `factor` (> 1), `original_context_length`
    (default `context_length`) and `attn_factor`; other scalings are refused by name."""
    scaling = keys.text("rope.scaling.type", "none")
    if scaling == "none":
        return NO_YARN
    if scaling != "yarn":
        raise UnsupportedModelError(f"{keys.part.path}: {keys.prefix}.rope.scaling.type {scaling!r} is not supported "
                                    f"for {keys.prefix} (none, yarn)")
    factor = keys.number("rope.scaling.factor")
    if not factor > 1:
        raise UnsupportedModelError(f"{keys.part.path}: {keys.prefix}.rope.scaling.factor {factor} must exceed 1")
    return YarnRope(factor, keys.integer("rope.scaling.original_context_length", context_length),
                    keys.number("rope.scaling.attn_factor", 1.0), log_multiplier)


def _corr_dim(dimensions: int, original_context: int, rotations: float, base: float) -> np.float32:
    value = dimensions * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))
    return np.float32(value)


def corr_dims(dimensions: int, original_context: int, base: float) -> tuple[float, float]:
    start = np.floor(_corr_dim(dimensions, original_context, BETA_FAST, base))
    end = np.ceil(_corr_dim(dimensions, original_context, BETA_SLOW, base))
    return float(max(np.float32(0), start)), float(min(np.float32(dimensions - 1), end))


def yarn_attn_factor(yarn: YarnRope) -> np.float32:
    """llama.cpp's `cparams.yarn_attn_factor`: `get_mscale(factor, 1) = 1 + 0.1 ln factor` (or, with
    deepseek2's `yarn_log_multiplier`, `get_mscale(factor, m) / get_mscale(factor, m)` = 1), divided by
    `1 + 0.1 ln factor` (the factor `rope_yarn` applies again), times `rope.scaling.attn_factor`."""
    freq_scale = np.float32(1) / np.float32(yarn.factor)
    factor = np.float32(1) / freq_scale
    growth = np.float32(1) if yarn.log_multiplier else np.float32(0.1) * np.log(factor, dtype=np.float32) + np.float32(1)
    attn_factor = growth * (np.float32(1) / (np.float32(1) + np.float32(0.1) * np.log(factor, dtype=np.float32)))
    return np.float32(attn_factor * np.float32(yarn.attn_factor))


def yarn_mscale(yarn: YarnRope) -> np.float32:
    """The magnitude factor applied to cos and sin (see the module)."""
    freq_scale = np.float32(1) / np.float32(yarn.factor)
    return np.float32(yarn_attn_factor(yarn) * (np.float32(1) + np.float32(0.1) * np.log(np.float32(1) / freq_scale,
                                                                                          dtype=np.float32)))


def yarn_rope_tables(positions: np.ndarray, dimensions: int, base: float,
                     yarn: YarnRope) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float32 `[tokens, dimensions // 2]` with YaRN's angles and magnitude."""
    theta_scale = np.power(np.float32(base), np.float32(-2.0) / np.float32(dimensions), dtype=np.float32)
    freq_scale = np.float32(1) / np.float32(yarn.factor)
    low, high = corr_dims(dimensions, yarn.original_context, base)
    theta = np.asarray(positions, dtype=np.float32)
    angles = np.empty((theta.size, dimensions // 2), dtype=np.float32)
    for pair in range(dimensions // 2):
        y = np.float32((pair - low) / max(0.001, high - low))
        ramp = np.float32(1) - np.float32(min(1.0, max(0.0, float(y))))
        interpolated = freq_scale * theta
        angles[:, pair] = interpolated * (np.float32(1) - ramp) + theta * ramp
        theta = (theta * theta_scale).astype(np.float32)
    mscale = yarn_mscale(yarn)
    return np.cos(angles) * mscale, np.sin(angles) * mscale
