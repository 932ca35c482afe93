"""RMS norm, RoPE (both pairings), the KV cache and causal GQA attention against float64 numpy.

Tolerances: float32 results within 1e-5 relative of float64 formulas written out here (RoPE
angles are computed by repeated float32 multiplication as ggml does: ~1e-6 relative at the
positions used); attention over a KV cache equals the full causal attention of the sequence.
"""

from __future__ import annotations

import numpy as np
import pytest

from mer.errors import ContextLengthError
from mer.model.attention import KVCache, apply_rope, causal_attention, rms_norm, rope_tables
from mer.model.hparams import ARCHITECTURES, ROPE_NEOX, ROPE_NORMAL, HParams

RNG = np.random.default_rng(21)


def test_rms_norm_matches_float64():
    x = RNG.standard_normal((5, 48)).astype(np.float32) * 3
    weight = RNG.standard_normal(48).astype(np.float32)
    expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-6) * weight
    assert np.allclose(rms_norm(x, weight, 1e-6), expected, rtol=1e-5, atol=1e-6)
    assert np.allclose(rms_norm(x, None, 1e-6) * weight, rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("style", [ROPE_NORMAL, ROPE_NEOX])
def test_rope_rotates_the_documented_pairs(style):
    positions = np.array([0, 1, 7, 100])
    dims, base = 16, 10000.0
    x = RNG.standard_normal((4, 3, dims)).astype(np.float32)
    cos, sin = rope_tables(positions, dims, base, 1.0)
    out = apply_rope(x, cos, sin, style)
    angles = positions[:, None] * base ** (-2.0 * np.arange(dims // 2) / dims)
    pairs = [(2 * i, 2 * i + 1) for i in range(dims // 2)] if style == ROPE_NORMAL else [
        (i, i + dims // 2) for i in range(dims // 2)]
    expected = x.astype(np.float64).copy()
    for index, (a, b) in enumerate(pairs):
        c, s = np.cos(angles[:, index])[:, None], np.sin(angles[:, index])[:, None]
        expected[..., a], expected[..., b] = x[..., a] * c - x[..., b] * s, x[..., a] * s + x[..., b] * c
    assert np.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(out[0], x[0])  # position 0 is not rotated
    assert np.allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_linear_rope_scaling_scales_positions():
    cos, sin = rope_tables(np.array([8]), 16, 10000.0, 0.25)
    expected_cos, expected_sin = rope_tables(np.array([2]), 16, 10000.0, 1.0)
    assert np.allclose(cos, expected_cos, atol=1e-6) and np.allclose(sin, expected_sin, atol=1e-6)


def full_attention_float64(q, k, v, scale):  # type: ignore[no-untyped-def]
    tokens, heads, dims = q.shape
    group = heads // k.shape[1]
    out = np.empty((tokens, heads, dims))
    for head in range(heads):
        scores = q[:, head].astype(np.float64) @ k[:, head // group].T * scale
        scores += np.triu(np.full((tokens, tokens), -np.inf), 1)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, head] = weights / weights.sum(axis=1, keepdims=True) @ v[:, head // group]
    return out.reshape(tokens, -1)


def test_causal_gqa_attention_through_the_cache_matches_full_attention():
    hparams = HParams("llama", ARCHITECTURES["llama"], 64, 32, 1, 4, 2, 8, 1e-6, 1e4, 8, 1.0, 4, 2, 0.0, 0)
    q = RNG.standard_normal((6, 4, 8)).astype(np.float32)
    k = RNG.standard_normal((6, 2, 8)).astype(np.float32)
    v = RNG.standard_normal((6, 2, 8)).astype(np.float32)
    expected = full_attention_float64(q, k, v, 1 / np.sqrt(8))
    cache = KVCache(hparams, 10)
    cache.store(0, k[:4], v[:4])
    first = causal_attention(q[:4], cache.keys[0, :4], cache.values[0, :4], np.arange(4), 1 / np.sqrt(8))
    cache.store(0, k[4:], v[4:])
    rest = causal_attention(q[4:], cache.keys[0, :6], cache.values[0, :6], np.arange(4, 6), 1 / np.sqrt(8))
    assert np.allclose(np.concatenate([first, rest]), expected, rtol=1e-5, atol=1e-6)
    assert cache.lengths == [6] and cache.length == 6
    with pytest.raises(ContextLengthError, match="11 positions do not fit in the KV cache of 10"):
        cache.store(0, k[:5], v[:5])
