"""The "planar" matrix layout: the GGUF block bytes of a q4_0 / q8_0 matrix, permuted.

A native (GGUF) q4_0 or q8_0 matrix of `rows x columns` is `rows * blocks_per_row` blocks
(`blocks_per_row = columns / 32`), row-major, each block `[f16 d][quants]`:

    q4_0 block (18 bytes): d (2 bytes, little-endian f16), 16 bytes of nibbles (byte j holds
                           element j in its low nibble and element j + 16 in its high nibble)
    q8_0 block (34 bytes): d (2 bytes), 32 int8 elements

The planar layout moves every block's quants to the front and every scale to the back, keeping
block order (row-major) in both parts and the bytes inside each part untouched:

    offset 0:                       quants of block (0, 0), (0, 1), ..., (0, nb-1), (1, 0), ...
                                    (Q = 16 bytes per q4_0 block, 32 per q8_0 block)
    offset rows * nb * Q:           f16 d of block (0, 0), (0, 1), ..., (rows-1, nb-1)
                                    (2 bytes each)
    total: rows * nb * (Q + 2) bytes, exactly the native size

so block (r, b) has its quants at `(r * nb + b) * Q` and its scale at
`rows * nb * Q + (r * nb + b) * 2`. A kernel then reads 64 bytes of quants (4 q4_0 blocks or
2 q8_0 blocks) with one aligned-free load, and a run of consecutive blocks of one row (a column
slice of `down`) is one contiguous byte range in each part, so slicing needs no copy.

Every other dtype has no planar form: `to_planar` returns its bytes unchanged.
"""

from __future__ import annotations

import numpy as np

from mer.compute.dtypes import dtype_by_name
from mer.errors import ShapeError, UnsupportedDTypeError

PLANAR_DTYPES = ("q4_0", "q8_0")
SCALE_BYTES = 2


def has_planar_form(dtype: str) -> bool:
    """True when `dtype`'s planar layout differs from its native one."""
    return dtype_by_name(dtype).name in PLANAR_DTYPES


def quant_bytes_per_block(dtype: str) -> int:
    """Bytes of one block's quants (its size without the f16 scale)."""
    return dtype_by_name(dtype).type_size - SCALE_BYTES


def scales_offset(dtype: str, rows: int, columns: int) -> int:
    """Byte offset of the scale part in a planar matrix."""
    info = dtype_by_name(dtype)
    return rows * (columns // info.block_size) * quant_bytes_per_block(dtype)


def as_blocks(dtype: str, raw: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """`raw` as a `[num_blocks, type_size]` uint8 view, after checking its size."""
    info = dtype_by_name(dtype)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        raise UnsupportedDTypeError(f"{info.name} matrix bytes must be a uint8 numpy array")
    expected = info.matrix_nbytes(rows, columns)
    if raw.size != expected:
        raise ShapeError(
            f"{info.name} matrix of {rows}x{columns} needs {expected} bytes, got {raw.size}"
        )
    return np.ascontiguousarray(raw).reshape(-1, info.type_size)


def to_planar(dtype: str, raw: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The planar bytes (a new uint8 array of the same size) of a native `rows x columns` matrix."""
    if not has_planar_form(dtype):
        as_blocks(dtype, raw, rows, columns)
        return raw.reshape(-1)
    blocks = as_blocks(dtype, raw, rows, columns)
    num_quant_bytes = blocks.shape[0] * quant_bytes_per_block(dtype)
    planar = np.empty(raw.size, dtype=np.uint8)
    planar[:num_quant_bytes].reshape(blocks.shape[0], -1)[:] = blocks[:, SCALE_BYTES:]
    planar[num_quant_bytes:].reshape(blocks.shape[0], SCALE_BYTES)[:] = blocks[:, :SCALE_BYTES]
    return planar
