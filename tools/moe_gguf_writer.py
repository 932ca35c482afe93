"""A Mixtral-shaped MoE GGUF with random but valid q4_0 weights, written one tensor at a time.

The llama architecture as llama.cpp loads Mixtral: per block attention (`attn_q`, `attn_k`,
`attn_v`, `attn_output`, q4_0), RMS norms (f32), the router `ffn_gate_inp` (f32) and the merged
experts `ffn_{gate,up,down}_exps` (q4_0); token embeddings and the LM head are q4_0 too, and the
vocabulary is a llama-style SentencePiece list (`<unk>`, `<s>`, `</s>`, the 256 byte tokens, then
plain pieces) that llama.cpp loads.

Streaming: `gguf.GGUFWriter` gets every tensor's info first (name, shape, type, size), writes the
header, key/values and tensor infos, then each tensor's data with `write_tensor_data` as it is
made; at most one tensor is in memory (the largest, a merged expert tensor of Mixtral, is 264 MB),
so a 26 GB model needs no more RAM than that. Random q4_0 blocks come from numpy's SFC64 raw
stream (~1.8 GB/s here); each block's f16 scale `d` is then set to a finite value of the wanted
size with a random sign (the sign cancels the -0.5 mean of the 4-bit quants), so every block
dequantizes to finite numbers with the element RMS asked for.

Scales, as `tests/support/gguf_models.py` sets them so that routing spreads over all experts:
token embeddings at element RMS 1, matrices at 1/sqrt(fan_in), the attention output damped by 0.2,
the router normal at 1/sqrt(d_model). Same geometry and seed, same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType

Q4_0 = GGMLQuantizationType.Q4_0
Q4_0_BLOCK, Q4_0_BYTES = GGML_QUANT_SIZES[Q4_0]  # 32 weights in 18 bytes: f16 d, then 16 bytes of nibbles
# RMS of (q - 8) for q uniform over 0..15: sqrt(21.5).
Q4_0_QUANT_RMS = math.sqrt(21.5)
ATTENTION_OUTPUT_DAMPING = 0.2
EXPERT_MATRICES = ("gate", "up", "down")
SPM_SPECIALS = ("<unk>", "<s>", "</s>")
FIRST_PLAIN_TOKEN = len(SPM_SPECIALS) + 256  # after the specials and the byte tokens


@dataclass(frozen=True)
class MoEGeometry:
    """The shape of a llama-architecture MoE model (Mixtral's naming: every block is MoE)."""

    name: str
    n_layers: int
    n_experts: int
    top_k: int
    d_model: int
    d_ff: int  # expert hidden size
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    context_length: int
    rope_freq_base: float = 1e6

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def expert_nbytes(self) -> int:
        """q4_0 bytes of one expert's gate, up and down matrices."""
        return 3 * q4_0_nbytes(self.d_ff, self.d_model)

    @property
    def expert_bytes_total(self) -> int:
        return self.n_layers * self.n_experts * self.expert_nbytes

    def check(self) -> None:
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: d_model {self.d_model} / heads {self.n_heads} / kv heads "
                             f"{self.n_kv_heads} do not divide")
        if self.d_model % Q4_0_BLOCK or self.d_ff % Q4_0_BLOCK:
            raise ValueError(f"{self.name}: d_model and d_ff must be multiples of {Q4_0_BLOCK}")
        if not 0 < self.top_k <= self.n_experts or self.vocab_size <= FIRST_PLAIN_TOKEN:
            raise ValueError(f"{self.name}: needs 0 < top_k <= experts and vocab_size > {FIRST_PLAIN_TOKEN}")


GEOMETRIES = {
    # Mixtral-8x7B as llama.cpp loads it: 32 blocks x 8 experts, top-2, 99,090,432 bytes per q4_0 expert.
    "mixtral-8x7b": MoEGeometry("mixtral-8x7b", n_layers=32, n_experts=8, top_k=2, d_model=4096, d_ff=14336,
                                n_heads=32, n_kv_heads=8, vocab_size=32000, context_length=4096),
    # The benchmark's --quick model: the same structure, ~160 MB of experts (4.9 MB each).
    "quick": MoEGeometry("quick", n_layers=4, n_experts=8, top_k=2, d_model=1024, d_ff=2816, n_heads=8,
                         n_kv_heads=2, vocab_size=2000, context_length=1024),
    # Unit tests: seconds to write.
    "tiny": MoEGeometry("tiny", n_layers=2, n_experts=4, top_k=2, d_model=128, d_ff=256, n_heads=4,
                        n_kv_heads=2, vocab_size=400, context_length=256),
}


def q4_0_nbytes(rows: int, columns: int) -> int:
    return rows * (columns // Q4_0_BLOCK) * Q4_0_BYTES


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the file: its name, numpy shape (rows last), type, and how to make its data."""

    name: str
    shape: tuple[int, ...]  # elements, numpy order (..., rows, columns)
    qtype: GGMLQuantizationType
    make: Callable[[np.random.Generator], np.ndarray]

    @property
    def nbytes(self) -> int:
        *lead, columns = self.shape
        if self.qtype == Q4_0:
            return math.prod(lead) * q4_0_nbytes(1, columns)
        return math.prod(self.shape) * 4

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The shape of the array handed to the writer (uint8 rows of blocks for q4_0)."""
        if self.qtype == Q4_0:
            return (*self.shape[:-1], q4_0_nbytes(1, self.shape[-1]))
        return self.shape


def random_q4_0(rng: np.random.Generator, shape: tuple[int, ...], rms: float) -> np.ndarray:
    """Random valid q4_0 blocks for a float tensor of numpy `shape` whose elements have RMS `rms`:
    uint8 of shape (..., rows, row_bytes). Each block's f16 scale is +-rms/sqrt(21.5)."""
    *lead, columns = shape
    if columns % Q4_0_BLOCK:
        raise ValueError(f"q4_0 rows must be a multiple of {Q4_0_BLOCK} elements, got {columns}")
    num_blocks = math.prod(lead) * (columns // Q4_0_BLOCK)
    words = -(-num_blocks * Q4_0_BYTES // 8)
    blocks = rng.bit_generator.random_raw(words).view(np.uint8)[: num_blocks * Q4_0_BYTES].reshape(num_blocks, Q4_0_BYTES)
    scale = np.array([rms / Q4_0_QUANT_RMS], dtype=np.float16).view(np.uint8)  # little-endian: low, high byte
    if not math.isfinite(float(np.array([rms / Q4_0_QUANT_RMS], dtype=np.float16)[0])):
        raise ValueError(f"q4_0 scale for RMS {rms} is not a finite f16")
    blocks[:, 0] = scale[0]
    blocks[:, 1] = (blocks[:, 1] & 0x80) | (scale[1] & 0x7F)  # keep a random sign bit
    return blocks.reshape(*lead, (columns // Q4_0_BLOCK) * Q4_0_BYTES)


def _normal_f32(shape: tuple[int, ...], std: float) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))


def _ones(length: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: np.ones(length, np.float32)


def _q4_0(shape: tuple[int, ...], rms: float) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: random_q4_0(rng, shape, rms)


def tensor_plans(geometry: MoEGeometry) -> list[TensorPlan]:
    """Every tensor in file order (llama.cpp's names for Mixtral)."""
    g = geometry
    q_width, kv_width = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
    root = 1.0 / math.sqrt(g.d_model)
    plans = [TensorPlan("token_embd.weight", (g.vocab_size, g.d_model), Q4_0, _q4_0((g.vocab_size, g.d_model), 1.0))]
    for block in range(g.n_layers):
        prefix = f"blk.{block}"
        plans += [
            TensorPlan(f"{prefix}.attn_norm.weight", (g.d_model,), GGMLQuantizationType.F32, _ones(g.d_model)),
            TensorPlan(f"{prefix}.attn_q.weight", (q_width, g.d_model), Q4_0, _q4_0((q_width, g.d_model), root)),
            TensorPlan(f"{prefix}.attn_k.weight", (kv_width, g.d_model), Q4_0, _q4_0((kv_width, g.d_model), root)),
            TensorPlan(f"{prefix}.attn_v.weight", (kv_width, g.d_model), Q4_0, _q4_0((kv_width, g.d_model), root)),
            TensorPlan(f"{prefix}.attn_output.weight", (g.d_model, q_width), Q4_0,
                       _q4_0((g.d_model, q_width), ATTENTION_OUTPUT_DAMPING / math.sqrt(q_width))),
            TensorPlan(f"{prefix}.ffn_norm.weight", (g.d_model,), GGMLQuantizationType.F32, _ones(g.d_model)),
            TensorPlan(f"{prefix}.ffn_gate_inp.weight", (g.n_experts, g.d_model), GGMLQuantizationType.F32,
                       _normal_f32((g.n_experts, g.d_model), root)),
        ]
        for name in EXPERT_MATRICES:
            rows, columns = (g.d_model, g.d_ff) if name == "down" else (g.d_ff, g.d_model)
            shape = (g.n_experts, rows, columns)
            plans.append(TensorPlan(f"{prefix}.ffn_{name}_exps.weight", shape, Q4_0, _q4_0(shape, 1.0 / math.sqrt(columns))))
    plans += [
        TensorPlan("output_norm.weight", (g.d_model,), GGMLQuantizationType.F32, _ones(g.d_model)),
        TensorPlan("output.weight", (g.vocab_size, g.d_model), Q4_0, _q4_0((g.vocab_size, g.d_model), root)),
    ]
    return plans


def gguf_nbytes_estimate(geometry: MoEGeometry) -> int:
    """The tensor data's bytes plus a generous allowance for the header, vocabulary and padding."""
    return sum(plan.nbytes for plan in tensor_plans(geometry)) + 64 * geometry.vocab_size + (16 << 20)


def _add_metadata(writer: GGUFWriter, g: MoEGeometry, seed: int) -> None:
    writer.add_name(f"synthetic-{g.name}-q4_0-seed{seed}")
    writer.add_file_type(2)  # LLAMA_FTYPE_MOSTLY_Q4_0
    writer.add_context_length(g.context_length)
    writer.add_embedding_length(g.d_model)
    writer.add_block_count(g.n_layers)
    writer.add_feed_forward_length(g.d_ff)
    writer.add_head_count(g.n_heads)
    writer.add_head_count_kv(g.n_kv_heads)
    writer.add_rope_dimension_count(g.head_dim)
    writer.add_rope_freq_base(g.rope_freq_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_expert_count(g.n_experts)
    writer.add_expert_used_count(g.top_k)
    pieces = [f"\u2581w{index}" for index in range(g.vocab_size - FIRST_PLAIN_TOKEN)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([*SPM_SPECIALS, *(f"<0x{value:02X}>" for value in range(256)), *pieces])
    writer.add_token_scores([0.0] * FIRST_PLAIN_TOKEN + [-float(index) for index in range(len(pieces))])
    writer.add_token_types([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
                           + [TokenType.NORMAL] * len(pieces))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)


def write_moe_gguf(path: str | Path, geometry: MoEGeometry, *, seed: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the model to `path` one tensor at a time; `progress(done_bytes, total_bytes)` after each.
    Written to `path.partial` and renamed at the end, so a file at `path` is always complete."""
    geometry.check()
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    plans = tensor_plans(geometry)
    total = sum(plan.nbytes for plan in plans)
    writer = GGUFWriter(partial, "llama")
    _add_metadata(writer, geometry, seed)
    for plan in plans:
        dtype = np.dtype(np.uint8) if plan.qtype == Q4_0 else np.dtype(np.float32)
        writer.add_tensor_info(plan.name, plan.byte_shape, dtype, plan.nbytes, raw_dtype=plan.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.Generator(np.random.SFC64(seed))
    done = 0
    for plan in plans:
        data = plan.make(rng)
        if data.nbytes != plan.nbytes:
            raise AssertionError(f"{plan.name}: made {data.nbytes} bytes, planned {plan.nbytes}")
        writer.write_tensor_data(data)
        done += plan.nbytes
        del data
        if progress is not None:
            progress(done, total)
    writer.close()
    partial.replace(path)
    return path


def plain_token_ids(geometry: MoEGeometry, count: int, seed: int) -> list[int]:
    """`count` random ids of ordinary pieces (no specials or byte tokens), for prompts."""
    rng = np.random.default_rng(seed)
    return [int(token) for token in rng.integers(FIRST_PLAIN_TOKEN, geometry.vocab_size, size=count)]


def describe(geometry: MoEGeometry) -> dict:
    return {**asdict(geometry), "expert_nbytes": geometry.expert_nbytes,
            "expert_bytes_total": geometry.expert_bytes_total, "gguf_nbytes_estimate": gguf_nbytes_estimate(geometry)}

