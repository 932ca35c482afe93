"""The dense weights of a MoE GGUF model, computed in place (memory-mapped, or resident copies).

Matrices (embeddings, attention, router gates, dense FFNs, LM head) stay in the GGUF's
memory-mapped bytes and are multiplied with `mer.quant.matmul` (nothing is dequantized as a
whole; an embedding lookup dequantizes one row). Inputs are rounded as ggml rounds them: to q8_0
per 32-block for q4_0/q8_0 weights, to f16 / bf16 for f16 / bf16 weights, unchanged for f32.
Vectors (RMS norm weights) are small and read as float32.

Tensor names and GGML shapes (ne, fastest first) are llama.cpp's:
`token_embd` [d_model, vocab], `output` [d_model, vocab] (absent: tied to token_embd),
`output_norm` [d_model], and per block N `blk.N.attn_norm` [d_model], `attn_q` [d_model, q_width],
`attn_k` / `attn_v` [d_model, kv_width], `attn_output` [q_width, d_model], `attn_q_norm` /
`attn_k_norm` (qwen3moe: [head_dim]; olmoe: [q_width] / [kv_width]), `ffn_norm` [d_model], then
`ffn_gate_inp` [d_model, experts] for a MoE block (its experts are read by `mer.model.experts`)
or `ffn_gate` / `ffn_up` [d_model, d_ff] and `ffn_down` [d_ff, d_model] for a dense block.
Where the architecture has them (qwen2moe): `attn_q.bias` [q_width], `attn_k.bias` / `attn_v.bias`
[kv_width], and each MoE block's shared expert (`mer.model.shared_expert`). The skipped NextN blocks
(glm4moe, `mer.store.gguf_source`) are neither read nor copied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mer.compute.dtypes import dtype_by_ggml
from mer.errors import ShapeError, UnsupportedModelError
from mer.compute.expert_format import MatrixSpec
from mer.model.resident import read_resident
from mer.model.hparams import QK_NORM_NONE, QK_NORM_PER_HEAD, HParams
from mer.model.mla import MLAWeights
from mer.model.shared_expert import SharedExpert
from mer.quant.dequant import dequantize
from mer.quant.matmul import matmul, round_float_activation
from mer.store.gguf_files import GGUFPart, TensorData
from mer.store.gguf_source import EXPERT_BIAS_TENSOR, MERGED_EXPERT_TENSOR, PER_EXPERT_TENSOR, is_skipped_tensor


@dataclass(frozen=True)
class DenseMatrix:
    """One 2-D weight tensor (`rows` x `columns`, columns = GGML ne0) computed on its GGUF bytes."""

    tensor: TensorData
    spec: MatrixSpec

    @classmethod
    def of(cls, tensor: TensorData) -> "DenseMatrix":
        dtype = dtype_by_ggml(tensor.ggml_type, f"{tensor.path}: tensor {tensor.name}")
        columns, rows = tensor.shape
        spec = MatrixSpec(tensor.name, dtype.name, rows, columns, 0, dtype.matrix_nbytes(rows, columns))
        if spec.nbytes != tensor.nbytes:
            raise ShapeError(f"{tensor.path}: tensor {tensor.name} has {tensor.nbytes} bytes, "
                             f"its shape needs {spec.nbytes}")
        return cls(tensor, spec)

    @property
    def rows(self) -> int:
        return self.spec.rows

    @property
    def columns(self) -> int:
        return self.spec.columns

    def __call__(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """`x @ W.T` for float32 `x` of shape `[tokens, columns]`: float32 `[tokens, rows]`."""
        rows = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        return matmul(self.spec, self.tensor.data, round_float_activation(self.spec.dtype, rows), threads=threads)

    def row(self, index: int) -> np.ndarray:
        """Row `index` dequantized to float32 (an embedding lookup)."""
        row_bytes = self.spec.dtype_info.row_nbytes(self.columns)
        data = self.tensor.data[index * row_bytes : (index + 1) * row_bytes]
        return dequantize(data, self.spec.dtype, (self.columns,))


@dataclass(frozen=True)
class BlockWeights:
    """The dense weights of one transformer block."""

    attn_norm: np.ndarray
    attn_q: DenseMatrix | None  # None with MLA (deepseek2: `mla`)
    attn_k: DenseMatrix | None
    attn_v: DenseMatrix | None
    attn_output: DenseMatrix
    attn_q_norm: np.ndarray | None
    attn_k_norm: np.ndarray | None
    ffn_norm: np.ndarray
    router: DenseMatrix | None  # ffn_gate_inp of a MoE block
    dense_ffn: tuple[DenseMatrix, DenseMatrix, DenseMatrix] | None  # (gate, up, down) of a dense block
    qkv_bias: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (q, k, v) biases (qwen2moe, gpt-oss)
    shared_expert: SharedExpert | None = None  # a MoE block's shared expert (qwen2moe)
    attn_output_bias: np.ndarray | None = None  # (gpt-oss)
    attn_sinks: np.ndarray | None = None  # one logit per head (gpt-oss)
    router_bias: np.ndarray | None = None  # added to the router logits (gpt-oss)
    selection_bias: np.ndarray | None = None  # exp_probs_b: chooses experts, never weighs them (deepseek2 V3)
    mla: MLAWeights | None = None  # multi-head latent attention (deepseek2)


@dataclass(frozen=True)
class ModelWeights:
    """All dense weights of the model."""

    token_embedding: DenseMatrix
    output_norm: np.ndarray
    output: DenseMatrix
    blocks: tuple[BlockWeights, ...]

    @property
    def vocab_size(self) -> int:
        return self.token_embedding.rows


class _Tensors:
    """The model's tensors by name, fetched with shape checks that name the file and tensor."""

    def __init__(self, parts: tuple[GGUFPart, ...], resident: bool = False, num_blocks: int = 0, nextn_blocks: int = 0):
        self.path = parts[0].path
        self.by_name: dict[str, TensorData] = {  # without the skipped NextN blocks (mer.store.gguf_source)
            tensor.name: tensor for part in parts for tensor in part.tensors
            if not is_skipped_tensor(tensor.name, num_blocks, nextn_blocks)}
        if resident:  # the matrices read into the process's own memory (mer.model.resident)
            self.by_name.update(read_resident(tensor for name, tensor in self.by_name.items()
                                              if len(tensor.shape) == 2 and not _is_expert_tensor(name)))
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...], required: bool = True) -> TensorData | None:
        tensor = self.by_name.get(name)
        if tensor is None:
            if required:
                raise UnsupportedModelError(f"{self.path}: tensor {name} is missing")
            return None
        if tensor.shape != shape:
            raise ShapeError(f"{tensor.path}: tensor {name} has GGML shape {list(tensor.shape)}, "
                             f"expected {list(shape)}")
        self.used.add(name)
        return tensor

    def matrix(self, name: str, columns: int, rows: int) -> DenseMatrix:
        return DenseMatrix.of(self.get(name, (columns, rows)))  # type: ignore[arg-type]

    def per_head(self, name: str, columns: int, rows: int, heads: int) -> tuple[DenseMatrix, ...]:
        """A 3-D tensor [columns, rows, heads] as one matrix per head (views of its bytes)."""
        tensor = self.get(name, (columns, rows, heads))
        size = tensor.nbytes // heads  # type: ignore[union-attr]
        return tuple(DenseMatrix.of(dataclasses.replace(tensor, shape=(columns, rows),  # type: ignore[type-var]
                                                        data=tensor.data[head * size:(head + 1) * size]))  # type: ignore[union-attr]
                     for head in range(heads))

    def vector(self, name: str, length: int, required: bool = True) -> np.ndarray | None:
        tensor = self.get(name, (length,), required)
        if tensor is None:
            return None
        dtype = dtype_by_ggml(tensor.ggml_type, f"{tensor.path}: tensor {name}")
        return dequantize(tensor.data, dtype.name, (length,))

    def check_all_used(self) -> None:
        """Refuse tensors the forward pass would silently ignore (biases, rope factors, shared experts)."""
        for name, tensor in self.by_name.items():
            if name not in self.used and not _is_expert_tensor(name):
                raise UnsupportedModelError(f"{tensor.path}: tensor {name} is not supported by mer's forward pass")


def _is_expert_tensor(name: str) -> bool:
    return bool(MERGED_EXPERT_TENSOR.match(name) or PER_EXPERT_TENSOR.match(name) or EXPERT_BIAS_TENSOR.match(name))


def load_weights(parts: tuple[GGUFPart, ...], hparams: HParams, resident: bool = False) -> ModelWeights:
    """Locate and check every dense tensor of the model: computed on the mapped file, or with
    `resident` on copies read into this process's memory (`mer.model.resident`)."""
    tensors = _Tensors(parts, resident, hparams.num_blocks, hparams.nextn_blocks)
    embedding_tensor = tensors.by_name.get("token_embd.weight")
    if embedding_tensor is None or len(embedding_tensor.shape) != 2:
        raise UnsupportedModelError(f"{tensors.path}: tensor token_embd.weight is missing or not 2-D")
    vocab_size = embedding_tensor.shape[1]
    embedding = tensors.matrix("token_embd.weight", hparams.d_model, vocab_size)
    has_output = "output.weight" in tensors.by_name
    output = tensors.matrix("output.weight", hparams.d_model, vocab_size) if has_output else embedding
    blocks = tuple(_block_weights(tensors, hparams, block) for block in range(hparams.num_blocks))
    output_norm = tensors.vector("output_norm.weight", hparams.d_model)
    tensors.check_all_used()
    return ModelWeights(embedding, output_norm, output, blocks)  # type: ignore[arg-type]


def _block_weights(tensors: _Tensors, hparams: HParams, block: int) -> BlockWeights:
    prefix, d_model = f"blk.{block}", hparams.d_model
    q_norm_size, k_norm_size = _qk_norm_sizes(hparams)
    has_qk_norm = hparams.rules.qk_norm != QK_NORM_NONE
    qk_norm_required = not hparams.rules.qk_norm_optional  # glm4moe: each may be absent
    is_moe = hparams.is_moe_block(block)
    mla = _mla_weights(tensors, hparams, prefix) if hparams.mla is not None else None
    attention_width = hparams.q_width if hparams.mla is None else hparams.num_heads * hparams.mla.v_head
    return BlockWeights(
        attn_norm=tensors.vector(f"{prefix}.attn_norm.weight", d_model),  # type: ignore[arg-type]
        attn_q=None if mla else tensors.matrix(f"{prefix}.attn_q.weight", d_model, hparams.q_width),
        attn_k=None if mla else tensors.matrix(f"{prefix}.attn_k.weight", d_model, hparams.kv_width),
        attn_v=None if mla else tensors.matrix(f"{prefix}.attn_v.weight", d_model, hparams.kv_width),
        attn_output=tensors.matrix(f"{prefix}.attn_output.weight", attention_width, d_model),
        attn_q_norm=tensors.vector(f"{prefix}.attn_q_norm.weight", q_norm_size, qk_norm_required)
        if has_qk_norm else None,
        attn_k_norm=tensors.vector(f"{prefix}.attn_k_norm.weight", k_norm_size, qk_norm_required)
        if has_qk_norm else None,
        ffn_norm=tensors.vector(f"{prefix}.{hparams.rules.ffn_norm}.weight", d_model),  # type: ignore[arg-type]
        router=tensors.matrix(f"{prefix}.ffn_gate_inp.weight", d_model, hparams.num_experts) if is_moe else None,
        dense_ffn=None if is_moe else _dense_ffn(tensors, prefix, d_model),
        qkv_bias=_qkv_bias(tensors, hparams, prefix) if hparams.rules.qkv_bias else None,
        shared_expert=_shared_expert(tensors, hparams, prefix)
        if is_moe and hparams.rules.shared_expert and hparams.shared_expert_d_ff else None,
        attn_output_bias=tensors.vector(f"{prefix}.attn_output.bias", d_model) if hparams.rules.biases else None,
        attn_sinks=tensors.vector(f"{prefix}.attn_sinks.weight", hparams.num_heads) if hparams.rules.attention_sinks else None,
        router_bias=tensors.vector(f"{prefix}.ffn_gate_inp.bias", hparams.num_experts)
        if hparams.rules.biases and is_moe else None,
        selection_bias=tensors.vector(f"{prefix}.exp_probs_b.bias", hparams.num_experts, required=False)
        if is_moe else None,
        mla=mla,
    )


def _mla_weights(tensors: _Tensors, hparams: HParams, prefix: str) -> MLAWeights:
    shape, d_model, heads = hparams.mla, hparams.d_model, hparams.num_heads
    assert shape is not None
    q_rank = shape.q_lora_rank
    return MLAWeights(
        q=None if q_rank else tensors.matrix(f"{prefix}.attn_q.weight", d_model, hparams.q_width),
        q_a=tensors.matrix(f"{prefix}.attn_q_a.weight", d_model, q_rank) if q_rank else None,
        q_a_norm=tensors.vector(f"{prefix}.attn_q_a_norm.weight", q_rank) if q_rank else None,
        q_b=tensors.matrix(f"{prefix}.attn_q_b.weight", q_rank, hparams.q_width) if q_rank else None,
        kv_a=tensors.matrix(f"{prefix}.attn_kv_a_mqa.weight", d_model, shape.kv_lora_rank + shape.qk_rope),
        kv_a_norm=tensors.vector(f"{prefix}.attn_kv_a_norm.weight", shape.kv_lora_rank),  # type: ignore[arg-type]
        k_b=tensors.per_head(f"{prefix}.attn_k_b.weight", shape.qk_nope, shape.kv_lora_rank, heads),
        v_b=tensors.per_head(f"{prefix}.attn_v_b.weight", shape.kv_lora_rank, shape.v_head, heads),
    )


def _qkv_bias(tensors: _Tensors, hparams: HParams, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(tensors.vector(f"{prefix}.attn_{name}.bias", width)  # type: ignore[return-value]
                 for name, width in (("q", hparams.q_width), ("k", hparams.kv_width), ("v", hparams.kv_width)))


def _shared_expert(tensors: _Tensors, hparams: HParams, prefix: str) -> SharedExpert:
    d_model, d_ff = hparams.d_model, hparams.shared_expert_d_ff
    gate_input = None
    if hparams.rules.shared_expert_gate:
        vector = tensors.get(f"{prefix}.ffn_gate_inp_shexp.weight", (d_model,))
        gate_input = DenseMatrix.of(dataclasses.replace(vector, shape=(d_model, 1),  # type: ignore[arg-type]
                                                        data=vector.data.copy()))  # type: ignore[union-attr]
    return SharedExpert(gate_input=gate_input,
                        gate=tensors.matrix(f"{prefix}.ffn_gate_shexp.weight", d_model, d_ff),
                        up=tensors.matrix(f"{prefix}.ffn_up_shexp.weight", d_model, d_ff),
                        down=tensors.matrix(f"{prefix}.ffn_down_shexp.weight", d_ff, d_model))


def _qk_norm_sizes(hparams: HParams) -> tuple[int, int]:
    if hparams.rules.qk_norm == QK_NORM_PER_HEAD:
        return hparams.head_dim, hparams.head_dim
    return hparams.q_width, hparams.kv_width


def _dense_ffn(tensors: _Tensors, prefix: str, d_model: int) -> tuple[DenseMatrix, DenseMatrix, DenseMatrix]:
    gate = tensors.by_name.get(f"{prefix}.ffn_gate.weight")
    if gate is None or len(gate.shape) != 2:
        raise UnsupportedModelError(f"{tensors.path}: dense block {prefix}: tensor {prefix}.ffn_gate.weight is "
                                    f"missing or not 2-D")
    d_ff = gate.shape[1]
    return (tensors.matrix(f"{prefix}.ffn_gate.weight", d_model, d_ff),
            tensors.matrix(f"{prefix}.ffn_up.weight", d_model, d_ff),
            tensors.matrix(f"{prefix}.ffn_down.weight", d_ff, d_model))
