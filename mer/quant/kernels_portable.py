"""Portable q4_0 / q8_0 row dot products (plain numba), for CPUs without AVX-512 VNNI.

Same inputs and the same exact per-block integer dot as `mer.quant.kernels_vnni` (so the same
q8_0-rounded activation layout of `mer.quant.activation`); only the float32 summation order of
the block products differs (activation arrays are `[group, token, ...]`, values stored as
`q + 128`). Each function returns the dot of one weight row (a run of
`num_blocks` blocks at `quants_offset` / `scales_offset`, consecutive blocks `quant_stride` /
`scale_stride` bytes apart) with the activation row of one token.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mer.quant import kernel_cache  # noqa: F401  (registers the cache locator before @njit runs)
from mer.quant.dequant import _read_float16

_FAST = {"cache": True, "fastmath": True, "boundscheck": False, "nogil": True}


@njit(**_FAST)
def portable_row_dot_q4_0(
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
    """q4_0 weights (16 nibble bytes per block) times a q4_0-ordered q8_0 activation."""
    total = np.float32(0)
    for block in range(num_blocks):
        group, low_at = block // 4, (block % 4) * 16
        weight_at = quants_offset + block * quant_stride
        integer_dot = np.int32(0)
        for index in range(16):
            byte = np.int32(weights[weight_at + index])
            low = np.int32(quants[group, token, low_at + index]) - 128
            high = np.int32(quants[group, token, low_at + 64 + index]) - 128
            integer_dot += np.int32(((byte & 15) - 8) * low + ((byte >> 4) - 8) * high)
        activation_scale = block_scales[group, token, block % 4]
        scale = _read_float16(weights, scales_offset + block * scale_stride) * activation_scale
        total += np.float32(integer_dot) * scale
    return total


@njit(**_FAST)
def portable_row_dot_q8_0(
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
    """q8_0 weights (32 int8 per block) times a q8_0 activation in natural order."""
    total = np.float32(0)
    for block in range(num_blocks):
        weight_at = quants_offset + block * quant_stride
        integer_dot = np.int32(0)
        group, at = block // 2, (block % 2) * 32
        for index in range(32):
            weight = np.int32(np.int8(weights[weight_at + index]))
            integer_dot += weight * (np.int32(quants[group, token, at + index]) - 128)
        activation_scale = block_scales[group, token, block % 2]
        scale = _read_float16(weights, scales_offset + block * scale_stride) * activation_scale
        total += np.float32(integer_dot) * scale
    return total
