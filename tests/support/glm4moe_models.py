"""Tiny GLM-4.5-style GGUF models (GGUF arch `glm4moe`) for tests, written with the `gguf` library.

The keys and tensors llama.cpp's `llama_model_glm4_moe` loads: `n_layers` blocks the model runs
(block 0 dense, `leading_dense_block_count` 1, `feed_forward_length`; the others MoE with merged
experts of `expert_feed_forward_length` and an ungated shared expert `ffn_{gate,up,down}_shexp`,
`expert_shared_count` 1), then `n_nextn` NextN (multi-token prediction) blocks at the end of the file
(`nextn_predict_layers`; `block_count` counts them): a whole MoE block plus `nextn.eh_proj`,
`nextn.enorm`, `nextn.hnorm` and `nextn.shared_head_norm`, which llama.cpp loads but never runs and
mer skips. The NextN block's experts are written as `nextn_expert_dtype` (default: the experts' own).

Attention: q/k/v with biases, grouped-query heads (4 query heads, 2 KV heads of 32), per-head
`attn_q_norm` / `attn_k_norm` when `qk_norm` (GLM-4.5 has them; llama.cpp treats them as optional),
NEOX RoPE on the first half of each head (`rope.dimension_count` 16), the FFN input norm
`post_attention_norm`. Routing as GLM-4.5's files say: sigmoid (`expert_gating_func` 2, or absent with
`gating_key=False`: llama.cpp's default for glm4moe), the selection-only bias `exp_probs_b.bias`,
weights normalised (`expert_weights_norm`) times `expert_weights_scale` 2.5.

Vocabulary: byte-level BPE with the `glm4` pre-tokenizer and GLM's special tokens, BOS `[gMASK]` not
added (`add_bos_token` false).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import ExpertGatingFuncType, GGUFWriter

from tests.support.gguf_models import (_TensorList, add_dense_swiglu, add_random_matrix, add_routed_and_shared_experts,
                                       add_special_bpe_vocabulary, random_norm, write_tensors_and_close)

GLM_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>")
GLM_TEMPLATE = ("[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass(frozen=True)
class TinyGlm4MoeInfo:
    path: Path
    n_layers: int  # blocks the model runs (the NextN blocks come after them)
    n_nextn: int
    n_experts: int
    top_k: int
    d_model: int
    d_ff: int  # expert hidden size
    dense_d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dims: int
    qk_norm: bool
    vocab_size: int
    expert_dtype: str
    dense_dtype: str

    @property
    def block_count(self) -> int:
        return self.n_layers + self.n_nextn

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        """The MoE blocks the model runs (the NextN blocks, MoE blocks too, are not among them)."""
        return tuple(range(1, self.n_layers))

    @property
    def nextn_blocks(self) -> tuple[int, ...]:
        return tuple(range(self.n_layers, self.block_count))


def write_tiny_glm4moe_gguf(path: str | Path, *, expert_dtype: str = "q4_0", dense_dtype: str = "f32",
                            n_layers: int = 3, n_nextn: int = 1, n_experts: int = 16, top_k: int = 4,
                            d_model: int = 64, d_ff: int = 64, dense_d_ff: int = 128, n_heads: int = 4,
                            n_kv_heads: int = 2, head_dim: int = 32, rope_dims: int = 16, qk_norm: bool = True,
                            vocab_size: int = 400, context_length: int = 256, seed: int = 0, gating_key: bool = True,
                            nextn_expert_dtype: str | None = None,
                            extra_keys: dict[str, float | int] | None = None) -> TinyGlm4MoeInfo:
    """Write a tiny glm4moe model to `path` and describe it."""
    info = TinyGlm4MoeInfo(Path(path), n_layers, n_nextn, n_experts, top_k, d_model, d_ff, dense_d_ff, n_heads,
                           n_kv_heads, head_dim, rope_dims, qk_norm, vocab_size, expert_dtype, dense_dtype)
    writer = GGUFWriter(path, "glm4moe")
    writer.add_name("tiny-glm4moe")
    writer.add_context_length(context_length)
    writer.add_embedding_length(d_model)
    writer.add_block_count(info.block_count)
    writer.add_feed_forward_length(dense_d_ff)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_freq_base(1000000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_expert_count(n_experts)
    writer.add_expert_used_count(top_k)
    writer.add_expert_shared_count(1)
    writer.add_expert_feed_forward_length(d_ff)
    writer.add_leading_dense_block_count(1)
    writer.add_expert_weights_scale(2.5)
    writer.add_expert_weights_norm(True)
    if gating_key:
        writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    if n_nextn:
        writer.add_nextn_predict_layers(n_nextn)
    for key, value in (extra_keys or {}).items():  # ints as uint32, floats as float32
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(f"glm4moe.{key}", value)
    add_special_bpe_vocabulary(writer, vocab_size, GLM_SPECIALS, "glm4", "[gMASK]", "<|endoftext|>", False)
    writer.add_chat_template(GLM_TEMPLATE)
    write_tensors_and_close(writer, _tensors(np.random.default_rng(seed), info, nextn_expert_dtype or expert_dtype))
    return info


def _tensors(rng: np.random.Generator, info: TinyGlm4MoeInfo, nextn_expert_dtype: str) -> _TensorList:
    tensors = _TensorList()
    dense, d_model = info.dense_dtype, info.d_model
    q_width, kv_width = info.n_heads * info.head_dim, info.n_kv_heads * info.head_dim
    add_random_matrix(tensors, rng, "token_embd.weight", dense, (info.vocab_size, d_model), 1.0)
    for block in range(info.block_count):
        prefix = f"blk.{block}"
        tensors.add(f"{prefix}.attn_norm.weight", random_norm(rng, d_model))
        for name, width in (("q", q_width), ("k", kv_width), ("v", kv_width)):
            add_random_matrix(tensors, rng, f"{prefix}.attn_{name}.weight", dense, (width, d_model), 1 / math.sqrt(d_model))
            tensors.add(f"{prefix}.attn_{name}.bias", (rng.standard_normal(width) * 0.1).astype(np.float32))
        if info.qk_norm:
            tensors.add(f"{prefix}.attn_q_norm.weight", random_norm(rng, info.head_dim))
            tensors.add(f"{prefix}.attn_k_norm.weight", random_norm(rng, info.head_dim))
        add_random_matrix(tensors, rng, f"{prefix}.attn_output.weight", dense, (d_model, q_width), 0.3 / math.sqrt(q_width))
        tensors.add(f"{prefix}.post_attention_norm.weight", random_norm(rng, d_model))
        if block == 0:
            add_dense_swiglu(tensors, rng, prefix, dense, d_model, info.dense_d_ff)
            continue
        add_routed_and_shared_experts(
            tensors, rng, prefix, n_experts=info.n_experts, d_model=d_model, d_ff=info.d_ff, shared_d_ff=info.d_ff,
            expert_dtype=nextn_expert_dtype if block in info.nextn_blocks else info.expert_dtype,
            shared_dtype=info.expert_dtype, selection_bias=True)
        if block in info.nextn_blocks:
            add_random_matrix(tensors, rng, f"{prefix}.nextn.eh_proj.weight", dense, (d_model, 2 * d_model),
                    1 / math.sqrt(2 * d_model))
            for name in ("enorm", "hnorm", "shared_head_norm"):
                tensors.add(f"{prefix}.nextn.{name}.weight", random_norm(rng, d_model))
    tensors.add("output_norm.weight", random_norm(rng, d_model))
    add_random_matrix(tensors, rng, "output.weight", dense, (info.vocab_size, d_model), 1 / math.sqrt(d_model))
    return tensors
