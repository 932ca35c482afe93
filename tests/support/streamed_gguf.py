"""Large MoE GGUF models for start-up and I/O tests, written one tensor at a time.

`write_tiny_moe_gguf` holds every tensor in memory until the file is written; that is fine for
kilobytes, not for the hundreds of megabytes or gigabytes that a test of "start-up reads far less
than the file" needs. `write_streamed_moe_gguf` writes the same kind of model (llama architecture,
merged `ffn_*_exps` experts in q4_0, f16 dense matrices, f32 norms and router gates, the tests'
small sentencepiece vocabulary) but declares every tensor first and then generates and writes one
tensor at a time, so memory holds at most one tensor (one merged expert matrix: experts x rows x
row bytes). Expert bytes are random valid q4_0 blocks (random quants, f16 scales set so that each
weight's standard deviation is ~1/sqrt(fan_in)). Same arguments and seed, same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from tests.support.gguf_models import TinyMoEInfo, _add_metadata

Q4_0 = GGMLQuantizationType.Q4_0
# Standard deviation of (quant - 8) for uniform 4-bit quants: sqrt((16^2 - 1) / 12).
_Q4_0_SPREAD = math.sqrt(255 / 12)


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy shape (..., rows, columns)
    kind: str  # "ones" (f32), "gate" (f32 random), "f16" (random) or "q4_0" (random blocks)
    scale: float = 1.0

    @property
    def nbytes(self) -> int:
        if self.kind == "q4_0":
            block_size, type_size = GGML_QUANT_SIZES[Q4_0]
            return math.prod(self.shape) // block_size * type_size
        return math.prod(self.shape) * (2 if self.kind == "f16" else 4)


def _specs(info: TinyMoEInfo) -> list[_TensorSpec]:
    d_model, d_ff, q_width = info.d_model, info.d_ff, info.n_heads * info.head_dim
    kv_width, inverse_root = info.n_kv_heads * info.head_dim, 1.0 / math.sqrt(info.d_model)
    specs = [_TensorSpec("token_embd.weight", (info.vocab_size, d_model), "f16", 1.0)]
    for block in range(info.n_layers):
        prefix = f"blk.{block}"
        specs += [
            _TensorSpec(f"{prefix}.attn_norm.weight", (d_model,), "ones"),
            _TensorSpec(f"{prefix}.attn_q.weight", (q_width, d_model), "f16", inverse_root),
            _TensorSpec(f"{prefix}.attn_k.weight", (kv_width, d_model), "f16", inverse_root),
            _TensorSpec(f"{prefix}.attn_v.weight", (kv_width, d_model), "f16", inverse_root),
            _TensorSpec(f"{prefix}.attn_output.weight", (d_model, q_width), "f16", 0.2 / math.sqrt(q_width)),
            _TensorSpec(f"{prefix}.ffn_norm.weight", (d_model,), "ones"),
            _TensorSpec(f"{prefix}.ffn_gate_inp.weight", (info.n_experts, d_model), "gate", inverse_root),
            _TensorSpec(f"{prefix}.ffn_gate_exps.weight", (info.n_experts, d_ff, d_model), "q4_0", inverse_root),
            _TensorSpec(f"{prefix}.ffn_up_exps.weight", (info.n_experts, d_ff, d_model), "q4_0", inverse_root),
            _TensorSpec(f"{prefix}.ffn_down_exps.weight", (info.n_experts, d_model, d_ff), "q4_0",
                        1.0 / math.sqrt(d_ff)),
        ]
    specs += [_TensorSpec("output_norm.weight", (d_model,), "ones"),
              _TensorSpec("output.weight", (info.vocab_size, d_model), "f16", inverse_root)]
    return specs


def _tensor(rng: np.random.Generator, spec: _TensorSpec) -> np.ndarray:
    if spec.kind == "ones":
        return np.ones(spec.shape, np.float32)
    if spec.kind in ("gate", "f16"):
        values = rng.standard_normal(spec.shape, dtype=np.float32) * spec.scale
        return values if spec.kind == "gate" else values.astype(np.float16)
    block_size, type_size = GGML_QUANT_SIZES[Q4_0]
    *lead, columns = spec.shape
    blocks = np.frombuffer(rng.bytes(spec.nbytes), np.uint8).reshape(*lead, columns // block_size, type_size).copy()
    scales = np.full(blocks.shape[:-1], spec.scale / _Q4_0_SPREAD, np.float16)
    blocks[..., 0:2] = scales.view(np.uint8).reshape(*scales.shape, 2)
    return blocks.reshape(*lead, columns // block_size * type_size)


def write_streamed_moe_gguf(path: str | Path, *, n_layers: int = 2, n_experts: int = 8, top_k: int = 2,
                            d_model: int = 1024, d_ff: int = 4096, n_heads: int = 8, n_kv_heads: int = 2,
                            vocab_size: int = 320, context_length: int = 256, seed: int = 0) -> TinyMoEInfo:
    """Write the model (see the module docstring) to `path` and describe it; one tensor in memory at a time."""
    head_dim = d_model // n_heads
    info = TinyMoEInfo(
        paths=(Path(path),), arch="llama", layout="merged", n_layers=n_layers, n_experts=n_experts, top_k=top_k,
        d_model=d_model, d_ff=d_ff, dense_d_ff=2 * d_ff, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        vocab_size=vocab_size, moe_blocks=tuple(range(n_layers)),
        layer_dtypes=(("q4_0", "q4_0", "q4_0"),) * n_layers, seed=seed, dense_dtype="f16",
        context_length=context_length)
    specs = _specs(info)
    writer = GGUFWriter(path, "llama")
    _add_metadata(writer, info, dense_first_layer=False, add_bos=None)
    for spec in specs:
        if spec.kind == "q4_0":
            block_size, type_size = GGML_QUANT_SIZES[Q4_0]
            byte_shape = (*spec.shape[:-1], spec.shape[-1] // block_size * type_size)
            writer.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), spec.nbytes, raw_dtype=Q4_0)
        else:
            dtype = np.float16 if spec.kind == "f16" else np.float32
            writer.add_tensor_info(spec.name, spec.shape, np.dtype(dtype), spec.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for spec in specs:
        writer.write_tensor_data(_tensor(rng, spec))
    writer.close()
    return info
