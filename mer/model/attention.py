"""RMS norm, rotary position embedding, the KV cache and causal grouped-query attention.

All in float32, following ggml's order of operations where it matters for parity with llama.cpp:

- `rms_norm`: the sum of squares is accumulated in float64, `1 / sqrt(mean + eps)` is a float32
  scale, then `(x * scale) * weight`.
- RoPE angles: `theta_i = position * base^(-2i / n)` computed as ggml does, in float32 by
  repeated multiplication (`theta *= base^(-2/n)`), then scaled by the linear position scale.
  "normal" style rotates the pairs (2i, 2i+1) (llama), "neox" the pairs (i, i + n/2) (qwen3moe,
  olmoe).
- attention: `softmax(q·kᵀ · scale + causal mask) · v` per head, query head h reading KV head
  `h // (num_heads / num_kv_heads)` (GQA). One token (a decode step) runs every head at once as
  batched matmuls; a row's result depends only on its query and the keys it sees, so a sequence
  decoded alone (`generate`) and next to others (`serve`) gets the same bits.
"""

from __future__ import annotations

import numpy as np

from mer.errors import ContextLengthError, ShapeError
from mer.model.hparams import ROPE_NEOX, HParams


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """RMS-normalise the last axis of float32 `x`, then multiply by `weight` (if given)."""
    values = np.asarray(x, dtype=np.float32)
    squares = np.sum((values * values).astype(np.float64), axis=-1, keepdims=True)
    mean = (squares / values.shape[-1]).astype(np.float32)
    scale = np.float32(1) / np.sqrt(mean + np.float32(eps))
    normed = values * scale
    return normed if weight is None else normed * weight


def rope_tables(
    positions: np.ndarray, dimensions: int, base: float, position_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float32 `[tokens, dimensions // 2]` of the rotation angles at `positions`."""
    theta_scale = np.power(np.float32(base), np.float32(-2.0) / np.float32(dimensions), dtype=np.float32)
    theta = np.asarray(positions, dtype=np.float32)
    angles = np.empty((theta.size, dimensions // 2), dtype=np.float32)
    for pair in range(dimensions // 2):
        angles[:, pair] = np.float32(position_scale) * theta
        theta = (theta * theta_scale).astype(np.float32)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> np.ndarray:
    """Rotate `x` `[tokens, heads, head_dim]` by the angles `[tokens, n // 2]`: the first n values of each
    head (ggml's `n_dims`; glm4moe rotates part of each head), the others pass unchanged."""
    rotated = 2 * cos.shape[-1]
    if rotated < x.shape[-1]:
        out = x.copy()
        out[..., :rotated] = apply_rope(x[..., :rotated], cos, sin, style)
        return out
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    if style == ROPE_NEOX:
        first, second = x[..., :half], x[..., half:]
        out[..., :half] = first * cos - second * sin
        out[..., half:] = first * sin + second * cos
    else:
        even, odd = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
    return out


class KVCache:
    """Keys (after RoPE) and values of one sequence, per block: float32 `[capacity, kv_heads, head_dim]`;
    for MLA (deepseek2) only the compressed form, `[capacity, 1, kv_lora_rank + qk_rope]` keys whose
    first `kv_lora_rank` values are the values (`values` is None; `mer.model.mla`).

    Positions are filled in order: `store` appends the entries of positions `length..length+T-1`.
    """

    def __init__(self, hparams: HParams, capacity: int):
        if not 1 <= capacity <= hparams.context_length:
            raise ContextLengthError(
                f"KV cache of {capacity} positions: the model's context length is {hparams.context_length}"
            )
        self.capacity = capacity
        self.lengths = [0] * hparams.num_blocks
        self.values: np.ndarray | None
        if hparams.mla is not None:
            self.keys = np.zeros((hparams.num_blocks, capacity, 1, hparams.kv_floats_per_position), dtype=np.float32)
            self.values = None
            return
        shape = (hparams.num_blocks, capacity, hparams.num_kv_heads, hparams.head_dim)
        self.keys = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)

    @property
    def nbytes(self) -> int:
        """The bytes the cache holds (`mer.runtime.ram_budget.kv_cache_nbytes` of its capacity)."""
        return self.keys.nbytes + (0 if self.values is None else self.values.nbytes)

    @property
    def length(self) -> int:
        """Positions stored in the last block (all blocks, between two forward passes)."""
        return self.lengths[-1]

    def store(self, block: int, keys: np.ndarray, values: np.ndarray | None) -> None:
        """Append `keys`, `values` `[tokens, kv_heads, head_dim]` to `block`'s cache (MLA: the
        compressed keys only, `values` None)."""
        start = self.lengths[block]
        stop = start + keys.shape[0]
        if stop > self.capacity:
            raise ContextLengthError(f"{stop} positions do not fit in the KV cache of {self.capacity} positions")
        self.keys[block, start:stop] = keys
        if self.values is not None:
            self.values[block, start:stop] = values
        self.lengths[block] = stop


def next_positions(kv_cache: KVCache, block: int, num_tokens: int) -> np.ndarray:
    """The positions the next `num_tokens` tokens take in `block`'s cache."""
    start = kv_cache.lengths[block]
    return np.arange(start, start + num_tokens)


def causal_attention(
    queries: np.ndarray, keys: np.ndarray, values: np.ndarray, positions: np.ndarray, scale: float,
    window: int = 0, sinks: np.ndarray | None = None,
) -> np.ndarray:
    """Attention of `queries` `[T, heads, d]` at `positions` over the cached `keys`/`values`
    `[length, kv_heads, d]` (position p sees cache entries 0..p, or with a sliding `window` only
    p - window + 1..p): float32 `[T, heads * d]`. `sinks` (float32 `[heads]`, gpt-oss) adds one
    logit per head to each softmax's max and denominator, with no value (ggml's `soft_max_ext`)."""
    num_tokens, num_heads = queries.shape[:2]
    num_kv_heads = keys.shape[1]
    if num_heads % num_kv_heads:
        raise ShapeError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if num_tokens == 1:
        stop = int(positions[0]) + 1
        start = max(0, stop - window) if window else 0
        return _one_query_attention(queries[0], keys[start:stop], values[start:stop], group, scale, sinks)
    out = np.empty((num_tokens, num_heads, values.shape[2]), dtype=np.float32)
    distance = np.asarray(positions)[:, None] - np.arange(keys.shape[0])[None, :]
    visible = (distance >= 0) & (distance < window) if window else distance >= 0
    for head in range(num_heads):
        kv_head = head // group
        scores = (queries[:, head, :] @ keys[:, kv_head, :].T) * np.float32(scale)
        scores = np.where(visible, scores, np.float32(-np.inf))
        sink = None if sinks is None else sinks[head]
        out[:, head, :] = _softmax_rows(scores, sink, axis=1) @ values[:, kv_head, :]
    return out.reshape(num_tokens, -1)


def _softmax_rows(scores: np.ndarray, sink: np.ndarray | None, axis: int) -> np.ndarray:
    """Softmax along `axis` (max subtracted, sum in float64); a sink joins the max and the sum."""
    peak = scores.max(axis=axis, keepdims=True)
    if sink is not None:
        peak = np.maximum(peak, sink)
    exponentials = np.exp(scores - peak)
    total = exponentials.sum(axis=axis, keepdims=True, dtype=np.float64)
    if sink is not None:
        total = total + np.exp(sink - peak).astype(np.float64)
    return exponentials / total.astype(np.float32)


def _one_query_attention(query: np.ndarray, keys: np.ndarray, values: np.ndarray, group: int,
                         scale: float, sinks: np.ndarray | None = None) -> np.ndarray:
    """`causal_attention` of one token (a decode step) over the keys it sees, every head at once: the
    same steps as the per-head loop, as batched matmuls over the KV heads (`[1, heads * d]`)."""
    num_kv_heads, head_dim = keys.shape[1], keys.shape[2]
    grouped = query.reshape(num_kv_heads, group, head_dim)
    scores = np.matmul(grouped, keys.transpose(1, 2, 0)) * np.float32(scale)  # [kv_heads, group, length]
    head_sinks = None if sinks is None else sinks.reshape(num_kv_heads, group, 1)
    probabilities = _softmax_rows(scores, head_sinks, axis=2)
    return np.matmul(probabilities, values.transpose(1, 0, 2)).reshape(1, -1)  # [kv_heads, group, d] -> [1, heads * d]
