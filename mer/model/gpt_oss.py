"""gpt-oss (GGUF arch `gpt-oss`, llama.cpp's `LLM_ARCH_OPENAI_MOE`): its hyper-parameters.

Read from llama.cpp's `src/models/openai-moe.cpp` (`load_arch_hparams`, the graph) and
`llama-context.cpp` (YaRN): every block is MoE; attention has q/k/v/output biases and one sink
logit per head; blocks b with `b % period < period - 1` (period `attention.sliding_window_pattern`,
default 2: the even blocks) attend to the last `attention.sliding_window` positions only, the
others to all; RoPE is NEOX with YaRN (`rope.scaling.type` "yarn", `rope.scaling.factor`,
`rope.scaling.original_context_length`) over the whole head, scaled by 1 / sqrt(head size); the
FFN input is `post_attention_norm`; routing is the router logits plus bias, top-k on the raw
logits and a softmax over the k chosen (`LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT`); experts
have biases and the clamped SwiGLU (`mer.compute.expert_activation.swiglu_oai`).

Keys that would change the computation and that mer does not implement are refused by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mer.errors import UnsupportedModelError
from mer.model.rope_yarn import read_yarn

if TYPE_CHECKING:
    from mer.model.hparams import ArchitectureRules, HParams, _Metadata

DEFAULT_SLIDING_WINDOW_PERIOD = 2
UNSUPPORTED_KEYS = ("rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
                    "rope.scaling.yarn_ext_factor", "rope.dimension_count_swa", "attention.key_length_swa",
                    "attention.value_length_swa")


def gpt_oss_hparams(keys: "_Metadata", rules: "ArchitectureRules", architecture: str, d_model: int, num_heads: int,
                    num_kv_heads: int, head_dim: int, num_experts: int, top_k: int) -> "HParams":
    from mer.model.hparams import DEFAULT_ROPE_BASE, HParams, check

    path = keys.part.path
    for key in UNSUPPORTED_KEYS:
        if keys.part.value(f"{architecture}.{key}") is not None:
            raise UnsupportedModelError(f"{path}: metadata key {architecture}.{key} is not supported for {architecture}")
    check(path, num_heads % num_kv_heads == 0,
          f"attention.head_count {num_heads} is not a multiple of attention.head_count_kv {num_kv_heads}")
    check(path, top_k <= num_experts, f"expert_used_count {top_k} exceeds expert_count {num_experts}")
    rope_dimensions = keys.integer("rope.dimension_count", head_dim)
    check(path, rope_dimensions == head_dim, f"rope.dimension_count {rope_dimensions} differs from the head size {head_dim}")
    keys.integer("expert_feed_forward_length")  # required by llama.cpp; the tensors give d_ff
    rope_base = keys.number("rope.freq_base", DEFAULT_ROPE_BASE)
    context_length = keys.integer("context_length")
    return HParams(
        architecture=architecture, rules=rules, context_length=context_length, d_model=d_model,
        num_blocks=keys.integer("block_count"), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        rms_norm_eps=keys.number("attention.layer_norm_rms_epsilon"), rope_base=rope_base,
        rope_dimensions=rope_dimensions, rope_position_scale=1.0, num_experts=num_experts, top_k=top_k,
        expert_weights_scale=0.0, leading_dense_blocks=0,
        sliding_window=keys.integer("attention.sliding_window"),
        sliding_window_period=keys.integer("attention.sliding_window_pattern", DEFAULT_SLIDING_WINDOW_PERIOD),
        rope_base_swa=keys.number("rope.freq_base_swa", rope_base),
        yarn=read_yarn(keys, context_length),
    )
