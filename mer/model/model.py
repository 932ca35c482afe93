"""A MoE model loaded from a GGUF: hyper-parameters, dense weights, and the blocks of its forward pass.

`MoEModel` exposes the forward pass one block at a time so that a router can drive it and send
the experts elsewhere:

    hidden = model.embed(token_ids)
    for block in range(model.hparams.num_blocks):
        hidden = model.attention_block(block, hidden, kv_cache, positions)
        normed = model.ffn_input(block, hidden)
        routing = model.route(block, normed)            # MoE blocks; dense ones: model.dense_ffn
        hidden = hidden + (<gate-weighted experts of normed> + model.shared_expert(block, normed))
                                                        (mer.model.forward; the shared expert: qwen2moe)
    logits = model.logits(hidden)

Every method takes and returns float32 arrays `[tokens, ...]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mer.errors import ContextLengthError, ShapeError, StoreError, TokenizerError
from mer.model.attention import KVCache, apply_rope, causal_attention, rms_norm, rope_tables
from mer.model.gating import route
from mer.model.hparams import QK_NORM_PER_HEAD, QK_NORM_WHOLE, HParams, moe_layers_of, read_hparams
from mer.model.mla import mla_attention
from mer.model.rope_yarn import yarn_rope_tables
from mer.model.moe import Routing
from mer.model.weights import BlockWeights, ModelWeights, load_weights
from mer.store.gguf_source import GGUFSource, read_gguf_source
from mer.store.manifest import Manifest
from mer.compute.swiglu import silu_gate


@dataclass(frozen=True)
class MoEModel:
    """The dense part of a MoE model (its experts are located in `source`, computed elsewhere)."""

    source: GGUFSource
    hparams: HParams
    weights: ModelWeights
    moe_layers: dict[int, int]  # block index -> MoE layer index (the expert store's numbering)
    threads: int = 1

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int = 1, resident: bool = False) -> "MoEModel":
        """Open a MoE GGUF (any part of a split one); errors name the file and key or tensor. With
        `resident` the dense matrices are copied into this process's memory (`mer.model.resident`)."""
        source = read_gguf_source(path)
        hparams = read_hparams(source.parts[0])
        moe_layers = moe_layers_of(source, hparams)
        return cls(source, hparams, load_weights(source.parts, hparams, resident), moe_layers, threads)

    @property
    def path(self) -> Path:
        return self.source.paths[0]

    @property
    def vocab_size(self) -> int:
        return self.weights.vocab_size

    def new_kv_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache for `capacity` positions (default: the whole context)."""
        return KVCache(self.hparams, capacity or self.hparams.context_length)

    def embed(self, token_ids: np.ndarray | list[int]) -> np.ndarray:
        """Token embeddings float32 `[tokens, d_model]`."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise TokenizerError(f"token id {int(bad[0])} is outside the vocabulary of {self.vocab_size} tokens")
        return np.stack([self.weights.token_embedding.row(int(token)) for token in ids]).astype(np.float32)

    def attention_block(self, block: int, hidden: np.ndarray, kv_cache: KVCache, positions: np.ndarray) -> np.ndarray:
        """`hidden + attention(rms_norm(hidden))` for tokens at `positions` (the cache's next
        positions, in order); appends their keys and values to `kv_cache`."""
        return self.attention_blocks(block, hidden, [kv_cache], np.array([0, hidden.shape[0]]), positions)

    def attention_blocks(self, block: int, hidden: np.ndarray, kv_caches: list[KVCache], bounds: np.ndarray,
                         positions: np.ndarray) -> np.ndarray:
        """`attention_block` for several sequences at once: rows `bounds[i]:bounds[i+1]` of `hidden`
        continue the sequence in `kv_caches[i]`. The projections run on all rows together (each row's
        result does not depend on the others: tests/unit/test_batch_invariance.py), the attention of
        each sequence over its own cache."""
        hparams, weights = self.hparams, self.weights.blocks[block]
        positions = np.asarray(positions, dtype=np.int64)
        for kv_cache, start, stop in zip(kv_caches, bounds, bounds[1:]):
            _check_positions(block, kv_cache, positions[start:stop])
        x = rms_norm(hidden, weights.attn_norm, hparams.rms_norm_eps)
        if weights.mla is not None:  # deepseek2
            attended = mla_attention(hparams, weights.mla, x, kv_caches, block, bounds, positions,
                                     self._rope_tables(block, positions), self.threads)
            return hidden + weights.attn_output(attended, self.threads)
        queries, keys, values = (matrix(x, self.threads)  # type: ignore[misc]
                                 for matrix in (weights.attn_q, weights.attn_k, weights.attn_v))
        if weights.qkv_bias is not None:  # qwen2moe, gpt-oss: added before the head reshape and RoPE, as llama.cpp does
            queries, keys, values = (out + bias for out, bias in zip((queries, keys, values), weights.qkv_bias))
        queries, keys = self._qk_norm(weights, queries, keys)
        cos, sin = self._rope_tables(block, positions)
        queries = apply_rope(queries, cos, sin, hparams.rules.rope_style)
        keys = apply_rope(keys, cos, sin, hparams.rules.rope_style)
        values = values.reshape(-1, hparams.num_kv_heads, hparams.head_dim)
        window = hparams.sliding_window if hparams.is_sliding_block(block) else 0
        attended = []
        for kv_cache, start, stop in zip(kv_caches, bounds, bounds[1:]):
            kv_cache.store(block, keys[start:stop], values[start:stop])
            length = kv_cache.lengths[block]
            attended.append(causal_attention(queries[start:stop], kv_cache.keys[block, :length],
                                             kv_cache.values[block, :length], positions[start:stop],
                                             1.0 / np.sqrt(hparams.head_dim), window, weights.attn_sinks))
        out = weights.attn_output(attended[0] if len(attended) == 1 else np.concatenate(attended), self.threads)
        return hidden + (out if weights.attn_output_bias is None else out + weights.attn_output_bias)

    def _rope_tables(self, block: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hparams = self.hparams
        base = hparams.block_rope_base(block)
        if hparams.yarn.is_enabled:
            return yarn_rope_tables(positions, hparams.rope_dimensions, base, hparams.yarn)
        return rope_tables(positions, hparams.rope_dimensions, base, hparams.rope_position_scale)

    def _qk_norm(
        self, weights: BlockWeights, queries: np.ndarray, keys: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """q/k RMS norms (whole projection for olmoe, per head for qwen3moe), then `[T, heads, d]`."""
        hparams, eps = self.hparams, self.hparams.rms_norm_eps
        if hparams.rules.qk_norm == QK_NORM_WHOLE:
            queries, keys = rms_norm(queries, weights.attn_q_norm, eps), rms_norm(keys, weights.attn_k_norm, eps)
        queries = queries.reshape(-1, hparams.num_heads, hparams.head_dim)
        keys = keys.reshape(-1, hparams.num_kv_heads, hparams.head_dim)
        if hparams.rules.qk_norm == QK_NORM_PER_HEAD:  # glm4moe: each only where the file has it
            if weights.attn_q_norm is not None:
                queries = rms_norm(queries, weights.attn_q_norm, eps)
            if weights.attn_k_norm is not None:
                keys = rms_norm(keys, weights.attn_k_norm, eps)
        return queries, keys

    def ffn_input(self, block: int, hidden: np.ndarray) -> np.ndarray:
        """`rms_norm(hidden)` with the block's ffn_norm (gpt-oss: post_attention_norm): the input of the
        router and the experts."""
        return rms_norm(hidden, self.weights.blocks[block].ffn_norm, self.hparams.rms_norm_eps)

    def is_moe_block(self, block: int) -> bool:
        return block in self.moe_layers

    def route(self, block: int, normed: np.ndarray) -> Routing:
        """The experts (ids within the block) and gate weights of each token of a MoE block."""
        router = self.weights.blocks[block].router
        if router is None:
            raise ShapeError(f"block {block} is a dense block: it has no router")
        logits = router(normed, self.threads)
        bias = self.weights.blocks[block].router_bias
        if bias is not None:
            logits = logits + bias
        return route(self.hparams.routing_function, logits, self.hparams.top_k, self.weights.blocks[block].selection_bias)

    def shared_expert(self, block: int, normed: np.ndarray) -> np.ndarray | None:
        """The gated shared expert's output of a MoE block (`mer.model.shared_expert`), None without one."""
        shared = self.weights.blocks[block].shared_expert
        return None if shared is None else shared(normed, self.threads)

    def dense_ffn(self, block: int, normed: np.ndarray) -> np.ndarray:
        """The SwiGLU FFN of a dense block."""
        ffn = self.weights.blocks[block].dense_ffn
        if ffn is None:
            raise ShapeError(f"block {block} is a MoE block: it has no dense FFN")
        gate, up, down = ffn
        return down(silu_gate(gate(normed, self.threads), up(normed, self.threads)), self.threads)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Output norm and LM head: float32 `[tokens, vocab]`."""
        normed = rms_norm(hidden, self.weights.output_norm, self.hparams.rms_norm_eps)
        return self.weights.output(normed, self.threads)


def _check_positions(block: int, kv_cache: KVCache, positions: np.ndarray) -> None:
    """`positions` must be the next positions of `block` in `kv_cache`, and fit in it."""
    expected = kv_cache.lengths[block] + np.arange(positions.size)
    if positions.shape != expected.shape or not np.array_equal(positions, expected):
        raise ContextLengthError(f"block {block}: positions {positions.tolist()[:4]}... must continue the KV cache "
                                 f"at position {kv_cache.lengths[block]}")
    if expected.size and expected[-1] >= kv_cache.capacity:
        raise ContextLengthError(f"position {int(expected[-1])} does not fit in the KV cache of "
                                 f"{kv_cache.capacity} positions")


def check_model_matches_store(model: MoEModel, manifest: Manifest, path: str) -> None:
    """The run's store must hold this model's experts (same MoE layers, experts, d_model)."""
    geometry = manifest.geometry
    ours = (len(model.moe_layers), model.hparams.num_experts, model.hparams.d_model)
    theirs = (geometry.num_moe_layers, geometry.experts_per_layer, geometry.d_model)
    if ours != theirs:
        raise StoreError(f"{path}: the model has (MoE layers, experts, d_model) = {ours}, the expert store "
                         f"{theirs}: the store was not converted from this model")
