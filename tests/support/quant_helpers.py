"""Test-only views of the quantized formats: random matrices, scale ranges, the inverse layouts,
and the Q8_K activation rounding written out from ggml's rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mer.compute.dtypes import DType, dtype_by_name
from mer.quant.activation import ACTIVATION_OFFSET, BLOCK_SIZE, QuantizedActivation
from mer.quant.planar import SCALE_BYTES, as_blocks, has_planar_form, quant_bytes_per_block
from mer.quant.random_blocks import (_SCALE_FIELDS, _SIGNED_SCALES, _nominal_scales, _scale_table,
                                     fill_random_matrix, seed_key)


def random_matrix(
    dtype: str | DType, rows: int, columns: int, seed: int | Sequence[int], std: float | None = None
) -> np.ndarray:
    """A random valid `rows` x `columns` matrix as uint8 of shape (rows, row bytes), GGUF layout.

    `gguf.quants.dequantize(result, dtype.ggml_type)` gives float32 of shape (rows, columns),
    mean ~0 and standard deviation ~`std` (default 1 / sqrt(columns)).
    """
    dtype = dtype if isinstance(dtype, DType) else dtype_by_name(dtype)
    out = np.empty((rows, dtype.row_nbytes(columns)), dtype=np.uint8)
    fill_random_matrix(out, dtype, rows, columns, seed_key(seed), std)
    return out


@dataclass(frozen=True)
class ScaleRange:
    """The closed range of f16 values one scale field is drawn from (after f16 rounding).

    With `signed`, the magnitude lies in [low, high] and the sign is random.
    """

    low: float
    high: float
    signed: bool = False

    def contains(self, values: np.ndarray) -> np.ndarray:
        magnitude = np.abs(values) if self.signed else values
        return (magnitude >= self.low) & (magnitude <= self.high)


def scale_ranges(dtype: str | DType, std: float) -> dict[str, ScaleRange]:
    """Range of every f16 scale field ("d", and "dmin" for q4_k/q5_k) of random matrices; empty for float dtypes."""
    name = dtype.name if isinstance(dtype, DType) else dtype_by_name(dtype).name
    if name not in _SCALE_FIELDS:
        return {}
    signed = name in _SIGNED_SCALES
    ranges = {}
    for field, nominal in _nominal_scales(name, std).items():
        magnitudes = np.abs(_scale_table(nominal, signed).view(np.float16))
        ranges[field] = ScaleRange(float(magnitudes.min()), float(magnitudes.max()), signed)
    return ranges


def from_planar(dtype: str, planar: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The native GGUF bytes (a new uint8 array) of a planar `rows x columns` matrix."""
    if not has_planar_form(dtype):
        as_blocks(dtype, planar, rows, columns)
        return planar.reshape(-1)
    blocks_shape = as_blocks(dtype, planar, rows, columns).shape
    flat = np.ascontiguousarray(planar).reshape(-1)
    num_blocks = blocks_shape[0]
    num_quant_bytes = num_blocks * quant_bytes_per_block(dtype)
    native = np.empty(blocks_shape, dtype=np.uint8)
    native[:, :SCALE_BYTES] = flat[num_quant_bytes:].reshape(num_blocks, SCALE_BYTES)
    native[:, SCALE_BYTES:] = flat[:num_quant_bytes].reshape(num_blocks, -1)
    return native.reshape(-1)


def dequantize_activation(activation: QuantizedActivation) -> np.ndarray:
    """The float32 values the kernels multiply with (q * d), `[batch, n]` in natural order."""
    num_groups, batch, group_bytes = activation.quants.shape
    quants = (activation.quants ^ np.uint8(ACTIVATION_OFFSET)).view(np.int8).transpose(1, 0, 2)
    if activation.weight_dtype == "q4_0":
        grouped = quants.reshape(batch, num_groups, 2, 4, BLOCK_SIZE // 2)
        quants = grouped.transpose(0, 1, 3, 2, 4)
    blocks = quants.reshape(batch, -1, BLOCK_SIZE).astype(np.float32)
    scales = activation.block_scales.transpose(1, 0, 2).reshape(batch, -1)
    values = blocks * scales[:, :, None]
    return values.reshape(batch, -1)[:, : activation.num_blocks * BLOCK_SIZE]


def reference_q8_k(x: np.ndarray) -> np.ndarray:
    """ggml's Q8_K rounding of float32 rows (256-blocks), dequantized, as float64: the value of
    largest magnitude (first on ties) maps to -127, `q = min(127, rint(x * -127 / max))`,
    `d = 1 / (-127 / max)` in float32."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 256)
    first_largest = np.abs(blocks).argmax(axis=2)[:, :, None]
    largest = np.take_along_axis(blocks, first_largest, axis=2)
    safe = np.where(largest == 0, np.float32(1), largest)
    inverse = np.where(largest == 0, np.float32(0), np.float32(-127) / safe).astype(np.float32)
    q = np.minimum(np.rint(blocks * inverse), 127)
    d = np.where(inverse == 0, np.float32(0), np.float32(1) / np.where(inverse == 0, 1, inverse)).astype(np.float32)
    return (q * d.astype(np.float64)).reshape(x.shape)
