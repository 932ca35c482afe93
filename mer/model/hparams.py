"""A MoE model's hyper-parameters, read from its GGUF metadata, and the per-architecture rules.

Supported architectures (`general.architecture`) and what llama.cpp fixes in code for each
(read from its `src/models/{llama,qwen3moe,olmoe}.cpp`, `llama_model_rope_type` and
`build_moe_ffn`), since not all of it is in the GGUF keys:

| arch       | RoPE pairs          | q/k RMS norm                      | gating                              |
|------------|---------------------|-----------------------------------|-------------------------------------|
| `llama` (Mixtral, needs `llama.expert_count`) | normal: (2i, 2i+1) | none | softmax, top-k, renormalised |
| `qwen3moe` | neox: (i, i + n/2)  | per head (`head_dim` weights)     | softmax, top-k, renormalised        |
| `olmoe`    | neox: (i, i + n/2)  | over the whole q / k projection   | softmax, top-k, not renormalised    |
| `qwen2moe` | neox: (i, i + n/2)  | none (q/k/v biases instead)       | softmax, top-k, not renormalised; plus a shared expert (`mer.model.shared_expert`) |
| `gpt-oss`  | neox, YaRN          | none (biases, sinks, sliding window: `mer.model.gpt_oss`) | logits + bias, top-k, softmax over k |
| `deepseek2`| normal, rope part of each head | MLA (`mer.model.mla`, keys: `mer.model.deepseek2`) | softmax or sigmoid, selection bias, grouped top-k (`mer.model.gating`); ungated shared expert |
| `glm4moe`  | neox on part of each head | per head, optional (keys: `mer.model.glm4moe`) | sigmoid, selection bias, normalised x scale; ungated shared expert; NextN blocks skipped |

Required keys (`{arch}.` prefix): `context_length`, `embedding_length`, `block_count`,
`attention.head_count`, `attention.layer_norm_rms_epsilon`, `expert_count`,
`expert_used_count`. Optional keys take llama.cpp's defaults: `attention.head_count_kv`
(= head_count), `attention.key_length` / `value_length` (= embedding_length / head_count),
`rope.freq_base` (10000), `rope.dimension_count` (= key_length; must equal it, as llama.cpp
asserts for these archs), `rope.scaling.type` (none; linear is supported, YaRN and others are
refused), `expert_weights_scale` (none), `leading_dense_block_count` (0, mer-only: dense first
blocks). qwen2moe also reads `expert_feed_forward_length` (default `feed_forward_length /
expert_used_count`) and `expert_shared_feed_forward_length` (default `feed_forward_length`), as
llama.cpp does; with neither key present the first missing one is named. A missing required key,
a wrong type or an unsupported architecture raises `UnsupportedModelError` / `GGUFError` naming the
file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mer.errors import GGUFError, UnsupportedModelError
from mer.model.gating import SCORE_SOFTMAX, SCORE_SOFTMAX_WEIGHT, RoutingFunction
from mer.model.rope_yarn import NO_YARN, YarnRope
from mer.store.gguf_files import GGUFPart

if TYPE_CHECKING:
    from mer.store.gguf_source import GGUFSource

ROPE_NORMAL = "normal"
ROPE_NEOX = "neox"
QK_NORM_NONE = "none"
QK_NORM_PER_HEAD = "per_head"
QK_NORM_WHOLE = "whole"
DEFAULT_ROPE_BASE = 10000.0
GATING_SOFTMAX = "softmax"
GATING_SOFTMAX_WEIGHT = "softmax_weight"


@dataclass(frozen=True)
class ArchitectureRules:
    """What llama.cpp fixes in code for one architecture."""

    rope_style: str  # ROPE_NORMAL or ROPE_NEOX
    qk_norm: str  # QK_NORM_NONE, QK_NORM_PER_HEAD or QK_NORM_WHOLE
    normalize_expert_weights: bool  # renormalise the top-k softmax probabilities to sum to 1
    qkv_bias: bool = False  # attn_q / attn_k / attn_v have bias vectors (qwen2moe, gpt-oss)
    shared_expert: bool = False  # a sigmoid-gated shared SwiGLU expert per MoE block (qwen2moe)
    gating: str = GATING_SOFTMAX  # GATING_SOFTMAX, or GATING_SOFTMAX_WEIGHT (top-k logits, softmax over k)
    ffn_norm: str = "ffn_norm"  # the norm tensor of the FFN input (gpt-oss: post_attention_norm)
    biases: bool = False  # output, router (ffn_gate_inp) and expert biases
    attention_sinks: bool = False  # one learned logit per head joins each softmax (attn_sinks)
    sliding_window: bool = False  # {arch}.attention.sliding_window on a pattern of blocks
    mla: bool = False  # multi-head latent attention, DeepSeek-V2/V3 (`mer.model.mla`, keys: `mer.model.deepseek2`)
    shared_expert_gate: bool = True  # the shared expert is scaled by sigmoid(ffn_gate_inp_shexp · x) (qwen2moe)
    qk_norm_optional: bool = False  # attn_q_norm / attn_k_norm may be absent from the file (glm4moe)


ARCHITECTURES: dict[str, ArchitectureRules] = {
    "llama": ArchitectureRules(ROPE_NORMAL, QK_NORM_NONE, normalize_expert_weights=True),
    "qwen3moe": ArchitectureRules(ROPE_NEOX, QK_NORM_PER_HEAD, normalize_expert_weights=True),
    "olmoe": ArchitectureRules(ROPE_NEOX, QK_NORM_WHOLE, normalize_expert_weights=False),
    "qwen2moe": ArchitectureRules(ROPE_NEOX, QK_NORM_NONE, normalize_expert_weights=False, qkv_bias=True,
                                  shared_expert=True),
    "gpt-oss": ArchitectureRules(ROPE_NEOX, QK_NORM_NONE, normalize_expert_weights=False, gating=GATING_SOFTMAX_WEIGHT,
                                 ffn_norm="post_attention_norm", qkv_bias=True, biases=True, attention_sinks=True,
                                 sliding_window=True),
    "deepseek2": ArchitectureRules(ROPE_NORMAL, QK_NORM_NONE, normalize_expert_weights=False, shared_expert=True,
                                   mla=True, shared_expert_gate=False),
    "glm4moe": ArchitectureRules(ROPE_NEOX, QK_NORM_PER_HEAD, normalize_expert_weights=False, qkv_bias=True,
                                 shared_expert=True, shared_expert_gate=False, ffn_norm="post_attention_norm",
                                 qk_norm_optional=True),
}


@dataclass(frozen=True)
class MLAShape:
    """The sizes of DeepSeek's multi-head latent attention (`mer.model.mla`)."""

    q_lora_rank: int  # 0: a plain attn_q (V2-Lite); else attn_q_a -> attn_q_a_norm -> attn_q_b
    kv_lora_rank: int  # the compressed kv per position
    qk_nope: int  # the part of each query/key head without RoPE
    qk_rope: int  # the RoPE part (one key shared by all heads)
    v_head: int  # each head's value size after attn_v_b


@dataclass(frozen=True)
class HParams:
    """Every hyper-parameter the forward pass needs."""

    architecture: str
    rules: ArchitectureRules
    context_length: int
    d_model: int
    num_blocks: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_base: float
    rope_dimensions: int
    rope_position_scale: float  # positions are multiplied by this (linear rope scaling: 1 / factor)
    num_experts: int
    top_k: int
    expert_weights_scale: float  # 0: the gate weights are not scaled
    leading_dense_blocks: int
    expert_d_ff: int = 0  # the metadata's expert hidden size (0: not given; the tensors decide)
    shared_expert_d_ff: int = 0  # the shared expert's hidden size (0: the architecture has none)
    sliding_window: int = 0  # tokens a sliding-window block sees (its own included); 0: none
    sliding_window_period: int = 0  # block b slides when b % period < period - 1 (llama.cpp's pattern)
    rope_base_swa: float = 0.0  # the RoPE base of sliding-window blocks (0: rope_base)
    yarn: YarnRope = NO_YARN
    routing: RoutingFunction | None = None  # None: the architecture's softmax routing (`routing_function`)
    mla: MLAShape | None = None  # deepseek2's latent attention sizes
    nextn_blocks: int = 0  # NextN blocks after the `num_blocks` run (glm4moe): never loaded, never run

    @property
    def routing_function(self) -> RoutingFunction:
        """How this model routes (`mer.model.gating`)."""
        if self.routing is not None:
            return self.routing
        score = SCORE_SOFTMAX_WEIGHT if self.rules.gating == GATING_SOFTMAX_WEIGHT else SCORE_SOFTMAX
        return RoutingFunction(score, self.rules.normalize_expert_weights, self.expert_weights_scale)

    @property
    def kv_floats_per_position(self) -> int:
        """Float32 values the KV cache holds per position and block: keys and values, or for MLA the
        compressed kv and the shared rope key (`kv_lora_rank + qk_rope`)."""
        if self.mla is not None:
            return self.mla.kv_lora_rank + self.mla.qk_rope
        return 2 * self.kv_width

    def is_sliding_block(self, block: int) -> bool:
        """True when `block`'s attention sees only the last `sliding_window` positions."""
        period = self.sliding_window_period
        return self.sliding_window > 0 and period > 0 and block % period < period - 1

    def block_rope_base(self, block: int) -> float:
        return self.rope_base_swa if self.is_sliding_block(block) and self.rope_base_swa else self.rope_base

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_block(self, block: int) -> bool:
        return block >= self.leading_dense_blocks


class _Metadata:
    """Typed access to one GGUF part's keys, with errors naming the file and key."""

    def __init__(self, part: GGUFPart, architecture: str):
        self.part, self.prefix = part, architecture

    def _value(self, key: str, default: Any) -> tuple[str, Any]:
        full = f"{self.prefix}.{key}"
        value = self.part.value(full)
        if value is None and default is None:
            raise UnsupportedModelError(f"{self.part.path}: metadata key {full} is missing")
        return full, default if value is None else value

    def integer(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        full, value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise GGUFError(f"{self.part.path}: metadata key {full} is {value!r}, expected an integer >= {minimum}")
        return value

    def number(self, key: str, default: float | None = None) -> float:
        full, value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise GGUFError(f"{self.part.path}: metadata key {full} is {value!r}, expected a number")
        return float(value)

    def text(self, key: str, default: str) -> str:
        full, value = self._value(key, default)
        if not isinstance(value, str):
            raise GGUFError(f"{self.part.path}: metadata key {full} is {value!r}, expected a string")
        return value


def architecture_rules(part: GGUFPart) -> tuple[str, ArchitectureRules]:
    """The model's architecture name and rules; UnsupportedModelError for any other."""
    architecture = part.value("general.architecture")
    if architecture is None:
        raise UnsupportedModelError(f"{part.path}: metadata key general.architecture is missing")
    if architecture not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{part.path}: architecture {architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    if part.value(f"{architecture}.expert_count") in (None, 0):
        raise UnsupportedModelError(
            f"{part.path}: {architecture} model without {architecture}.expert_count: a dense model, not a "
            f"Mixture-of-Experts model"
        )
    return architecture, ARCHITECTURES[architecture]


def read_hparams(part: GGUFPart) -> HParams:
    """Read and check every hyper-parameter from the (first) GGUF part's metadata."""
    architecture, rules = architecture_rules(part)
    keys = _Metadata(part, architecture)
    if rules.mla:
        from mer.model.deepseek2 import deepseek2_hparams  # its own module; it uses this one's definitions

        return deepseek2_hparams(keys, rules, architecture)
    if architecture == "glm4moe":
        from mer.model.glm4moe import glm4moe_hparams  # its own module; it uses this one's definitions

        return glm4moe_hparams(keys, rules, architecture)
    d_model = keys.integer("embedding_length")
    num_heads = keys.integer("attention.head_count")
    num_kv_heads = keys.integer("attention.head_count_kv", num_heads)
    head_dim = keys.integer("attention.key_length", d_model // num_heads)
    value_dim = keys.integer("attention.value_length", head_dim)
    num_experts = keys.integer("expert_count")
    top_k = keys.integer("expert_used_count")
    check(part.path, num_heads % num_kv_heads == 0,
           f"attention.head_count {num_heads} is not a multiple of attention.head_count_kv {num_kv_heads}")
    check(part.path, value_dim == head_dim, f"attention.value_length {value_dim} differs from key_length {head_dim}")
    check(part.path, top_k <= num_experts, f"expert_used_count {top_k} exceeds expert_count {num_experts}")
    rope_dimensions = keys.integer("rope.dimension_count", head_dim)
    if rules.sliding_window:
        from mer.model.gpt_oss import gpt_oss_hparams  # its own module; it uses this one's definitions

        return gpt_oss_hparams(keys, rules, architecture, d_model, num_heads, num_kv_heads, head_dim, num_experts, top_k)
    check(part.path, rope_dimensions == head_dim,
           f"rope.dimension_count {rope_dimensions} differs from the head size {head_dim} "
           f"(partial RoPE is not supported)")
    return HParams(
        architecture=architecture,
        rules=rules,
        context_length=keys.integer("context_length"),
        d_model=d_model,
        num_blocks=keys.integer("block_count"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=keys.number("attention.layer_norm_rms_epsilon"),
        rope_base=keys.number("rope.freq_base", DEFAULT_ROPE_BASE),
        rope_dimensions=rope_dimensions,
        rope_position_scale=rope_position_scale(keys),
        num_experts=num_experts,
        top_k=top_k,
        expert_weights_scale=keys.number("expert_weights_scale", 0.0),
        leading_dense_blocks=keys.integer("leading_dense_block_count", 0, minimum=0),
        **(_shared_expert_sizes(keys, top_k) if rules.shared_expert else {}),
    )


def _shared_expert_sizes(keys: _Metadata, top_k: int) -> dict[str, int]:
    """The expert and shared-expert hidden sizes, with llama.cpp's qwen2moe fallbacks to
    `feed_forward_length` (its value / k for the experts, itself for the shared expert)."""
    if keys.part.value(f"{keys.prefix}.feed_forward_length") is None:
        return {"expert_d_ff": keys.integer("expert_feed_forward_length"),
                "shared_expert_d_ff": keys.integer("expert_shared_feed_forward_length")}
    feed_forward = keys.integer("feed_forward_length")
    return {"expert_d_ff": keys.integer("expert_feed_forward_length", max(feed_forward // top_k, 1)),
            "shared_expert_d_ff": keys.integer("expert_shared_feed_forward_length", feed_forward)}


def rope_position_scale(keys: _Metadata) -> float:
    scaling = keys.text("rope.scaling.type", "none")
    if scaling == "none":
        return 1.0
    if scaling != "linear":
        raise UnsupportedModelError(
            f"{keys.part.path}: {keys.prefix}.rope.scaling.type {scaling!r} is not supported (none, linear)"
        )
    factor = keys.number("rope.scaling.factor", 1.0)
    check(keys.part.path, factor > 0, f"rope.scaling.factor {factor} must be positive")
    return 1.0 / factor


def check(path: Path, condition: bool, message: str) -> None:
    if not condition:
        raise GGUFError(f"{path}: {message}")


def moe_layers_of(source: GGUFSource, hparams: HParams) -> dict[int, int]:
    """Block index -> MoE layer index; the expert tensors must be in the blocks the metadata makes MoE blocks."""
    moe_layers = {layer.block: layer.moe_layer for layer in source.layers}
    num_moe_blocks = max(hparams.num_blocks - hparams.leading_dense_blocks, 0)
    if num_moe_blocks != len(moe_layers):  # before listing the blocks: block_count may be absurd
        raise GGUFError(f"{source.paths[0]}: {hparams.architecture}.block_count {hparams.num_blocks} with "
                        f"{hparams.leading_dense_blocks} leading dense blocks makes {num_moe_blocks} MoE blocks, but "
                        f"expert tensors are in {len(moe_layers)} blocks")
    expected = [block for block in range(hparams.num_blocks) if hparams.is_moe_block(block)]
    if sorted(moe_layers) != expected:
        raise GGUFError(f"{source.paths[0]}: expert tensors in blocks {sorted(moe_layers)}, but the metadata "
                        f"makes blocks {expected} MoE blocks")
    if hparams.expert_d_ff and hparams.expert_d_ff != source.geometry.d_ff:
        raise GGUFError(f"{source.paths[0]}: the metadata gives the experts a hidden size of {hparams.expert_d_ff} "
                        f"({hparams.architecture}.expert_feed_forward_length, or llama.cpp's default from "
                        f"feed_forward_length), but the expert tensors have {source.geometry.d_ff}")
    return moe_layers
