"""DeepSeek-V2/V3 (GGUF arch `deepseek2`: DeepSeek V2/V2-Lite/V3/R1, Kimi K2, Moonlight): its hyper-parameters.

Read from llama.cpp's `llama_model_deepseek2` (`load_arch_hparams`, `load_arch_tensors`, the graph)
and `build_moe_ffn`:

- attention is MLA in the absorbed form (`mer.model.mla`): `attention.kv_lora_rank`,
  `attention.q_lora_rank` (0: a plain `attn_q`), `attention.key_length_mla` (= qk_nope + qk_rope per
  head), `attention.value_length_mla` (v_head), `rope.dimension_count` (qk_rope); the plain
  `key_length` / `value_length` are the compressed sizes (kv_lora_rank + qk_rope, kv_lora_rank) and
  `head_count_kv` is 1. Files of older converters (no `*_mla` keys, one `attn_kv_b` per block) are
  refused, naming the tensor;
- routing (`mer.model.gating`): `expert_gating_func` (absent or 1: softmax, as the old V2 files;
  2: sigmoid), `exp_probs_b.bias` (selection only, `mer.model.weights`), `expert_group_count` /
  `expert_group_used_count` (grouped top-k), `expert_weights_norm` (default false),
  `expert_weights_scale`;
- `leading_dense_block_count` dense blocks first (`feed_forward_length`), then MoE blocks with
  `expert_feed_forward_length` experts and an ungated shared expert `expert_shared_count` x as wide.

RoPE: none, or YaRN (`rope.scaling.type` "yarn", `factor`, `original_context_length`,
`yarn_log_multiplier`, which llama.cpp divides by 0.1 and uses for the attention scale: `mer.model.mla`).
Keys that would change the computation and that mer does not implement are refused by name: other RoPE
scalings, YaRN's beta / ext_factor overrides, attention temperature scaling, NextN (multi-token
prediction) layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mer.errors import UnsupportedModelError
from mer.model.rope_yarn import YarnRope, read_yarn
from mer.model.gating import SCORE_SIGMOID, SCORE_SOFTMAX, SCORE_SOFTMAX_WEIGHT, RoutingFunction

if TYPE_CHECKING:
    from mer.model.hparams import ArchitectureRules, HParams, _Metadata

GATING_FUNCTIONS = {0: SCORE_SOFTMAX, 1: SCORE_SOFTMAX, 2: SCORE_SIGMOID, 3: SCORE_SOFTMAX_WEIGHT}  # llama.cpp's enum
UNSUPPORTED_KEYS = ("attention.temperature_scale", "attention.temperature_length", "rope.scaling.yarn_beta_fast",
                    "rope.scaling.yarn_beta_slow", "rope.scaling.yarn_ext_factor")
YARN_LOG_MULTIPLIER_UNIT = 0.1  # the converter writes 0.1 x mscale_all_dim; llama.cpp divides it out


def deepseek2_hparams(keys: "_Metadata", rules: "ArchitectureRules", architecture: str) -> "HParams":
    from mer.model.hparams import DEFAULT_ROPE_BASE, HParams, MLAShape, check

    path, part = keys.part.path, keys.part
    for key in UNSUPPORTED_KEYS:
        if part.value(f"{architecture}.{key}") is not None:
            raise UnsupportedModelError(f"{path}: metadata key {architecture}.{key} is not supported for {architecture}")
    if keys.integer("nextn_predict_layers", 0, minimum=0):
        raise UnsupportedModelError(f"{path}: {architecture}.nextn_predict_layers is "
                                    f"{keys.integer('nextn_predict_layers', 0, minimum=0)}: NextN (multi-token "
                                    f"prediction) layers are not supported")
    if part.value(f"{architecture}.attention.key_length_mla") is None:
        raise UnsupportedModelError(
            f"{path}: metadata key {architecture}.attention.key_length_mla is missing: a file of an older converter "
            f"with the unsplit MLA tensor blk.0.attn_kv_b.weight, not supported (mer reads attn_k_b and attn_v_b; "
            f"convert the model again with a current convert_hf_to_gguf.py)")
    d_model = keys.integer("embedding_length")
    num_heads = keys.integer("attention.head_count")
    kv_lora_rank = keys.integer("attention.kv_lora_rank")
    qk_rope = keys.integer("rope.dimension_count")
    head_dim = keys.integer("attention.key_length_mla")
    v_head = keys.integer("attention.value_length_mla")
    check(path, head_dim > qk_rope, f"attention.key_length_mla {head_dim} must exceed rope.dimension_count {qk_rope}")
    check(path, qk_rope % 2 == 0, f"rope.dimension_count {qk_rope} must be even")
    check(path, keys.integer("attention.head_count_kv", 1) == 1,
          f"attention.head_count_kv {keys.integer('attention.head_count_kv', 1)} must be 1 (MLA's one latent kv)")
    check(path, keys.integer("attention.key_length", kv_lora_rank + qk_rope) == kv_lora_rank + qk_rope,
          f"attention.key_length must be kv_lora_rank + rope.dimension_count = {kv_lora_rank + qk_rope}")
    check(path, keys.integer("attention.value_length", kv_lora_rank) == kv_lora_rank,
          f"attention.value_length must be kv_lora_rank = {kv_lora_rank}")
    num_experts, top_k = keys.integer("expert_count"), keys.integer("expert_used_count")
    check(path, top_k <= num_experts, f"expert_used_count {top_k} exceeds expert_count {num_experts}")
    expert_d_ff = keys.integer("expert_feed_forward_length")
    return HParams(
        architecture=architecture, rules=rules, context_length=keys.integer("context_length"), d_model=d_model,
        num_blocks=keys.integer("block_count"), num_heads=num_heads, num_kv_heads=1, head_dim=head_dim,
        rms_norm_eps=keys.number("attention.layer_norm_rms_epsilon"),
        rope_base=keys.number("rope.freq_base", DEFAULT_ROPE_BASE), rope_dimensions=qk_rope, rope_position_scale=1.0,
        num_experts=num_experts, top_k=top_k, expert_weights_scale=keys.number("expert_weights_scale", 0.0),
        leading_dense_blocks=keys.integer("leading_dense_block_count", 0, minimum=0), expert_d_ff=expert_d_ff,
        shared_expert_d_ff=expert_d_ff * keys.integer("expert_shared_count"),
        routing=routing_function(keys, num_experts), yarn=_yarn(keys),
        mla=MLAShape(keys.integer("attention.q_lora_rank", 0, minimum=0), kv_lora_rank, head_dim - qk_rope, qk_rope,
                     v_head),
    )


def _yarn(keys: "_Metadata") -> YarnRope:
    """YaRN as llama.cpp applies it to deepseek2 (`mer.model.rope_yarn`; the attention scale: `mer.model.mla`)."""
    log_multiplier = np.float32(keys.number("rope.scaling.yarn_log_multiplier", 0.0)) / np.float32(
        YARN_LOG_MULTIPLIER_UNIT)
    return read_yarn(keys, keys.integer("context_length"), float(log_multiplier))


def routing_function(keys: "_Metadata", num_experts: int, unset: str = SCORE_SOFTMAX) -> RoutingFunction:
    """The routing function of the keys; `unset` is the score of an absent or 0 `expert_gating_func`
    (deepseek2: softmax; glm4moe: sigmoid)."""
    from mer.model.hparams import check

    path, prefix = keys.part.path, keys.prefix
    gating = keys.integer("expert_gating_func", 0, minimum=0)
    if gating not in GATING_FUNCTIONS:
        raise UnsupportedModelError(f"{path}: {prefix}.expert_gating_func {gating} is not supported "
                                    f"(1: softmax; 2: sigmoid; 3: softmax over the top-k; 0: {unset})")
    normalize = keys.part.value(f"{prefix}.expert_weights_norm")
    if normalize is not None and not isinstance(normalize, bool):
        raise UnsupportedModelError(f"{path}: metadata key {prefix}.expert_weights_norm is {normalize!r}, "
                                    f"expected a boolean")
    groups = keys.integer("expert_group_count", 0, minimum=0)
    groups_used = keys.integer("expert_group_used_count", 0, minimum=0)
    if groups > 1:
        check(path, num_experts % groups == 0,
              f"expert_count {num_experts} is not a multiple of expert_group_count {groups}")
        check(path, 1 <= groups_used <= groups,
              f"expert_group_used_count {groups_used} must be in 1..expert_group_count {groups}")
    return RoutingFunction(GATING_FUNCTIONS[gating] if gating else unset, bool(normalize), keys.number("expert_weights_scale", 0.0),
                           max(groups, 1), groups_used if groups > 1 else 1)
