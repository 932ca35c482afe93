"""Matmul for the dtypes without a fused kernel (K-quants, f32, f16, bf16): one row at a time.

Each weight row (its block range) is dequantized into a small float32 buffer with the row
dequantizers of `mer.quant.dequant` (bit-identical to gguf-py), then dotted with every token's
float32 activation (float32 accumulation). Nothing but the one-row buffer is allocated, so the
whole matrix is never dequantized.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mer.quant import kernel_cache  # noqa: F401  (registers the cache locator before @njit runs)
from mer.quant.dequant import (
    dequantize_row_bf16,
    dequantize_row_f16,
    dequantize_row_f32,
    dequantize_row_q4_0,
    dequantize_row_q4_k,
    dequantize_row_q5_k,
    dequantize_row_q6_k,
    dequantize_row_q8_0,
)

_FAST = {"cache": True, "fastmath": True, "boundscheck": False, "nogil": True}

# Codes of the `dtype_code` argument (numba cannot pass the row dequantizer itself and cache).
DTYPE_CODES = {"f32": 0, "f16": 1, "bf16": 2, "q4_0": 3, "q8_0": 4, "q4_k": 5, "q5_k": 6, "q6_k": 7}


@njit(**_FAST)
def _dequantize_row(dtype_code, source, destination):  # type: ignore[no-untyped-def]
    if dtype_code == 0:
        dequantize_row_f32(source, destination)
    elif dtype_code == 1:
        dequantize_row_f16(source, destination)
    elif dtype_code == 2:
        dequantize_row_bf16(source, destination)
    elif dtype_code == 3:
        dequantize_row_q4_0(source, destination)
    elif dtype_code == 4:
        dequantize_row_q8_0(source, destination)
    elif dtype_code == 5:
        dequantize_row_q4_k(source, destination)
    elif dtype_code == 6:
        dequantize_row_q5_k(source, destination)
    else:
        dequantize_row_q6_k(source, destination)


@njit(**_FAST)
def dequantizing_matmul(
    dtype_code, weights, row_bytes, byte_start, byte_count, row_start, row_stop, x, out
):  # type: ignore[no-untyped-def]
    """`out[t, r - row_start] = dequantized(weights row r, bytes [byte_start, +byte_count)) · x[t]`.

    `x` is float32 `[batch, columns]`, the columns being the elements of the byte range.
    """
    buffer = np.empty(x.shape[1], dtype=np.float32)
    for row in range(row_start, row_stop):
        first = row * row_bytes + byte_start
        _dequantize_row(dtype_code, weights[first : first + byte_count], buffer)
        for token in range(x.shape[0]):
            total = np.float32(0)
            for column in range(x.shape[1]):
                total += buffer[column] * x[token, column]
            out[token, row - row_start] = total


@njit(parallel=True, **_FAST)
def dequantizing_matmul_parallel(
    dtype_code, weights, row_bytes, byte_start, byte_count, row_start, row_stop, x, out, num_chunks
):  # type: ignore[no-untyped-def]
    """`dequantizing_matmul` with the rows split into `num_chunks` chunks on numba's threads."""
    num_rows = row_stop - row_start
    for chunk in prange(num_chunks):
        start = row_start + chunk * num_rows // num_chunks
        stop = row_start + (chunk + 1) * num_rows // num_chunks
        part = out[:, start - row_start : stop - row_start]
        dequantizing_matmul(dtype_code, weights, row_bytes, byte_start, byte_count, start, stop, x, part)
