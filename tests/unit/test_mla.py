"""MLA (`mer.model.mla`, absorbed form, compressed KV cache) against a plain float64 numpy reference of the
non-absorbed form: per head k = [attn_k_b[h]ᵀ-applied kv, k_pe], v = attn_v_b[h] · kv, ordinary causal
attention with scale 1 / sqrt(qk_nope + qk_rope), exact RoPE angles on the rope parts (pairs 2i, 2i+1).

Tolerance: 2e-5 of the largest attention output value, residual excluded (float32 against float64;
measured ~3e-7), over a prompt
processed in one pass and then token by token (decode against the cache)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from mer.model.attention import next_positions
from mer.model.model import MoEModel
from tests.support.deepseek2_models import write_tiny_deepseek2_gguf

TOLERANCE = 2e-5


def rms(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Normal pairs (2i, 2i+1) of the last axis rotated by position * base^(-2i/d); x [T, ..., d]."""
    d = x.shape[-1]
    angles = positions[:, None] * base ** (-np.arange(0, d, 2) / d)  # [T, d/2]
    shape = (len(positions),) + (1,) * (x.ndim - 2) + (d // 2,)
    cos, sin = np.cos(angles).reshape(shape), np.sin(angles).reshape(shape)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out


def reference_attention(path, block: int, hidden: np.ndarray, info) -> np.ndarray:
    """`hidden + attn_output(attention)` of block `block` for a whole sequence, non-absorbed, float64."""
    reader = GGUFReader(path)
    t = {tensor.name: dequantize(tensor.data, tensor.tensor_type).astype(np.float64).reshape(
        tuple(reversed([int(n) for n in tensor.shape]))) for tensor in reader.tensors}
    w = lambda name: t[f"blk.{block}.{name}.weight"]  # noqa: E731
    heads, nope, rope_dim, rank = info.n_heads, info.qk_nope, info.qk_rope, info.kv_lora_rank
    x = rms(hidden.astype(np.float64), w("attn_norm"))
    q = (rms(x @ w("attn_q_a").T, w("attn_q_a_norm")) @ w("attn_q_b").T) if info.q_lora_rank else x @ w("attn_q").T
    q = q.reshape(len(x), heads, nope + rope_dim)
    positions = np.arange(len(x), dtype=np.float64)
    q = np.concatenate([q[..., :nope], rope(q[..., nope:], positions)], axis=2)
    kv_pe = x @ w("attn_kv_a_mqa").T
    kv = rms(kv_pe[:, :rank], w("attn_kv_a_norm"))
    k_pe = rope(kv_pe[:, rank:], positions)
    out = np.empty((len(x), heads, info.v_head))
    mask = np.triu(np.full((len(x), len(x)), -np.inf), 1)
    for head in range(heads):
        k = np.concatenate([kv @ w("attn_k_b")[head], k_pe], axis=1)  # k_b[h]: [kv_lora_rank, qk_nope]
        v = kv @ w("attn_v_b")[head].T  # v_b[h]: [v_head, kv_lora_rank]
        scores = q[:, head] @ k.T / np.sqrt(nope + rope_dim) + mask
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, head] = (p / p.sum(axis=1, keepdims=True)) @ v
    return hidden + out.reshape(len(x), -1) @ w("attn_output").T


@pytest.mark.parametrize("style", ["v2-lite", "v3"])
def test_absorbed_mla_with_the_compressed_cache_equals_the_plain_form(tmp_path, style):
    info = write_tiny_deepseek2_gguf(tmp_path / f"{style}.gguf", style=style, expert_dtype="f32", seed=3)
    model = MoEModel.load(info.path)
    tokens = [5, 60, 7, 200, 9, 31, 77, 140]
    hidden = model.embed(tokens)
    expected = reference_attention(info.path, 1, hidden, info)
    cache = model.new_kv_cache(len(tokens))
    prompt = model.attention_block(1, hidden[:5], cache, next_positions(cache, 1, 5))
    steps = [model.attention_block(1, hidden[row:row + 1], cache, next_positions(cache, 1, 1)) for row in range(5, 8)]
    ours = np.concatenate([prompt, *steps]) - hidden  # the attention's own output, without the residual
    expected = expected - hidden
    error = np.abs(ours - expected).max() / np.abs(expected).max()
    print(f"MLA {style}: largest difference {error:.1e} of the largest value")
    assert error <= TOLERANCE
    assert cache.values is None and cache.lengths[1] == len(tokens)
