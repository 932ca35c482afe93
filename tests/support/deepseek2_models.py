"""Tiny DeepSeek-V2/V3 GGUF models (GGUF arch `deepseek2`) for tests, written with the `gguf` library.

The keys and tensors llama.cpp's `llama_model_deepseek2` loads, in the two styles it reads:

- "v2-lite" (DeepSeek-V2-Lite): `attention.q_lora_rank` 0 and a plain `attn_q`; softmax routing
  (no `expert_gating_func` key: llama.cpp's default for old V2 files), top-k without
  renormalisation, times `expert_weights_scale`;
- "v3" (DeepSeek-V3/R1, Kimi K2, Moonlight): `attn_q_a` -> `attn_q_a_norm` -> `attn_q_b`; sigmoid
  scores (`expert_gating_func` 2) with the selection-only bias `exp_probs_b.bias`, grouped top-k
  (`expert_group_count` groups, the best `expert_group_used_count` by the sum of their two best
  scores), weights normalised (`expert_weights_norm`) and times `expert_weights_scale`.

Both have MLA attention in the absorbed form the current converter writes: `attn_kv_a_mqa`
(compressed kv of `kv_lora_rank` values plus one shared rope key of `qk_rope` values),
`attn_kv_a_norm`, `attn_k_b` (GGML shape [qk_nope, kv_lora_rank, heads]) and `attn_v_b`
([kv_lora_rank, v_head, heads]), with the keys `attention.key_length` = kv_lora_rank + qk_rope,
`value_length` = kv_lora_rank, `key_length_mla` = qk_nope + qk_rope, `value_length_mla` = v_head,
`rope.dimension_count` = qk_rope, `head_count_kv` 1. Block 0 is dense
(`leading_dense_block_count` 1, `feed_forward_length`), the others MoE with merged experts
(`expert_feed_forward_length`) and an ungated shared expert (`ffn_{gate,up,down}_shexp`,
`expert_shared_count` x the expert width). `legacy_kv_b=True` writes the older unsplit `attn_kv_b`
instead of `attn_k_b`/`attn_v_b` and no `*_mla` keys (files mer refuses).

Vocabulary: byte-level BPE with the `deepseek-llm` (v2-lite) or `deepseek-v3` (v3) pre-tokenizer and
DeepSeek's special tokens; BOS is added as DeepSeek's files say. `yarn_factor` adds YaRN RoPE scaling as
DeepSeek's files have it (original context a quarter of the context, `yarn_log_multiplier` 0.0707).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import ExpertGatingFuncType, GGUFWriter, RopeScalingType

from tests.support.gguf_models import (_TensorList, add_dense_swiglu, add_random_matrix, add_routed_and_shared_experts,
                                       add_special_bpe_vocabulary, random_norm, write_tensors_and_close)

STYLES = ("v2-lite", "v3")
DEEPSEEK_SPECIALS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>")
DEEPSEEK_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}<｜User｜>"
                     "{{ message['content'] }}{% else %}<｜Assistant｜>{{ message['content'] }}<｜end▁of▁sentence｜>"
                     "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


@dataclass(frozen=True)
class TinyDeepseek2Info:
    path: Path
    style: str
    n_layers: int
    n_experts: int
    top_k: int
    d_model: int
    d_ff: int  # expert hidden size
    dense_d_ff: int
    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    n_shared: int
    vocab_size: int
    expert_dtype: str
    dense_dtype: str
    groups: int
    groups_used: int

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        return tuple(range(1, self.n_layers))


def write_tiny_deepseek2_gguf(path: str | Path, *, style: str = "v2-lite", expert_dtype: str = "q4_0",
                              dense_dtype: str = "f32", n_layers: int = 3, n_experts: int = 16, top_k: int | None = None,
                              d_model: int = 64, d_ff: int = 64, dense_d_ff: int = 128, n_heads: int = 4,
                              kv_lora_rank: int = 64, qk_nope: int = 32, qk_rope: int = 16, v_head: int = 32,
                              q_lora_rank: int = 64, n_shared: int = 1, vocab_size: int = 400,
                              context_length: int = 256, seed: int = 0, legacy_kv_b: bool = False,
                              extra_keys: dict[str, float | int] | None = None, yarn_factor: float = 0.0,
                              chat_template: str = DEEPSEEK_TEMPLATE) -> TinyDeepseek2Info:
    """Write a tiny deepseek2 model of `style` ("v2-lite" or "v3") to `path` and describe it."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}")
    v3 = style == "v3"
    info = TinyDeepseek2Info(Path(path), style, n_layers, n_experts, top_k or (4 if v3 else 2), d_model, d_ff,
                             dense_d_ff, n_heads, q_lora_rank if v3 else 0, kv_lora_rank, qk_nope, qk_rope, v_head,
                             n_shared, vocab_size, expert_dtype, dense_dtype, 4 if v3 else 1, 2 if v3 else 1)
    writer = GGUFWriter(path, "deepseek2")
    writer.add_name(f"tiny-deepseek2-{style}")
    writer.add_context_length(context_length)
    writer.add_embedding_length(d_model)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(dense_d_ff)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(n_experts)
    writer.add_expert_used_count(info.top_k)
    writer.add_leading_dense_block_count(1)
    writer.add_q_lora_rank(info.q_lora_rank)
    writer.add_kv_lora_rank(kv_lora_rank)
    if legacy_kv_b:
        writer.add_key_length(qk_nope + qk_rope)
        writer.add_value_length(v_head)
    else:
        writer.add_key_length(kv_lora_rank + qk_rope)
        writer.add_value_length(kv_lora_rank)
        writer.add_key_length_mla(qk_nope + qk_rope)
        writer.add_value_length_mla(v_head)
    writer.add_rope_dimension_count(qk_rope)
    if yarn_factor:  # as convert_hf_to_gguf writes DeepSeek's rope_scaling (mscale_all_dim 0.707)
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(yarn_factor)
        writer.add_rope_scaling_orig_ctx_len(context_length // 4)
        writer.add_rope_scaling_yarn_log_mul(0.1 * 0.707)
    writer.add_expert_feed_forward_length(d_ff)
    writer.add_expert_shared_count(n_shared)
    if v3:
        writer.add_expert_weights_scale(2.5)
        writer.add_expert_weights_norm(True)
        writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
        writer.add_uint32("deepseek2.expert_group_count", info.groups)
        writer.add_uint32("deepseek2.expert_group_used_count", info.groups_used)
    else:
        writer.add_expert_weights_scale(1.5)  # no expert_gating_func: softmax, as old V2 files
    for key, value in (extra_keys or {}).items():  # ints as uint32, floats as float32
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(f"deepseek2.{key}", value)
    add_special_bpe_vocabulary(writer, vocab_size, DEEPSEEK_SPECIALS, "deepseek-v3" if v3 else "deepseek-llm",
                               DEEPSEEK_SPECIALS[0], DEEPSEEK_SPECIALS[1], True)
    writer.add_chat_template(chat_template)
    write_tensors_and_close(writer, _tensors(np.random.default_rng(seed), info, legacy_kv_b))
    return info


_norm, _matrix = random_norm, add_random_matrix


def _tensors(rng: np.random.Generator, info: TinyDeepseek2Info, legacy_kv_b: bool) -> _TensorList:
    tensors = _TensorList()
    dense, d_model, heads = info.dense_dtype, info.d_model, info.n_heads
    q_head = info.qk_nope + info.qk_rope
    _matrix(tensors, rng, "token_embd.weight", dense, (info.vocab_size, d_model), 1.0)
    for block in range(info.n_layers):
        prefix = f"blk.{block}"
        tensors.add(f"{prefix}.attn_norm.weight", _norm(rng, d_model))
        if info.q_lora_rank:
            _matrix(tensors, rng, f"{prefix}.attn_q_a.weight", dense, (info.q_lora_rank, d_model), 1 / math.sqrt(d_model))
            tensors.add(f"{prefix}.attn_q_a_norm.weight", _norm(rng, info.q_lora_rank))
            _matrix(tensors, rng, f"{prefix}.attn_q_b.weight", dense, (heads * q_head, info.q_lora_rank),
                    1 / math.sqrt(info.q_lora_rank))
        else:
            _matrix(tensors, rng, f"{prefix}.attn_q.weight", dense, (heads * q_head, d_model), 1 / math.sqrt(d_model))
        _matrix(tensors, rng, f"{prefix}.attn_kv_a_mqa.weight", dense, (info.kv_lora_rank + info.qk_rope, d_model),
                1 / math.sqrt(d_model))
        tensors.add(f"{prefix}.attn_kv_a_norm.weight", _norm(rng, info.kv_lora_rank))
        if legacy_kv_b:
            _matrix(tensors, rng, f"{prefix}.attn_kv_b.weight", dense, (heads * (info.qk_nope + info.v_head),
                                                                        info.kv_lora_rank), 1 / math.sqrt(info.kv_lora_rank))
        else:
            _matrix(tensors, rng, f"{prefix}.attn_k_b.weight", dense, (heads, info.kv_lora_rank, info.qk_nope),
                    1 / math.sqrt(info.qk_nope))
            _matrix(tensors, rng, f"{prefix}.attn_v_b.weight", dense, (heads, info.v_head, info.kv_lora_rank),
                    1 / math.sqrt(info.kv_lora_rank))
        _matrix(tensors, rng, f"{prefix}.attn_output.weight", dense, (d_model, heads * info.v_head),
                0.3 / math.sqrt(heads * info.v_head))
        tensors.add(f"{prefix}.ffn_norm.weight", _norm(rng, d_model))
        if block not in info.moe_blocks:
            add_dense_swiglu(tensors, rng, prefix, dense, d_model, info.dense_d_ff)
            continue
        add_routed_and_shared_experts(tensors, rng, prefix, n_experts=info.n_experts, d_model=d_model, d_ff=info.d_ff,
                                      shared_d_ff=info.d_ff * info.n_shared, expert_dtype=info.expert_dtype,
                                      shared_dtype=info.expert_dtype, selection_bias=info.style == "v3")
    tensors.add("output_norm.weight", _norm(rng, d_model))
    _matrix(tensors, rng, "output.weight", dense, (info.vocab_size, d_model), 1 / math.sqrt(d_model))
    return tensors
