"""Multi-head latent attention (MLA, DeepSeek-V2/V3) in the absorbed form llama.cpp runs.

Read from llama.cpp's `llama_model_deepseek2` graph (the `is_mla` branch) and `build_attn_mha`
(its `v_mla` step). For the attention input `x` (after `attn_norm`), per token:

    q        = attn_q · x                          (q_lora_rank 0), or
             = attn_q_b · rms_norm(attn_q_a · x, attn_q_a_norm)
    q_nope, q_pe = q per head split into qk_nope and qk_rope values
    kv, k_pe = attn_kv_a_mqa · x split into kv_lora_rank and qk_rope values
    q_pe, k_pe = RoPE (normal pairs) on the rope parts; k_pe is one key shared by all heads
    kv       = rms_norm(kv, attn_kv_a_norm)
    q_abs[h] = attn_k_b[h] · q_nope[h]            (kv_lora_rank values: k_b absorbed into the query)
    Q[h] = [q_abs[h], q_pe[h]],  K = [kv, k_pe],  V = kv    (one KV "head", kv_lora_rank + qk_rope)
    o[h]     = softmax(Q[h] · Kᵀ · kq_scale + causal mask) · V
    out      = attn_output · concat_h(attn_v_b[h] · o[h])

with `kq_scale = mscale^2 / sqrt(qk_nope + qk_rope)` (the head size of the uncompressed form; mscale 1
without YaRN, `kq_scale`). The KV cache
holds only `[kv, k_pe]` per position and block, `kv_lora_rank + qk_rope` float32 values
(`HParams.kv_floats_per_position`): V is a view of its first `kv_lora_rank` values. This equals
the plain (non-absorbed) form with `k = [attn_kv_b_k · kv, k_pe]`, `v = attn_kv_b_v · kv` per head
(`tests/unit/test_mla.py` checks it against that form in float64).

Matrix inputs are rounded as ggml rounds them (`DenseMatrix`); `attn_k_b` / `attn_v_b` (GGML shapes
[qk_nope, kv_lora_rank, heads] and [kv_lora_rank, v_head, heads]) are one matrix per head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mer.model.attention import KVCache, apply_rope, causal_attention, rms_norm
from mer.model.hparams import ROPE_NORMAL, HParams
from mer.model.rope_yarn import yarn_attn_factor

if TYPE_CHECKING:
    from mer.model.weights import DenseMatrix


@dataclass(frozen=True)
class MLAWeights:
    """One block's MLA tensors (see the module docstring)."""

    q: DenseMatrix | None  # attn_q (q_lora_rank 0)
    q_a: DenseMatrix | None
    q_a_norm: np.ndarray | None
    q_b: DenseMatrix | None
    kv_a: DenseMatrix  # attn_kv_a_mqa
    kv_a_norm: np.ndarray
    k_b: tuple[DenseMatrix, ...]  # per head: kv_lora_rank rows x qk_nope columns
    v_b: tuple[DenseMatrix, ...]  # per head: v_head rows x kv_lora_rank columns


def kq_scale(hparams: HParams) -> np.float32:
    """The attention logits' scale `mscale^2 / sqrt(qk_nope + qk_rope)`, computed in float32 as llama.cpp's
    deepseek2 graph does: with YaRN `mscale = attn_factor * (1 + 0.1 ln factor) * (1 + 0.1 * log_mul *
    ln factor)` (`attn_factor`: `mer.model.rope_yarn.yarn_attn_factor`), else 1."""
    mscale = np.float32(1)
    yarn = hparams.yarn
    if yarn.is_enabled:
        growth = np.log(np.float32(1) / (np.float32(1) / np.float32(yarn.factor)), dtype=np.float32)
        original = yarn_attn_factor(yarn) * (np.float32(1) + np.float32(0.1) * growth)
        mscale = np.float32(original * (np.float32(1) + np.float32(0.1) * np.float32(yarn.log_multiplier) * growth))
    return np.float32(np.float32(1) * mscale * mscale / np.sqrt(np.float32(hparams.head_dim)))


def mla_attention(hparams: HParams, weights: MLAWeights, x: np.ndarray, kv_caches: list[KVCache], block: int,
                  bounds: np.ndarray, positions: np.ndarray, rope: tuple[np.ndarray, np.ndarray],
                  threads: int = 1) -> np.ndarray:
    """The attention of the normed rows `x` `[tokens, d_model]` before `attn_output`: float32
    `[tokens, heads * v_head]`; rows `bounds[i]:bounds[i+1]` continue the sequence in `kv_caches[i]`
    (their `[kv, k_pe]` are appended). `rope` is the (cos, sin) of `positions` over qk_rope."""
    shape, eps, heads = hparams.mla, hparams.rms_norm_eps, hparams.num_heads
    assert shape is not None
    if weights.q is not None:
        q = weights.q(x, threads)
    else:
        q = weights.q_b(rms_norm(weights.q_a(x, threads), weights.q_a_norm, eps), threads)  # type: ignore[union-attr]
    q = q.reshape(-1, heads, shape.qk_nope + shape.qk_rope)
    q_nope, q_pe = q[..., :shape.qk_nope], q[..., shape.qk_nope:]
    kv_pe = weights.kv_a(x, threads)
    kv = rms_norm(kv_pe[:, :shape.kv_lora_rank], weights.kv_a_norm, eps)
    cos, sin = rope
    q_pe = apply_rope(np.ascontiguousarray(q_pe), cos, sin, ROPE_NORMAL)
    k_pe = apply_rope(np.ascontiguousarray(kv_pe[:, None, shape.kv_lora_rank:]), cos, sin, ROPE_NORMAL)
    absorbed = np.stack([weights.k_b[head](q_nope[:, head, :], threads) for head in range(heads)], axis=1)
    queries = np.concatenate([absorbed, q_pe], axis=2)  # [T, heads, kv_lora_rank + qk_rope]
    keys = np.concatenate([kv[:, None, :], k_pe], axis=2)  # [T, 1, kv_lora_rank + qk_rope]
    attended = []
    for kv_cache, start, stop in zip(kv_caches, bounds, bounds[1:]):
        kv_cache.store(block, keys[start:stop], None)
        length = kv_cache.lengths[block]
        cached = kv_cache.keys[block, :length]
        attended.append(causal_attention(queries[start:stop], cached, cached[..., :shape.kv_lora_rank],
                                         positions[start:stop], kq_scale(hparams)))
    latent = (attended[0] if len(attended) == 1 else np.concatenate(attended)).reshape(-1, heads, shape.kv_lora_rank)
    return np.concatenate([weights.v_b[head](latent[:, head, :], threads) for head in range(heads)], axis=1)
