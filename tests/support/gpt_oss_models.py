"""Tiny gpt-oss GGUF models (GGUF arch `gpt-oss`) for tests, written with the `gguf` library.

The tensors and keys llama.cpp's `llama_model_openai_moe` loads: token embedding, per block
`attn_norm`, `attn_{q,k,v,output}` with biases, `attn_sinks` (one logit per head),
`post_attention_norm` (the FFN input norm), the router `ffn_gate_inp` with its bias, the merged
experts `ffn_{gate,up,down}_exps` with their f32 biases, then `output_norm` and `output`. Keys:
`attention.sliding_window` (even blocks slide), YaRN RoPE (`rope.scaling.type` "yarn",
`rope.scaling.factor`, `rope.scaling.original_context_length`), and a byte-level BPE vocabulary
with the o200k pre-tokenizer ("gpt-4o") and gpt-oss's special tokens.

`expert_dtype` is the experts' type (mxfp4 as real files, or f32), `dense_dtype` the type of the
embedding, attention and output matrices (q8_0 as real files, or f32); norms, sinks, router and
biases are f32. The head size (`key_length`) is 32 with 4 heads over d_model 64, so the
q width (128) differs from d_model as in gpt-oss-20b (64 x 64 over 2880).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from tests.support.gguf_models import (_TensorList, add_special_bpe_vocabulary, random_weight_bytes,
                                       write_tensors_and_close)

GPT_OSS_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                    "<|end|>", "<|message|>", "<|call|>")
GPT_OSS_TEMPLATE = ("{% for message in messages %}<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}"
                    "<|end|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")


@dataclass(frozen=True)
class TinyGptOssInfo:
    path: Path
    n_layers: int
    n_experts: int
    top_k: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    sliding_window: int
    expert_dtype: str
    dense_dtype: str


def write_tiny_gpt_oss_gguf(path: str | Path, *, expert_dtype: str = "mxfp4", dense_dtype: str = "q8_0",
                            n_layers: int = 2, n_experts: int = 8, top_k: int = 2, d_model: int = 64, d_ff: int = 128,
                            n_heads: int = 4, n_kv_heads: int = 2, head_dim: int = 32, vocab_size: int = 400,
                            sliding_window: int = 8, yarn_factor: float = 4.0, original_context: int = 64,
                            context_length: int = 256, seed: int = 0, omit_key: str | None = None,
                            extra_float_keys: dict[str, float] | None = None,
                            chat_template: str = GPT_OSS_TEMPLATE) -> TinyGptOssInfo:
    """Write a tiny gpt-oss model to `path`; `omit_key` leaves one metadata key out and
    `extra_float_keys` adds `gpt-oss.KEY` float32 keys (error tests)."""
    info = TinyGptOssInfo(Path(path), n_layers, n_experts, top_k, d_model, d_ff, n_heads, n_kv_heads, head_dim,
                          vocab_size, sliding_window, expert_dtype, dense_dtype)
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "gpt-oss")
    keys = {
        "context_length": (writer.add_uint32, context_length), "embedding_length": (writer.add_uint32, d_model),
        "block_count": (writer.add_uint32, n_layers), "feed_forward_length": (writer.add_uint32, d_ff),
        "expert_feed_forward_length": (writer.add_uint32, d_ff), "attention.head_count": (writer.add_uint32, n_heads),
        "attention.head_count_kv": (writer.add_uint32, n_kv_heads), "attention.key_length": (writer.add_uint32, head_dim),
        "attention.value_length": (writer.add_uint32, head_dim), "rope.dimension_count": (writer.add_uint32, head_dim),
        "attention.layer_norm_rms_epsilon": (writer.add_float32, 1e-5), "rope.freq_base": (writer.add_float32, 150000.0),
        "expert_count": (writer.add_uint32, n_experts), "expert_used_count": (writer.add_uint32, top_k),
        "attention.sliding_window": (writer.add_uint32, sliding_window),
        "rope.scaling.type": (writer.add_string, "yarn"), "rope.scaling.factor": (writer.add_float32, yarn_factor),
        "rope.scaling.original_context_length": (writer.add_uint32, original_context),
    }
    writer.add_name("tiny-gpt-oss")
    for key, (add, value) in keys.items():
        if key != omit_key:
            add(f"gpt-oss.{key}", value)
    for key, value in (extra_float_keys or {}).items():
        writer.add_float32(f"gpt-oss.{key}", value)
    _add_vocabulary(writer, vocab_size)
    writer.add_chat_template(chat_template)
    write_tensors_and_close(writer, _tensors(rng, info))
    return info


def _add_vocabulary(writer: GGUFWriter, vocab_size: int) -> None:
    add_special_bpe_vocabulary(writer, vocab_size, GPT_OSS_SPECIALS, "gpt-4o", "<|startoftext|>", "<|return|>", False)


def _vector(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    return (rng.standard_normal(size) * scale).astype(np.float32)


def _tensors(rng: np.random.Generator, info: TinyGptOssInfo) -> _TensorList:
    tensors = _TensorList()
    dense, d_model = info.dense_dtype, info.d_model
    q_width, kv_width = info.n_heads * info.head_dim, info.n_kv_heads * info.head_dim
    tensors.add("token_embd.weight", random_weight_bytes(rng, dense, (info.vocab_size, d_model), 1.0), dense)
    for block in range(info.n_layers):
        prefix = f"blk.{block}"
        tensors.add(f"{prefix}.attn_norm.weight", (1 + _vector(rng, d_model, 0.1)))
        for name, rows in (("attn_q", q_width), ("attn_k", kv_width), ("attn_v", kv_width)):
            tensors.add(f"{prefix}.{name}.weight", random_weight_bytes(rng, dense, (rows, d_model), 1 / math.sqrt(d_model)),
                        dense)
            tensors.add(f"{prefix}.{name}.bias", _vector(rng, rows, 0.1))
        output = random_weight_bytes(rng, dense, (d_model, q_width), 0.3 / math.sqrt(q_width))
        tensors.add(f"{prefix}.attn_output.weight", output, dense)
        tensors.add(f"{prefix}.attn_output.bias", _vector(rng, d_model, 0.05))
        tensors.add(f"{prefix}.attn_sinks.weight", _vector(rng, info.n_heads, 1.0))
        tensors.add(f"{prefix}.post_attention_norm.weight", (1 + _vector(rng, d_model, 0.1)))
        tensors.add(f"{prefix}.ffn_gate_inp.weight", random_weight_bytes(rng, "f32", (info.n_experts, d_model),
                                                                         1 / math.sqrt(d_model)))
        tensors.add(f"{prefix}.ffn_gate_inp.bias", _vector(rng, info.n_experts, 0.3))
        shapes = {"gate": (info.d_ff, d_model), "up": (info.d_ff, d_model), "down": (d_model, info.d_ff)}
        for name, (rows, columns) in shapes.items():
            weights = random_weight_bytes(rng, info.expert_dtype, (info.n_experts, rows, columns), 2 / math.sqrt(columns))
            tensors.add(f"{prefix}.ffn_{name}_exps.weight", weights, info.expert_dtype)
            tensors.add(f"{prefix}.ffn_{name}_exps.bias", (rng.standard_normal((info.n_experts, rows)) * 0.2)
                        .astype(np.float32))
    tensors.add("output_norm.weight", (1 + _vector(rng, d_model, 0.1)))
    head = random_weight_bytes(rng, dense, (info.vocab_size, d_model), 1 / math.sqrt(d_model))
    tensors.add("output.weight", head, dense)
    return tensors
