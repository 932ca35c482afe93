"""Row loops of the q4_K / q5_K / q6_K matmul: `out[t, r] = weights[row r, super-blocks] · x[t]`.

`x` is a `mer.quant.activation_k.SuperBlockActivation` (quants, sums, scales). `position` =
(offset, row_stride, num_blocks): row r's super-blocks start at byte `offset + r * row_stride`.

The SIMD kernels (`kernels_kquant.kquant_dot`, 64-byte vectors on AVX-512 VNNI CPUs, 32-byte on
AVX2 ones) take rows two at a time and tokens eight at a time, then the leftovers in smaller
steps (measured on a 1024 x 4096 q4_K matrix, batch 8, one thread, AVX-512: 2 rows x 8 tokens
0.24 ns per weight byte, 2 x 4 0.27, 1 x 8 0.25); the portable kernel goes row by row, token by
token, with the same integer sums. Rows are split into chunks over numba's threads in the
`*_parallel` variants.
"""

from __future__ import annotations

import numpy as np
from numba import literally, njit, prange

from mer.quant import kernel_cache  # noqa: F401  (registers the cache locator before @njit runs)
from mer.quant.activation_k import k4_activation_position
from mer.quant.dequant import _read_float16
from mer.quant.kernels_kquant import kquant_dot
from mer.quant.matmul_quantized import _store

# No fastmath: the kernels' float operations are explicit IR, in a fixed order; with fast-math
# flags LLVM may reassociate them differently in a fresh compile and in a cached one (measured:
# the q4_K sums of a fresh process and of one loading numba's cache differed in the last bit).
_FAST = {"cache": True, "fastmath": False, "boundscheck": False, "nogil": True}

PORTABLE_CODES = {"q4_k": 0, "q5_k": 1, "q6_k": 2}


@njit(**_FAST)
def _row_block(weights, position, row, num_rows, quants, sums, scales, out, column, dtype, width):  # type: ignore[no-untyped-def]
    """All tokens of `num_rows` (1 or 2, a literal) rows starting at `row`."""
    literally(dtype)
    literally(width)
    literally(num_rows)
    offset, row_stride, num_blocks = position
    at = (offset + row * row_stride, row_stride, num_blocks)
    batch = quants.shape[1]
    token = 0
    while batch - token >= 8:
        results8 = kquant_dot(weights, at, quants, sums, scales, token, dtype, width, num_rows, 8)
        _store(out, token, column, num_rows, 8, results8)
        token += 8
    if batch - token >= 4:
        results4 = kquant_dot(weights, at, quants, sums, scales, token, dtype, width, num_rows, 4)
        _store(out, token, column, num_rows, 4, results4)
        token += 4
    if batch - token >= 2:
        results2 = kquant_dot(weights, at, quants, sums, scales, token, dtype, width, num_rows, 2)
        _store(out, token, column, num_rows, 2, results2)
        token += 2
    if batch - token >= 1:
        results1 = kquant_dot(weights, at, quants, sums, scales, token, dtype, width, num_rows, 1)
        _store(out, token, column, num_rows, 1, results1)


@njit(**_FAST)
def _rows(weights, position, row_start, row_stop, quants, sums, scales, out, out_base, dtype, width):  # type: ignore[no-untyped-def]
    literally(dtype)
    literally(width)
    row = row_start
    while row_stop - row >= 2:
        _row_block(weights, position, row, 2, quants, sums, scales, out, row - out_base, dtype, width)
        row += 2
    if row < row_stop:
        _row_block(weights, position, row, 1, quants, sums, scales, out, row - out_base, dtype, width)


@njit(**_FAST)
def _pair_chunk(row_start, row_stop, chunk, num_chunks):  # type: ignore[no-untyped-def]
    """Rows [start, stop) of chunk `chunk` of `num_chunks` (even sizes, so row pairs stay whole)."""
    num_pairs = (row_stop - row_start + 1) // 2
    start = min(row_start + 2 * (chunk * num_pairs // num_chunks), row_stop)
    stop = min(row_start + 2 * ((chunk + 1) * num_pairs // num_chunks), row_stop)
    return start, stop


# One entry point per (dtype, width), each a numba function of its own: an entry taking the
# variant as a `literally` argument is re-dispatched by numba in Python on every call (~3 ms),
# and one branching at run time on a code would compile all six variants at once.
# Each: `out[t, r - row_start]` for rows [row_start, row_stop); `_parallel` on numba's threads.


@njit(**_FAST)
def _q4_k_64(weights, position, row_start, row_stop, quants, sums, scales, out):  # type: ignore[no-untyped-def]
    _rows(weights, position, row_start, row_stop, quants, sums, scales, out, row_start, "q4_k", 64)


@njit(**_FAST)
def _q5_k_64(weights, position, row_start, row_stop, quants, sums, scales, out):  # type: ignore[no-untyped-def]
    _rows(weights, position, row_start, row_stop, quants, sums, scales, out, row_start, "q5_k", 64)


@njit(**_FAST)
def _q6_k_64(weights, position, row_start, row_stop, quants, sums, scales, out):  # type: ignore[no-untyped-def]
    _rows(weights, position, row_start, row_stop, quants, sums, scales, out, row_start, "q6_k", 64)


@njit(**_FAST)
def _q4_k_32(weights, position, row_start, row_stop, quants, sums, scales, out):  # type: ignore[no-untyped-def]
    _rows(weights, position, row_start, row_stop, quants, sums, scales, out, row_start, "q4_k", 32)


@njit(**_FAST)
def _q5_k_32(weights, position, row_start, row_stop, quants, sums, scales, out):  # type: ignore[no-untyped-def]
    _rows(weights, position, row_start, row_stop, quants, sums, scales, out, row_start, "q5_k", 32)


@njit(**_FAST)
def _q6_k_32(weights, position, row_start, row_stop, quants, sums, scales, out):  # type: ignore[no-untyped-def]
    _rows(weights, position, row_start, row_stop, quants, sums, scales, out, row_start, "q6_k", 32)


@njit(parallel=True, **_FAST)
def _q4_k_64_parallel(weights, position, row_start, row_stop, quants, sums, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    for chunk in prange(num_chunks):
        start, stop = _pair_chunk(row_start, row_stop, chunk, num_chunks)
        _rows(weights, position, start, stop, quants, sums, scales, out, row_start, "q4_k", 64)


@njit(parallel=True, **_FAST)
def _q5_k_64_parallel(weights, position, row_start, row_stop, quants, sums, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    for chunk in prange(num_chunks):
        start, stop = _pair_chunk(row_start, row_stop, chunk, num_chunks)
        _rows(weights, position, start, stop, quants, sums, scales, out, row_start, "q5_k", 64)


@njit(parallel=True, **_FAST)
def _q6_k_64_parallel(weights, position, row_start, row_stop, quants, sums, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    for chunk in prange(num_chunks):
        start, stop = _pair_chunk(row_start, row_stop, chunk, num_chunks)
        _rows(weights, position, start, stop, quants, sums, scales, out, row_start, "q6_k", 64)


@njit(parallel=True, **_FAST)
def _q4_k_32_parallel(weights, position, row_start, row_stop, quants, sums, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    for chunk in prange(num_chunks):
        start, stop = _pair_chunk(row_start, row_stop, chunk, num_chunks)
        _rows(weights, position, start, stop, quants, sums, scales, out, row_start, "q4_k", 32)


@njit(parallel=True, **_FAST)
def _q5_k_32_parallel(weights, position, row_start, row_stop, quants, sums, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    for chunk in prange(num_chunks):
        start, stop = _pair_chunk(row_start, row_stop, chunk, num_chunks)
        _rows(weights, position, start, stop, quants, sums, scales, out, row_start, "q5_k", 32)


@njit(parallel=True, **_FAST)
def _q6_k_32_parallel(weights, position, row_start, row_stop, quants, sums, scales, out, num_chunks):  # type: ignore[no-untyped-def]
    for chunk in prange(num_chunks):
        start, stop = _pair_chunk(row_start, row_stop, chunk, num_chunks)
        _rows(weights, position, start, stop, quants, sums, scales, out, row_start, "q6_k", 32)


# (dtype, vector width in bytes) -> (one-thread entry, parallel entry taking `num_chunks` last)
SIMD_KQUANT_KERNELS = {
    ("q4_k", 64): (_q4_k_64, _q4_k_64_parallel),
    ("q5_k", 64): (_q5_k_64, _q5_k_64_parallel),
    ("q6_k", 64): (_q6_k_64, _q6_k_64_parallel),
    ("q4_k", 32): (_q4_k_32, _q4_k_32_parallel),
    ("q5_k", 32): (_q5_k_32, _q5_k_32_parallel),
    ("q6_k", 32): (_q6_k_32, _q6_k_32_parallel),
}


# Where natural element e (0..255) of a q4_K/q5_K super-block sits in the activation.
_k4_activation_position = njit(**_FAST)(k4_activation_position)


@njit(**_FAST)
def _unpack_super_block(weights, at, dtype_code, values, factors, offsets):  # type: ignore[no-untyped-def]
    """Unsigned quants (natural order) into `values`; per 16-element run its integer scale
    into `factors` and its integer min (q4_K/q5_K) into `offsets`. Returns (d, dmin)."""
    if dtype_code == 2:  # q6_k
        for half in range(2):
            for element in range(128):
                run, index = element // 32, element % 32
                low = np.int32(weights[at + 64 * half + 32 * (run % 2) + index])
                nibble = low & 0x0F if run < 2 else low >> 4
                high = (np.int32(weights[at + 128 + 32 * half + index]) >> (2 * run)) & 3
                values[128 * half + element] = nibble | (high << 4)
        for run in range(16):
            scale = np.int32(weights[at + 192 + run])
            factors[run] = scale - 256 if scale > 127 else scale
            offsets[run] = 0
        return _read_float16(weights, at + 208), np.float32(0)
    quants_at = at + (48 if dtype_code == 1 else 16)
    for element in range(256):
        chunk, nibble, index = element // 64, (element // 32) % 2, element % 32
        byte = np.int32(weights[quants_at + 32 * chunk + index])
        value = byte & 0x0F if nibble == 0 else byte >> 4
        if dtype_code == 1:
            value |= ((np.int32(weights[at + 16 + index]) >> (2 * chunk + nibble)) & 1) << 4
        values[element] = value
    for sub_block in range(8):
        if sub_block < 4:
            scale = np.int32(weights[at + 4 + sub_block]) & 63
            minimum = np.int32(weights[at + 8 + sub_block]) & 63
        else:
            packed = np.int32(weights[at + 8 + sub_block])
            scale = (packed & 0x0F) | ((np.int32(weights[at + sub_block]) >> 6) << 4)
            minimum = (packed >> 4) | ((np.int32(weights[at + 4 + sub_block]) >> 6) << 4)
        factors[2 * sub_block] = factors[2 * sub_block + 1] = scale
        offsets[2 * sub_block] = offsets[2 * sub_block + 1] = minimum
    return _read_float16(weights, at), _read_float16(weights, at + 2)


@njit(**_FAST)
def portable_kquant_matmul(weights, position, row_start, row_stop, quants, sums, scales, out, dtype_code):  # type: ignore[no-untyped-def]
    """`out[t, r - row_start]` for rows [row_start, row_stop), plain numba, one thread."""
    offset, row_stride, num_blocks = position
    block_bytes = (144, 176, 210)[dtype_code]
    values = np.empty(256, dtype=np.int32)
    factors = np.empty(16, dtype=np.int32)
    offsets = np.empty(16, dtype=np.int32)
    for row in range(row_start, row_stop):
        for token in range(quants.shape[1]):
            out[token, row - row_start] = 0
        for block in range(num_blocks):
            at = offset + row * row_stride + block * block_bytes
            d, dmin = _unpack_super_block(weights, at, dtype_code, values, factors, offsets)
            for token in range(quants.shape[1]):
                products = np.int32(0)
                corrections = np.int32(0)
                for run in range(16):
                    run_dot = np.int32(0)
                    for index in range(16):
                        element = 16 * run + index
                        where = element if dtype_code == 2 else _k4_activation_position(element)
                        run_dot += values[element] * np.int32(quants[block, token, where])
                    products += factors[run] * run_dot
                    weight_sum = np.int32(sums[block, token, run])
                    corrections += (32 * factors[run] if dtype_code == 2 else offsets[run]) * weight_sum
                d_x = scales[block, token, 0]
                if dtype_code == 2:
                    value = (d * d_x) * np.float32(products - corrections)
                else:
                    value = (d * d_x) * np.float32(products) - (dmin * d_x) * np.float32(corrections)
                out[token, row - row_start] += value


@njit(parallel=True, **_FAST)
def portable_kquant_matmul_parallel(weights, position, row_start, row_stop, quants, sums, scales, out, dtype_code, num_chunks):  # type: ignore[no-untyped-def]
    """`portable_kquant_matmul` with the rows split into `num_chunks` chunks on numba's threads."""
    num_rows = row_stop - row_start
    for chunk in prange(num_chunks):
        start = row_start + chunk * num_rows // num_chunks
        stop = row_start + (chunk + 1) * num_rows // num_chunks
        part = out[:, start - row_start : stop - row_start]
        portable_kquant_matmul(weights, position, start, stop, quants, sums, scales, part, dtype_code)
