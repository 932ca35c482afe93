"""Find and describe the expert tensors of a Mixture-of-Experts GGUF model.

Supported tensor naming (llama.cpp's), for any architecture `{arch}` that uses it (Mixtral as
`llama`, `qwen3moe`, `olmoe`, ...):

- merged: `blk.N.ffn_{gate,up,down}_exps.weight`, 3-D with the expert outermost. GGML shapes (ne,
  fastest first): gate and up `[d_model, d_ff, n_expert]`, down `[d_ff, d_model, n_expert]`; the
  bytes of expert `e` are the contiguous slice `[e * m, (e + 1) * m)` of the tensor data, where
  `m` is one expert matrix's size in bytes.
- per expert (older files): `blk.N.ffn_{gate,up,down}.E.weight`, 2-D, one tensor per expert.

Blocks without expert tensors (dense layers) and shared experts (`ffn_*_shexp`) are not experts:
they stay in the GGUF. The last `{arch}.nextn_predict_layers` blocks (GLM-4.5's NextN / multi-token
prediction layers, which llama.cpp loads but never runs) are skipped altogether: their experts are
not located (never converted), their tensors are not loaded (`mer.model.weights`) nor counted
(`mer.runtime.ram_budget`), and `Geometry.num_layers` leaves them out. MoE layers are numbered 0..
in block order; each records its block index.
Geometry comes from `{arch}.block_count`, `{arch}.embedding_length`, `{arch}.expert_count`,
`{arch}.expert_used_count` and `{arch}.expert_feed_forward_length` or `{arch}.feed_forward_length`,
and is checked against the tensor shapes, which are the authority for d_ff.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from mer.compute.dtypes import DType, dtype_by_ggml
from mer.compute.expert_activation import expert_activation_of
from mer.errors import GGUFError, ShapeError
from mer.compute.expert_format import MATRIX_NAMES, ExpertFormat
from mer.store.gguf_files import GGUFPart, TensorData, open_parts
from mer.store.manifest import Geometry

MERGED_EXPERT_TENSOR = re.compile(r"^blk\.(?P<block>\d+)\.ffn_(?P<matrix>gate|up|down)_exps\.weight$")
PER_EXPERT_TENSOR = re.compile(r"^blk\.(?P<block>\d+)\.ffn_(?P<matrix>gate|up|down)\.(?P<expert>\d+)\.weight$")
EXPERT_BIAS_TENSOR = re.compile(r"^blk\.(?P<block>\d+)\.ffn_(?P<matrix>gate|up|down)_exps\.bias$")
FUSED_GATE_UP_TENSOR = re.compile(r"^blk\.\d+\.ffn_gate_up_exps\.weight$")
BLOCK_TENSOR = re.compile(r"^blk\.(?P<block>\d+)\.")


@dataclass(frozen=True)
class ExpertMatrixSource:
    """One matrix (gate, up or down) of every expert of a layer: one merged tensor or one per expert."""

    name: str
    dtype: DType
    rows: int
    columns: int
    merged: bool
    tensors: tuple[TensorData, ...]

    @property
    def expert_nbytes(self) -> int:
        return self.dtype.matrix_nbytes(self.rows, self.columns)

    def expert_bytes(self, expert: int) -> tuple[TensorData, np.ndarray]:
        """The tensor holding this expert's matrix and the matrix's bytes (a view, not a copy)."""
        if not self.merged:
            return self.tensors[expert], self.tensors[expert].data
        size = self.expert_nbytes
        return self.tensors[0], self.tensors[0].data[expert * size : (expert + 1) * size]


@dataclass(frozen=True)
class MoELayerSource:
    """The experts of one MoE layer: its index among MoE layers, its block and its three matrices."""

    moe_layer: int
    block: int
    matrices: tuple[ExpertMatrixSource, ExpertMatrixSource, ExpertMatrixSource]
    biases: tuple[TensorData, TensorData, TensorData] | None = None  # f32 [rows, experts] (gpt-oss)
    activation: str = "silu"

    @property
    def dtypes(self) -> tuple[str, str, str]:
        return tuple(matrix.dtype.name for matrix in self.matrices)  # type: ignore[return-value]

    def expert_format(self, d_model: int, d_ff: int, layout: str = "native") -> ExpertFormat:
        return ExpertFormat.build(d_model, d_ff, self.dtypes, layout, self.activation, self.biases is not None)

    def bias_bytes(self, expert: int) -> list[tuple[TensorData, np.ndarray]]:
        """(tensor, bytes) of the expert's gate, up and down biases (views); empty without biases."""
        pieces = []
        for tensor in self.biases or ():
            size = tensor.shape[0] * 4
            pieces.append((tensor, tensor.data[expert * size : (expert + 1) * size]))
        return pieces


@dataclass(frozen=True)
class GGUFSource:
    """A MoE GGUF model (one file or all parts of a split one) with its experts located."""

    parts: tuple[GGUFPart, ...]
    geometry: Geometry
    layers: tuple[MoELayerSource, ...]
    nextn_blocks: int = 0  # the last blocks of the file, skipped (NextN layers; `geometry.num_layers` excludes them)

    def is_skipped(self, tensor_name: str) -> bool:
        """True for the tensors of the skipped NextN blocks."""
        return is_skipped_tensor(tensor_name, self.geometry.num_layers, self.nextn_blocks)

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(part.path for part in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def expert_format(self, moe_layer: int, layout: str = "native") -> ExpertFormat:
        return self.layers[moe_layer].expert_format(self.geometry.d_model, self.geometry.d_ff, layout)


def read_gguf_source(path: str | os.PathLike) -> GGUFSource:
    """Open a MoE GGUF (a split model by any of its parts) and locate and check every expert tensor."""
    parts = open_parts(path)
    first = parts[0]
    architecture = _required(first, "general.architecture")
    num_blocks, nextn = _run_blocks(first, architecture)
    tensors = [tensor for part in parts for tensor in part.tensors
               if not is_skipped_tensor(tensor.name, num_blocks, nextn)]
    by_block = _expert_tensors_by_block(first.path, tensors)
    num_experts = _required_count(first, f"{architecture}.expert_count")
    biases = _expert_biases_by_block(tensors, num_experts)
    activation = expert_activation_of(architecture)
    layers = tuple(_with_biases(_layer_source(moe_layer, block, by_block[block], num_experts), biases, activation)
                   for moe_layer, block in enumerate(sorted(by_block)))
    geometry = _geometry(first, architecture, layers, num_experts, num_blocks)
    return GGUFSource(parts, geometry, layers, nextn)


def is_skipped_tensor(name: str, num_blocks: int, nextn_blocks: int) -> bool:
    """True for a tensor of a NextN block (`blk.N.*` with N >= the `num_blocks` run)."""
    match = BLOCK_TENSOR.match(name) if nextn_blocks else None
    return match is not None and int(match["block"]) >= num_blocks


def _run_blocks(part: GGUFPart, architecture: str) -> tuple[int, int]:
    """(blocks the forward pass runs, NextN blocks skipped after them): `block_count` less
    `nextn_predict_layers` (llama.cpp's n_layer and n_layer_nextn)."""
    block_count = _required_count(part, f"{architecture}.block_count")
    key = f"{architecture}.nextn_predict_layers"
    nextn = part.value(key)
    if nextn is None:
        return block_count, 0
    if isinstance(nextn, bool) or not isinstance(nextn, int) or not 0 <= nextn < block_count:
        raise GGUFError(f"{part.path}: metadata key {key} is {nextn!r}, expected an integer in 0..{block_count - 1} "
                        f"({architecture}.block_count {block_count})")
    return block_count - nextn, nextn


def _expert_biases_by_block(tensors: list[TensorData], num_experts: int) -> dict[int, dict[str, TensorData]]:
    """{block: {matrix name: bias tensor}} of the merged expert biases (f32 `[rows, experts]`)."""
    found: dict[int, dict[str, TensorData]] = defaultdict(dict)
    for tensor in tensors:
        if match := EXPERT_BIAS_TENSOR.match(tensor.name):
            if tensor.ggml_type != GGMLQuantizationType.F32 or len(tensor.shape) != 2 or tensor.shape[1] != num_experts:
                raise ShapeError(f"{tensor.path}: tensor {tensor.name} must be f32 of GGML shape [rows, {num_experts}], "
                                 f"got {GGMLQuantizationType(tensor.ggml_type).name} {list(tensor.shape)}")
            found[int(match["block"])][match["matrix"]] = tensor
    return found


def _with_biases(layer: MoELayerSource, biases: dict[int, dict[str, TensorData]], activation: str) -> MoELayerSource:
    """The layer with its expert biases (all three or none) and the architecture's activation."""
    found = biases.get(layer.block, {})
    if not found:
        return replace(layer, activation=activation)
    missing = [name for name in MATRIX_NAMES if name not in found]
    if missing:
        tensor = next(iter(found.values()))
        raise GGUFError(f"{tensor.path}: block {layer.block} has expert biases but no blk.{layer.block}.ffn_{missing[0]}"
                        f"_exps.bias")
    for matrix in layer.matrices:
        tensor = found[matrix.name]
        if tensor.shape[0] != matrix.rows:
            raise ShapeError(f"{tensor.path}: tensor {tensor.name} has {tensor.shape[0]} rows, the {matrix.name} "
                             f"experts have {matrix.rows}")
    return replace(layer, biases=tuple(found[name] for name in MATRIX_NAMES), activation=activation)


def _required(part: GGUFPart, key: str) -> Any:
    value = part.value(key)
    if value is None:
        raise GGUFError(f"{part.path}: metadata key {key} is missing")
    return value


def _required_count(part: GGUFPart, key: str) -> int:
    value = _required(part, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GGUFError(f"{part.path}: metadata key {key} is {value!r}, expected a non-negative integer")
    return value


def _expert_tensors_by_block(path: Path, tensors: list[TensorData]) -> dict[int, dict[str, list]]:
    """{block: {matrix name: [(expert or None, tensor), ...]}} for every expert tensor."""
    by_block: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for tensor in tensors:
        if FUSED_GATE_UP_TENSOR.match(tensor.name):
            raise GGUFError(f"{tensor.path}: tensor {tensor.name}: fused gate+up expert tensors are not supported")
        if match := MERGED_EXPERT_TENSOR.match(tensor.name):
            by_block[int(match["block"])][match["matrix"]].append((None, tensor))
        elif match := PER_EXPERT_TENSOR.match(tensor.name):
            by_block[int(match["block"])][match["matrix"]].append((int(match["expert"]), tensor))
    if not by_block:
        raise GGUFError(
            f"{path}: no MoE expert tensors (blk.N.ffn_{{gate,up,down}}_exps.weight or "
            f"blk.N.ffn_{{gate,up,down}}.E.weight): not a Mixture-of-Experts model"
        )
    return by_block


def _layer_source(moe_layer: int, block: int, found: dict[str, list], num_experts: int) -> MoELayerSource:
    matrices = []
    for name in MATRIX_NAMES:
        if name not in found:
            present = [tensor for entries in found.values() for _, tensor in entries[:1]]
            raise GGUFError(f"{present[0].path}: block {block} has expert tensors "
                            f"({', '.join(t.name for t in present)}) but no ffn_{name} expert tensor")
        matrices.append(_matrix_source(name, block, found[name], num_experts))
    _check_shapes_agree(block, matrices)
    return MoELayerSource(moe_layer, block, (matrices[0], matrices[1], matrices[2]))


def _matrix_source(name: str, block: int, entries: list, num_experts: int) -> ExpertMatrixSource:
    experts = [expert for expert, _ in entries]
    if None in experts:
        if len(entries) > 1:
            raise GGUFError(f"{entries[0][1].path}: block {block}: both merged and per-expert ffn_{name} tensors")
        return _merged_matrix(name, entries[0][1], num_experts)
    return _per_expert_matrix(name, block, dict(entries), num_experts)


def _merged_matrix(name: str, tensor: TensorData, num_experts: int) -> ExpertMatrixSource:
    dtype = dtype_by_ggml(tensor.ggml_type, f"{tensor.path}: tensor {tensor.name}")
    if len(tensor.shape) != 3:
        raise ShapeError(f"{tensor.path}: tensor {tensor.name} has shape {list(tensor.shape)}, expected 3 dimensions "
                         f"[columns, rows, experts]")
    columns, rows, count = tensor.shape
    if count != num_experts:
        raise ShapeError(f"{tensor.path}: tensor {tensor.name} holds {count} experts, expert_count is {num_experts}")
    _check_blocks(tensor, dtype, columns)
    return ExpertMatrixSource(name, dtype, rows, columns, True, (tensor,))


def _per_expert_matrix(name: str, block: int, tensors: dict[int, TensorData], num_experts: int) -> ExpertMatrixSource:
    missing = [expert for expert in range(num_experts) if expert not in tensors]
    extra = sorted(expert for expert in tensors if expert >= num_experts)
    if missing or extra:
        wanted = f"blk.{block}.ffn_{name}.{missing[0]}.weight is missing" if missing else f"expert {extra[0]} is extra"
        path = next(iter(tensors.values())).path
        raise GGUFError(f"{path}: block {block}: per-expert ffn_{name} tensors for {num_experts} experts: {wanted}")
    first = tensors[0]
    dtype = dtype_by_ggml(first.ggml_type, f"{first.path}: tensor {first.name}")
    for expert in range(num_experts):
        tensor = tensors[expert]
        if tensor.ggml_type != first.ggml_type or tensor.shape != first.shape:
            raise ShapeError(f"{tensor.path}: tensor {tensor.name} ({dtype_by_ggml(tensor.ggml_type, tensor.name).name}"
                             f" {list(tensor.shape)}) differs from {first.name} ({dtype.name} {list(first.shape)})")
    if len(first.shape) != 2:
        raise ShapeError(f"{first.path}: tensor {first.name} has shape {list(first.shape)}, expected [columns, rows]")
    columns, rows = first.shape
    _check_blocks(first, dtype, columns)
    return ExpertMatrixSource(name, dtype, rows, columns, False, tuple(tensors[e] for e in range(num_experts)))


def _check_blocks(tensor: TensorData, dtype: DType, columns: int) -> None:
    if columns % dtype.block_size:
        raise ShapeError(f"{tensor.path}: tensor {tensor.name}: rows of {columns} elements are not whole "
                         f"{dtype.name} blocks of {dtype.block_size}")


def _check_shapes_agree(block: int, matrices: list[ExpertMatrixSource]) -> None:
    gate, up, down = matrices
    d_model, d_ff = gate.columns, gate.rows
    expected = {"gate": (d_ff, d_model), "up": (d_ff, d_model), "down": (d_model, d_ff)}
    for matrix in matrices:
        if (matrix.rows, matrix.columns) != expected[matrix.name]:
            tensor = matrix.tensors[0]
            raise ShapeError(
                f"{tensor.path}: tensor {tensor.name} is {matrix.rows} rows x {matrix.columns} columns, but "
                f"block {block}'s gate expert tensor is {d_ff} x {d_model}, so {matrix.name} must be "
                f"{expected[matrix.name][0]} x {expected[matrix.name][1]}"
            )


def _geometry(part: GGUFPart, architecture: str, layers: tuple[MoELayerSource, ...], num_experts: int,
              num_blocks: int) -> Geometry:
    d_model = _required_count(part, f"{architecture}.embedding_length")
    top_k = _required_count(part, f"{architecture}.expert_used_count")
    first = layers[0].matrices[0]
    for layer in layers:
        gate = layer.matrices[0]
        if gate.columns != d_model:
            raise ShapeError(f"{part.path}: tensor {gate.tensors[0].name} has d_model {gate.columns}, "
                             f"{architecture}.embedding_length is {d_model}")
        if gate.rows != first.rows:
            raise ShapeError(f"{part.path}: tensor {gate.tensors[0].name} has d_ff {gate.rows}, "
                             f"{first.tensors[0].name} has {first.rows}; mer needs one expert d_ff per model")
        if layer.block >= num_blocks:
            raise GGUFError(f"{part.path}: expert tensors in block {layer.block}, "
                            f"{architecture}.block_count is {num_blocks}")
    if not 1 <= top_k <= num_experts:
        raise GGUFError(f"{part.path}: {architecture}.expert_used_count is {top_k}, expected 1..{num_experts}")
    _check_feed_forward_length(part, architecture, first, has_dense_blocks=len(layers) < num_blocks)
    return Geometry(architecture, num_blocks, len(layers), num_experts, top_k, d_model, first.rows)


def _check_feed_forward_length(part: GGUFPart, architecture: str, gate: ExpertMatrixSource,
                               has_dense_blocks: bool) -> None:
    """The d_ff key must match the tensors. `feed_forward_length` may instead describe dense blocks."""
    key = f"{architecture}.expert_feed_forward_length"
    value = part.value(key)
    if value is None:
        key = f"{architecture}.feed_forward_length"
        value = part.value(key)
        if value is None or has_dense_blocks or isinstance(value, list):
            return  # absent, or the dense blocks' size, or per block: the tensor shapes decide
    if value != gate.rows:
        raise ShapeError(f"{part.path}: {key} is {value}, but tensor {gate.tensors[0].name} has d_ff {gate.rows}")
