"""GLM-4.5 / 4.6 (-Air) (GGUF arch `glm4moe`, llama.cpp's `LLM_ARCH_GLM4_MOE`): its hyper-parameters.

Read from llama.cpp's `src/models/glm4-moe.cpp` (`load_arch_hparams`, `load_arch_tensors`, the graph)
and `build_moe_ffn`:

- attention: q/k/v with biases, optional per-head RMS norms of q and k (`attn_q_norm` /
  `attn_k_norm`, `head_dim` weights; GLM-4.5 has them, some conversions not), NEOX RoPE on the first
  `rope.dimension_count` values of each head (GLM: half of it; the rest passes unrotated), scale
  1 / sqrt(head size); the FFN input is `post_attention_norm`;
- routing (`mer.model.gating`): `expert_gating_func` (absent or 0: sigmoid, llama.cpp's default for
  this arch), the selection-only bias `exp_probs_b.bias`, `expert_weights_norm` (default false),
  `expert_weights_scale`;
- `leading_dense_block_count` dense blocks first (`feed_forward_length`), then MoE blocks with
  `expert_feed_forward_length` experts and an ungated shared expert `expert_shared_count` x as wide
  (`mer.model.shared_expert`);
- the last `nextn_predict_layers` blocks of the file are NextN (multi-token prediction) layers that
  llama.cpp loads but never runs: mer skips them (`mer.store.gguf_source`: never converted, never
  loaded, never counted); `num_blocks` is `block_count` less them.

Keys that would change the computation and that mer does not implement are refused by name
(multi-section RoPE `rope.dimension_sections`, RoPE scalings other than linear).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mer.errors import UnsupportedModelError
from mer.model.deepseek2 import routing_function
from mer.model.gating import SCORE_SIGMOID

if TYPE_CHECKING:
    from mer.model.hparams import ArchitectureRules, HParams, _Metadata

UNSUPPORTED_KEYS = ("rope.dimension_sections",)


def glm4moe_hparams(keys: "_Metadata", rules: "ArchitectureRules", architecture: str) -> "HParams":
    from mer.model.hparams import DEFAULT_ROPE_BASE, HParams, check, rope_position_scale

    path, part = keys.part.path, keys.part
    for key in UNSUPPORTED_KEYS:
        if part.value(f"{architecture}.{key}") is not None:
            raise UnsupportedModelError(f"{path}: metadata key {architecture}.{key} is not supported for {architecture}")
    d_model = keys.integer("embedding_length")
    num_heads = keys.integer("attention.head_count")
    num_kv_heads = keys.integer("attention.head_count_kv", num_heads)
    head_dim = keys.integer("attention.key_length", d_model // num_heads)
    value_dim = keys.integer("attention.value_length", head_dim)
    check(path, num_heads % num_kv_heads == 0,
          f"attention.head_count {num_heads} is not a multiple of attention.head_count_kv {num_kv_heads}")
    check(path, value_dim == head_dim, f"attention.value_length {value_dim} differs from key_length {head_dim}")
    rope_dimensions = keys.integer("rope.dimension_count", head_dim)
    check(path, rope_dimensions <= head_dim and rope_dimensions % 2 == 0,
          f"rope.dimension_count {rope_dimensions} must be even and at most the head size {head_dim}")
    num_experts, top_k = keys.integer("expert_count"), keys.integer("expert_used_count")
    check(path, top_k <= num_experts, f"expert_used_count {top_k} exceeds expert_count {num_experts}")
    block_count = keys.integer("block_count")
    nextn = keys.integer("nextn_predict_layers", 0, minimum=0)
    check(path, nextn < block_count, f"nextn_predict_layers {nextn} must be below block_count {block_count}")
    expert_d_ff = keys.integer("expert_feed_forward_length")
    return HParams(
        architecture=architecture, rules=rules, context_length=keys.integer("context_length"), d_model=d_model,
        num_blocks=block_count - nextn, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        rms_norm_eps=keys.number("attention.layer_norm_rms_epsilon"),
        rope_base=keys.number("rope.freq_base", DEFAULT_ROPE_BASE), rope_dimensions=rope_dimensions,
        rope_position_scale=rope_position_scale(keys), num_experts=num_experts, top_k=top_k,
        expert_weights_scale=keys.number("expert_weights_scale", 0.0),
        leading_dense_blocks=keys.integer("leading_dense_block_count", 0, minimum=0), expert_d_ff=expert_d_ff,
        shared_expert_d_ff=expert_d_ff * keys.integer("expert_shared_count", minimum=0),
        routing=routing_function(keys, num_experts, unset=SCORE_SIGMOID), nextn_blocks=nextn,
    )
