"""The MXFP4 matmul kernel on the packed bytes (portable numba), with q8_0-rounded activations.

An MXFP4 block (ggml's `block_mxfp4`, 17 bytes for 32 elements) is one E8M0 scale byte `e` and 16
bytes of 4-bit E2M1 codes, byte j holding element j in its low nibble and element j + 16 in its
high nibble: the nibble order of q4_0, so the activation is the q4_0-ordered q8_0 rounding of
`mer.quant.activation` (ggml's `vec_dot_type` for MXFP4 is Q8_0). Each code's value doubled is an
integer (`MXFP4_DOUBLED_VALUES`, -12..12), so a block's product is an exact integer dot of those
int8 values with the activation's int8 values, times `2^(e - 128)` (half the block scale, undoing
the doubling) times the activation block's scale, summed over the row's blocks in float32, as in
ggml's `ggml_vec_dot_mxfp4_q8_0`.

`addressing` is `matmul_quantized`'s tuple (quants at byte 1 of each 17-byte block, scales at 0).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mer.quant import kernel_cache  # noqa: F401  (registers the cache locator before @njit runs)
from mer.quant.dequant import MXFP4_DOUBLED_VALUES, e8m0_half_scale

_FAST = {"cache": True, "fastmath": True, "boundscheck": False, "nogil": True}
MXFP4_QUANTS_OFFSET = 1  # the scale byte comes first
MXFP4_SCALE_OFFSET = 0


@njit(**_FAST)
def portable_row_dot_mxfp4(
    weights: np.ndarray,
    quants_offset: int,
    quant_stride: int,
    scales_offset: int,
    scale_stride: int,
    num_blocks: int,
    quants: np.ndarray,
    block_scales: np.ndarray,
    token: int,
) -> np.float32:
    """One MXFP4 weight row (16 code bytes per block) times a q4_0-ordered q8_0 activation row."""
    table = MXFP4_DOUBLED_VALUES
    total = np.float32(0)
    for block in range(num_blocks):
        group, low_at = block // 4, (block % 4) * 16
        weight_at = quants_offset + block * quant_stride
        integer_dot = np.int32(0)
        for index in range(16):
            byte = np.int32(weights[weight_at + index])
            low = np.int32(quants[group, token, low_at + index]) - 128
            high = np.int32(quants[group, token, low_at + 64 + index]) - 128
            integer_dot += np.int32(table[byte & 15]) * low + np.int32(table[byte >> 4]) * high
        exponent = np.int64(weights[scales_offset + block * scale_stride])
        scale = block_scales[group, token, block % 4] * e8m0_half_scale(exponent)
        total += scale * np.float32(integer_dot)
    return total


@njit(**_FAST)
def mxfp4_matmul(weights, addressing, row_start, row_stop, quants, scales, out):  # type: ignore[no-untyped-def]
    """`out[t, r - row_start]` for rows [row_start, row_stop), one thread."""
    quants_base, quant_stride, scales_base, scale_stride, blocks_per_row, block_start, num_blocks = addressing
    for row in range(row_start, row_stop):
        first_block = row * blocks_per_row + block_start
        quants_at = quants_base + first_block * quant_stride
        scales_at = scales_base + first_block * scale_stride
        for token in range(quants.shape[1]):
            out[token, row - row_start] = portable_row_dot_mxfp4(
                weights, quants_at, quant_stride, scales_at, scale_stride, num_blocks, quants, scales, token
            )


@njit(parallel=True, **_FAST)
def mxfp4_matmul_parallel(weights, addressing, row_start, row_stop, quants, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    """`mxfp4_matmul` with the rows split into `num_chunks` chunks on numba's threads."""
    num_rows = row_stop - row_start
    for chunk in prange(num_chunks):
        start = row_start + chunk * num_rows // num_chunks
        stop = row_start + (chunk + 1) * num_rows // num_chunks
        part = out[:, start - row_start : stop - row_start]
        mxfp4_matmul(weights, addressing, start, stop, quants, scales, part)
