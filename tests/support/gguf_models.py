"""Tiny Mixture-of-Experts GGUF models for tests, written with the `gguf` library's GGUFWriter.

`write_tiny_moe_gguf` writes a complete small model in llama.cpp naming: token embedding, per block
attention (q, k, v, output, norms; q/k norms where the architecture has them), the router
(`ffn_gate_inp`), the experts (merged `ffn_{gate,up,down}_exps` or the older per-expert
`ffn_{gate,up,down}.E` tensors), for qwen2moe the q/k/v biases and each MoE block's shared expert
(`ffn_gate_inp_shexp`, `ffn_{gate,up,down}_shexp`, `dense_d_ff` wide, in the experts' dtypes), an
optional dense first block, the output norm and head, and a
small vocabulary that llama.cpp loads: `tokenizer="spm"` (llama-style sentencepiece: `<unk>`,
`<s>`, `</s>`, the 256 byte tokens, then pieces merged from a small built-in text, with scores)
or `tokenizer="bpe"` (gpt2-style byte-level BPE with merges, pre-tokenizer "qwen2", special
`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`). Dense matrices (embeddings, attention, dense FFN,
LM head) are `dense_dtype` (f32 by default); norms and router gates are always f32, as llama.cpp's
quantizer keeps them. Expert matrices use the requested dtypes: f32/f16/bf16/q4_0/q8_0
(and other types `gguf.quants` can quantize) are quantized from random normal values with
`gguf.quants.quantize`; q4_k/q5_k/q6_k, which `gguf` cannot quantize, are random blocks whose f16
scales are set to finite values so that every block dequantizes to finite numbers.

Weights are scaled for sane activations (embedding element RMS ~1, matrices ~1/sqrt(fan_in),
attention output damped by 0.2) so that routing does not collapse onto a few experts.

Note: llama.cpp itself builds every block of these architectures as MoE; a file written with
`dense_first_layer=True` is for mer's own tests (it also sets `{arch}.leading_dense_block_count`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize

ARCHITECTURES = ("llama", "qwen3moe", "olmoe", "qwen2moe")
EXPERT_LAYOUTS = ("merged", "per_expert")
MATRIX_NAMES = ("gate", "up", "down")
K_QUANT_TYPES = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)
# Rough standard deviation of (scale index x quant) for random K-quant blocks, per unit of d.
_K_QUANT_SPREAD = {GGMLQuantizationType.Q4_K: 250.0, GGMLQuantizationType.Q5_K: 500.0,
                   GGMLQuantizationType.Q6_K: 1370.0}
# dmin / d that centres a random Q4_K / Q5_K block near zero (mean quant value).
_K_QUANT_CENTRE = {GGMLQuantizationType.Q4_K: 7.5, GGMLQuantizationType.Q5_K: 15.5}


@dataclass(frozen=True)
class TinyMoEInfo:
    """What `write_tiny_moe_gguf` wrote: the files and the model's geometry."""

    paths: tuple[Path, ...]  # every file written; a split model lists its parts in order
    arch: str
    layout: str  # "merged" or "per_expert"
    n_layers: int  # blocks, dense ones included
    n_experts: int
    top_k: int
    d_model: int
    d_ff: int  # expert hidden size
    dense_d_ff: int  # hidden size of a dense block's FFN
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    moe_blocks: tuple[int, ...]  # block index of each MoE layer
    layer_dtypes: tuple[tuple[str, str, str], ...]  # (gate, up, down) dtype per MoE layer
    seed: int
    dense_dtype: str = "f32"  # embeddings, attention, dense FFN, LM head
    tokenizer: str = "spm"  # "spm" (llama) or "bpe" (gpt2-style, pre-tokenizer qwen2)
    context_length: int = 256

    @property
    def path(self) -> Path:
        """The file to open (the first part of a split model)."""
        return self.paths[0]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_blocks)

    def expert_tensor_names(self, block: int, expert: int) -> tuple[str, str, str]:
        """Names of the tensors holding (gate, up, down) of one expert (merged: all experts)."""
        if self.layout == "merged":
            return tuple(f"blk.{block}.ffn_{name}_exps.weight" for name in MATRIX_NAMES)  # type: ignore[return-value]
        return tuple(f"blk.{block}.ffn_{name}.{expert}.weight" for name in MATRIX_NAMES)  # type: ignore[return-value]


def ggml_type(dtype: str) -> GGMLQuantizationType:
    """The GGML type called `dtype` (lower-case GGUF name such as "q4_0")."""
    try:
        return GGMLQuantizationType[dtype.upper()]
    except KeyError:
        raise ValueError(f"unknown GGML type {dtype!r}") from None


def random_weight_bytes(
    rng: np.random.Generator, dtype: str, shape: Sequence[int], scale: float
) -> np.ndarray:
    """Random weights of numpy `shape` (..., rows, columns) in `dtype`, ready for GGUFWriter.

    Float types come back as float arrays of `shape`; block types as uint8 arrays of shape
    (..., rows, row_bytes). The values have a standard deviation of roughly `scale`.
    """
    qtype = ggml_type(dtype)
    if qtype in K_QUANT_TYPES:
        return random_k_quant_bytes(rng, qtype, shape, scale)
    values = (rng.standard_normal(tuple(shape)) * scale).astype(np.float32)
    return quantize(values, qtype)


def random_k_quant_bytes(
    rng: np.random.Generator, qtype: GGMLQuantizationType, shape: Sequence[int], scale: float
) -> np.ndarray:
    """Random but valid K-quant blocks: random quants and scales, finite f16 super-block scales."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    *lead, columns = shape
    if columns % block_size:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block_size}, got {columns}")
    num_blocks = columns // block_size
    blocks = rng.integers(0, 256, size=(*lead, num_blocks, type_size), dtype=np.uint8)
    d = (scale / _K_QUANT_SPREAD[qtype]) * rng.uniform(0.5, 1.5, size=(*lead, num_blocks))
    if qtype == GGMLQuantizationType.Q6_K:
        blocks[..., type_size - 2 :] = _f16_bytes(d)  # ql[128] qh[64] scales[16] d
    else:
        blocks[..., 0:2] = _f16_bytes(d)  # d dmin scales[12] (qh[32]) qs[128]
        blocks[..., 2:4] = _f16_bytes(d * _K_QUANT_CENTRE[qtype])
    return blocks.reshape(*lead, num_blocks * type_size)


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


class _TensorList(list):
    """Tensors in file order, collected before the writer is made (the split needs the count)."""

    def add(self, name: str, array: np.ndarray, dtype: str = "f32") -> None:
        raw_dtype = None if array.dtype in (np.float32, np.float16) else ggml_type(dtype)
        self.append((name, array, raw_dtype))


def random_norm(rng: np.random.Generator, size: int) -> np.ndarray:
    """An RMS norm weight vector near 1."""
    return (1 + rng.standard_normal(size) * 0.1).astype(np.float32)


def add_random_matrix(tensors: _TensorList, rng: np.random.Generator, name: str, dtype: str, shape: tuple[int, ...],
                      scale: float) -> None:
    tensors.add(name, random_weight_bytes(rng, dtype, shape, scale), dtype)


def add_dense_swiglu(tensors: _TensorList, rng: np.random.Generator, prefix: str, dtype: str, d_model: int,
                     d_ff: int) -> None:
    """A dense block's `ffn_gate` / `ffn_up` / `ffn_down`."""
    for name, shape in (("gate", (d_ff, d_model)), ("up", (d_ff, d_model)), ("down", (d_model, d_ff))):
        add_random_matrix(tensors, rng, f"{prefix}.ffn_{name}.weight", dtype, shape, 1 / math.sqrt(shape[1]))


def add_routed_and_shared_experts(tensors: _TensorList, rng: np.random.Generator, prefix: str, *, n_experts: int,
                                  d_model: int, d_ff: int, shared_d_ff: int, expert_dtype: str, shared_dtype: str,
                                  selection_bias: bool) -> None:
    """A MoE block's f32 router (`ffn_gate_inp`), optional selection bias (`exp_probs_b.bias`), merged
    experts (`ffn_*_exps`) and ungated shared expert (`ffn_*_shexp`), as deepseek2 and glm4moe have them."""
    add_random_matrix(tensors, rng, f"{prefix}.ffn_gate_inp.weight", "f32", (n_experts, d_model), 1 / math.sqrt(d_model))
    if selection_bias:
        tensors.add(f"{prefix}.exp_probs_b.bias", (rng.standard_normal(n_experts) * 0.05).astype(np.float32))
    for name, (rows, columns) in (("gate", (d_ff, d_model)), ("up", (d_ff, d_model)), ("down", (d_model, d_ff))):
        add_random_matrix(tensors, rng, f"{prefix}.ffn_{name}_exps.weight", expert_dtype, (n_experts, rows, columns),
                          2 / math.sqrt(columns))
    for name, (rows, columns) in (("gate", (shared_d_ff, d_model)), ("up", (shared_d_ff, d_model)),
                                  ("down", (d_model, shared_d_ff))):
        add_random_matrix(tensors, rng, f"{prefix}.ffn_{name}_shexp.weight", shared_dtype, (rows, columns),
                          1 / math.sqrt(columns))


def write_tensors_and_close(writer: GGUFWriter, tensors: _TensorList) -> None:
    """Add `tensors` to `writer`, write the file and close it."""
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_metadata(writer: GGUFWriter, info: TinyMoEInfo, dense_first_layer: bool, add_bos: bool | None) -> None:
    writer.add_name(f"tiny-{info.arch}-moe")
    writer.add_context_length(info.context_length)
    writer.add_embedding_length(info.d_model)
    writer.add_block_count(info.n_layers)
    writer.add_head_count(info.n_heads)
    writer.add_head_count_kv(info.n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_expert_count(info.n_experts)
    writer.add_expert_used_count(info.top_k)
    if info.arch == "qwen3moe":
        writer.add_feed_forward_length(info.dense_d_ff)
        writer.add_expert_feed_forward_length(info.d_ff)
        writer.add_key_length(info.head_dim)
        writer.add_value_length(info.head_dim)
    elif info.arch == "qwen2moe":  # as convert_hf_to_gguf writes Qwen1.5/2-MoE: the shared expert is dense_d_ff wide
        writer.add_feed_forward_length(info.dense_d_ff)
        writer.add_expert_feed_forward_length(info.d_ff)
        writer.add_expert_shared_feed_forward_length(info.dense_d_ff)
    else:
        writer.add_feed_forward_length(info.d_ff)
        writer.add_rope_dimension_count(info.head_dim)
    if dense_first_layer:
        writer.add_leading_dense_block_count(1)
    _add_vocabulary(writer, info.vocab_size, info.tokenizer, add_bos)


# A small text whose most frequent symbol pairs become the vocabulary's merged pieces.
VOCABULARY_TEXT = (
    "the quick brown fox jumps over the lazy dog while the experts stream from the disk into "
    "memory and the router picks two of them for every token in every layer of the model then "
    "the compute workers run their feed forward networks on the quantized weights and return "
    "partial outputs that the router sums with the gate weights hello world this is a test of "
    "tokens spaces tabs newlines and other things that people write in their prompts"
)
BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_merges(words: Sequence[Sequence[str]], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    words = [list(word) for word in words]
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        counts: dict[tuple[str, str], int] = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for index, word in enumerate(words):
            merged, position = [], 0
            while position < len(word):
                if position + 1 < len(word) and (word[position], word[position + 1]) == best:
                    merged.append(word[position] + word[position + 1])
                    position += 2
                else:
                    merged.append(word[position])
                    position += 1
            words[index] = merged
    return merges


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-character table: printable bytes map to themselves, the others to U+0100.."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for value in range(256):
        if value in printable:
            table[value] = chr(value)
        else:
            table[value] = chr(256 + extra)
            extra += 1
    return [table[value] for value in range(256)]


def _add_vocabulary(writer: GGUFWriter, vocab_size: int, tokenizer: str, add_bos: bool | None) -> None:
    if tokenizer == "spm":
        _add_spm_vocabulary(writer, vocab_size)
    elif tokenizer == "bpe":
        _add_bpe_vocabulary(writer, vocab_size)
        add_bos = False if add_bos is None else add_bos  # as Qwen's GGUFs say
    else:
        raise ValueError(f"tokenizer must be 'spm' or 'bpe', got {tokenizer!r}")
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)


def _add_spm_vocabulary(writer: GGUFWriter, vocab_size: int) -> None:
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    if vocab_size < len(specials) + len(byte_tokens):
        raise ValueError(f"vocab_size must be at least {len(specials) + len(byte_tokens)}, got {vocab_size}")
    words = ["\u2581" + word for word in VOCABULARY_TEXT.split()]
    characters = sorted({character for word in words for character in word})
    room = vocab_size - len(specials) - len(byte_tokens)
    merged = ["".join(pair) for pair in train_merges(words, max(room - len(characters), 0))]
    pieces = list(dict.fromkeys(merged + characters))[:room]
    pieces += [f"\u2581w{index}" for index in range(room - len(pieces))]
    types = ([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * len(byte_tokens)
             + [TokenType.NORMAL] * len(pieces))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(specials + byte_tokens + pieces)
    writer.add_token_scores([0.0] * (len(specials) + len(byte_tokens)) + [-float(i) for i in range(len(pieces))])
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def add_special_bpe_vocabulary(writer: GGUFWriter, vocab_size: int, specials: Sequence[str], pre: str, bos: str,
                               eos: str, add_bos: bool) -> None:
    """A byte-level BPE vocabulary merged from the built-in text (and "123", "2026"), padded with
    filler pieces, then the CONTROL tokens `specials`; pre-tokenizer `pre`, BOS/EOS named by text."""
    alphabet = byte_level_alphabet()
    room = vocab_size - len(alphabet) - len(specials)
    space = alphabet[ord(" ")]
    words = [[*word] for word in VOCABULARY_TEXT.split()[:1]] + [[space, *word] for word in VOCABULARY_TEXT.split()[1:]]
    merges = train_merges(words + [[*"123"], [*"2026"]], room)
    tokens = alphabet + ["".join(pair) for pair in merges]
    tokens += [f"{space}w{index}" for index in range(vocab_size - len(specials) - len(tokens))]
    tokens += list(specials)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.NORMAL] * (len(tokens) - len(specials)) + [TokenType.CONTROL] * len(specials))
    writer.add_token_merges([f"{left} {right}" for left, right in merges])
    writer.add_bos_token_id(tokens.index(bos))
    writer.add_eos_token_id(tokens.index(eos))
    writer.add_add_bos_token(add_bos)


def _add_bpe_vocabulary(writer: GGUFWriter, vocab_size: int) -> None:
    alphabet = byte_level_alphabet()
    room = vocab_size - len(alphabet) - len(BPE_SPECIALS)
    if room < 0:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(BPE_SPECIALS)}, got {vocab_size}")
    space = alphabet[ord(" ")]
    words = [[*word] for word in VOCABULARY_TEXT.split()[:1]] + [[space, *word] for word in VOCABULARY_TEXT.split()[1:]]
    merges = train_merges(words, room)
    tokens = alphabet + ["".join(pair) for pair in merges]
    tokens += [f"{space}w{index}" for index in range(vocab_size - len(BPE_SPECIALS) - len(tokens))]
    tokens += list(BPE_SPECIALS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.NORMAL] * (len(tokens) - len(BPE_SPECIALS)) + [TokenType.CONTROL] * len(BPE_SPECIALS))
    writer.add_token_merges([f"{left} {right}" for left, right in merges])
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))


def _add_attention(tensors: _TensorList, rng: np.random.Generator, info: TinyMoEInfo, block: int) -> None:
    prefix = f"blk.{block}"
    q_width, kv_width = info.n_heads * info.head_dim, info.n_kv_heads * info.head_dim
    inverse_root, dtype = 1.0 / math.sqrt(info.d_model), info.dense_dtype
    tensors.add(f"{prefix}.attn_norm.weight", np.ones(info.d_model, np.float32))
    tensors.add(f"{prefix}.attn_q.weight", random_weight_bytes(rng, dtype, (q_width, info.d_model), inverse_root), dtype)
    tensors.add(f"{prefix}.attn_k.weight", random_weight_bytes(rng, dtype, (kv_width, info.d_model), inverse_root), dtype)
    tensors.add(f"{prefix}.attn_v.weight", random_weight_bytes(rng, dtype, (kv_width, info.d_model), inverse_root), dtype)
    if info.arch == "qwen2moe":  # q/k/v biases (no output bias)
        for name, width in (("q", q_width), ("k", kv_width), ("v", kv_width)):
            tensors.add(f"{prefix}.attn_{name}.bias", (rng.standard_normal(width) * 0.5).astype(np.float32))
    if info.arch == "qwen3moe":  # per-head RMS norms
        tensors.add(f"{prefix}.attn_q_norm.weight", np.ones(info.head_dim, np.float32))
        tensors.add(f"{prefix}.attn_k_norm.weight", np.ones(info.head_dim, np.float32))
    elif info.arch == "olmoe":  # RMS norms over the whole q / k projection
        tensors.add(f"{prefix}.attn_q_norm.weight", np.ones(q_width, np.float32))
        tensors.add(f"{prefix}.attn_k_norm.weight", np.ones(kv_width, np.float32))
    output = random_weight_bytes(rng, dtype, (info.d_model, q_width), 0.2 / math.sqrt(q_width))
    tensors.add(f"{prefix}.attn_output.weight", output, dtype)
    tensors.add(f"{prefix}.ffn_norm.weight", np.ones(info.d_model, np.float32))


def _add_dense_ffn(tensors: _TensorList, rng: np.random.Generator, info: TinyMoEInfo, block: int) -> None:
    d_model, d_ff = info.d_model, info.dense_d_ff
    for name, shape in (("gate", (d_ff, d_model)), ("up", (d_ff, d_model)), ("down", (d_model, d_ff))):
        weights = random_weight_bytes(rng, info.dense_dtype, shape, 1.0 / math.sqrt(shape[1]))
        tensors.add(f"blk.{block}.ffn_{name}.weight", weights, info.dense_dtype)


def _add_experts(tensors: _TensorList, rng: np.random.Generator, info: TinyMoEInfo, block: int,
                 dtypes: tuple[str, str, str]) -> None:
    router = random_weight_bytes(rng, "f32", (info.n_experts, info.d_model), 1.0 / math.sqrt(info.d_model))
    tensors.add(f"blk.{block}.ffn_gate_inp.weight", router)
    shapes = ((info.d_ff, info.d_model), (info.d_ff, info.d_model), (info.d_model, info.d_ff))
    for name, dtype, (rows, columns) in zip(MATRIX_NAMES, dtypes, shapes):
        scale = 1.0 / math.sqrt(columns)
        if info.layout == "merged":
            weights = random_weight_bytes(rng, dtype, (info.n_experts, rows, columns), scale)
            tensors.add(f"blk.{block}.ffn_{name}_exps.weight", weights, dtype)
            continue
        for expert in range(info.n_experts):
            weights = random_weight_bytes(rng, dtype, (rows, columns), scale)
            tensors.add(f"blk.{block}.ffn_{name}.{expert}.weight", weights, dtype)
    if info.arch == "qwen2moe":
        _add_shared_expert(tensors, rng, info, block, dtypes)


def _add_shared_expert(tensors: _TensorList, rng: np.random.Generator, info: TinyMoEInfo, block: int,
                       dtypes: tuple[str, str, str]) -> None:
    """qwen2moe's shared expert: an f32 gate vector and a SwiGLU of `dense_d_ff` in the experts' dtypes
    (llama.cpp's quantizer treats `ffn_*_shexp` as it treats the experts)."""
    d_model, d_ff = info.d_model, info.dense_d_ff
    gate_input = random_weight_bytes(rng, "f32", (d_model,), 2.0 / math.sqrt(d_model))
    tensors.add(f"blk.{block}.ffn_gate_inp_shexp.weight", gate_input)
    shapes = ((d_ff, d_model), (d_ff, d_model), (d_model, d_ff))
    for name, dtype, (rows, columns) in zip(MATRIX_NAMES, dtypes, shapes):
        weights = random_weight_bytes(rng, dtype, (rows, columns), 1.0 / math.sqrt(columns))
        tensors.add(f"blk.{block}.ffn_{name}_shexp.weight", weights, dtype)


def write_tiny_moe_gguf(
    path: str | Path,
    *,
    arch: str = "llama",
    dtypes: tuple[str, str, str] = ("q4_0", "q4_0", "q4_0"),
    layer_dtypes: Sequence[tuple[str, str, str]] | None = None,
    layout: str = "merged",
    n_layers: int = 2,
    n_experts: int = 4,
    top_k: int = 2,
    d_model: int = 64,
    d_ff: int = 128,
    dense_d_ff: int | None = None,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = 320,
    dense_first_layer: bool = False,
    split: int | None = None,
    seed: int = 0,
    metadata_overrides: Mapping[str, int] | None = None,
    dense_dtype: str = "f32",
    tokenizer: str = "spm",
    add_bos: bool | None = None,
    context_length: int = 256,
    chat_template: str | None = None,
    omit_tensors: Sequence[str] = (),
    omit_keys: Sequence[str] = (),
) -> TinyMoEInfo:
    """Write a tiny MoE model to `path` and describe it.

    `dtypes` are the (gate, up, down) types of every MoE layer unless `layer_dtypes` gives one
    triple per MoE layer (e.g. Q4_K_M-like mixes). `split=N` writes N parts named
    `STEM-0000i-of-0000N.gguf` next to `path` (llama.cpp's split naming, `split.*` keys); the
    result's `path` is then the first part. `metadata_overrides` replaces uint32 keys after the
    normal ones are set (to build inconsistent files). `dense_dtype` is the type of the dense
    matrices, `tokenizer` the vocabulary kind ("spm" or "bpe"), `add_bos` writes
    `tokenizer.ggml.add_bos_token` (None: the key is absent for "spm", false for "bpe");
    `chat_template` writes `tokenizer.chat_template`; tensors named in `omit_tensors` are left out
    and metadata keys named in `omit_keys` are not written (to build incomplete files).
    Same arguments and seed, same bytes.
    """
    if arch not in ARCHITECTURES or layout not in EXPERT_LAYOUTS:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, layout one of {EXPERT_LAYOUTS}")
    moe_blocks = tuple(range(1 if dense_first_layer else 0, n_layers))
    layer_dtypes = tuple(layer_dtypes) if layer_dtypes is not None else (tuple(dtypes),) * len(moe_blocks)
    if len(layer_dtypes) != len(moe_blocks):
        raise ValueError(f"layer_dtypes has {len(layer_dtypes)} entries for {len(moe_blocks)} MoE layers")
    info = TinyMoEInfo(
        paths=(Path(path),), arch=arch, layout=layout, n_layers=n_layers, n_experts=n_experts, top_k=top_k,
        d_model=d_model, d_ff=d_ff, dense_d_ff=dense_d_ff or 2 * d_ff, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=d_model // n_heads, vocab_size=vocab_size, moe_blocks=moe_blocks,
        layer_dtypes=tuple(tuple(triple) for triple in layer_dtypes), seed=seed,  # type: ignore[misc]
        dense_dtype=dense_dtype, tokenizer=tokenizer, context_length=context_length,
    )
    tensors = _TensorList(entry for entry in _model_tensors(np.random.default_rng(seed), info)
                          if entry[0] not in omit_tensors)
    writer = GGUFWriter(path, arch, split_max_tensors=math.ceil(len(tensors) / split) if split else 0)
    _add_metadata(writer, info, dense_first_layer, add_bos)
    for key, value in (metadata_overrides or {}).items():
        writer.add_uint32(key, value)
    for key in omit_keys:
        if writer.kv_data[0].pop(key, None) is None:  # the writer's pending keys (first part)
            raise ValueError(f"omit_keys: {key} is not a key this model writes")
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    paths = tuple(writer.format_shard_names(Path(path)))
    if split and len(paths) != split:
        raise ValueError(f"{len(tensors)} tensors cannot be split into exactly {split} parts")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyMoEInfo(**{**info.__dict__, "paths": paths})


def _model_tensors(rng: np.random.Generator, info: TinyMoEInfo) -> _TensorList:
    tensors = _TensorList()
    embedding = random_weight_bytes(rng, info.dense_dtype, (info.vocab_size, info.d_model), 1.0)
    tensors.add("token_embd.weight", embedding, info.dense_dtype)
    for block in range(info.n_layers):
        _add_attention(tensors, rng, info, block)
        if block in info.moe_blocks:
            _add_experts(tensors, rng, info, block, info.layer_dtypes[info.moe_blocks.index(block)])
        else:
            _add_dense_ffn(tensors, rng, info, block)
    tensors.add("output_norm.weight", np.ones(info.d_model, np.float32))
    head = random_weight_bytes(rng, info.dense_dtype, (info.vocab_size, info.d_model), 1.0 / math.sqrt(info.d_model))
    tensors.add("output.weight", head, info.dense_dtype)
    return tensors
